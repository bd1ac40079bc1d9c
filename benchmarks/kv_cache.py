"""KV-cache reuse on vs off: wall time of a 16-particle PF over held-out problems.

    python -m benchmarks.kv_cache --problems 100 --particles 16

Both runs use the shipped policy, the verifier reward, the same seeds and the same batching; the
only difference is the policy worker's cache budget (0 turns reuse off). They alternate in chunks
so machine noise hits both alike, and the answers must come out identical.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from lodestar.orchestrator.local_engine import LocalEngine, SearchJob
from lodestar.tasks.arithmetic import Difficulty, generate_problems
from lodestar.workers.factory import ModelConfig, build_policy, build_reward


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    problems = generate_problems("test", args.problems, Difficulty())
    reward = build_reward(ModelConfig())
    engines = {
        "on": LocalEngine(build_policy(ModelConfig()), reward, concurrency=8),
        "off": LocalEngine(build_policy(ModelConfig(cache_tokens=0)), reward, concurrency=8),
    }
    wall = {"on": 0.0, "off": 0.0}
    answers: dict[str, list[str]] = {"on": [], "off": []}
    prompt_tokens = {"on": 0, "off": 0}
    size = -(-len(problems) // args.chunks)
    for c in range(args.chunks):
        chunk = problems[c * size : (c + 1) * size]
        jobs = [
            SearchJob("pf", p.expression, {"n": args.particles}, c * size + i)
            for i, p in enumerate(chunk)
        ]
        for mode in ("on", "off") if c % 2 == 0 else ("off", "on"):
            started = time.perf_counter()
            done = await engines[mode].solve_all(jobs)
            wall[mode] += time.perf_counter() - started
            answers[mode] += [f.result.answer for f in done]
            prompt_tokens[mode] += sum(f.result.spend.prompt_tokens for f in done)
    print(f"PF-{args.particles} over {len(problems)} problems, {args.threads} threads")
    for mode in ("on", "off"):
        encoded = prompt_tokens[mode]
        print(f"  cache {mode:>3}: {wall[mode]:7.1f} s   prompt tokens encoded {encoded}")
    print(f"  speed-up with reuse: {wall['off'] / wall['on']:.2f}x")
    print(f"  identical answers: {answers['on'] == answers['off']}")


if __name__ == "__main__":
    asyncio.run(_main())
