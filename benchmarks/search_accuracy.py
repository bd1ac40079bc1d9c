"""Accuracy of search vs greedy on held-out arithmetic problems, with the shipped models.

    python -m benchmarks.search_accuracy --problems 200 --budget 8 --reward verifier
    python -m benchmarks.search_accuracy --problems 200 --budget 8 --reward prm

Prints one row per algorithm: accuracy with its 95% bootstrap interval, the paired difference to
greedy on the same problems (with its interval), mean generated tokens and PRM passes per problem,
and wall time. All searches of one algorithm run concurrently in one process, their model calls
merged into shared batches (`LocalEngine`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch

from lodestar.evaluation.stats import bootstrap_interval, paired_difference_interval
from lodestar.orchestrator.local_engine import LocalEngine, SearchJob
from lodestar.tasks.arithmetic import Difficulty, generate_problems, is_correct
from lodestar.workers.factory import ModelConfig, build_policy, build_reward


def params_for(algorithm: str, budget: int, extra: dict[str, object]) -> dict[str, object]:
    if algorithm == "greedy":
        return {}
    return {"n": budget, **extra.get(algorithm, {})}  # type: ignore[dict-item]


def main() -> None:
    asyncio.run(_main())


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--algorithms", default="greedy,best_of_n,pf,epf,astar")
    parser.add_argument("--reward", default="verifier", help='"verifier", "prm" or a PRM dir')
    parser.add_argument("--policy", default=None)
    parser.add_argument("--ops", type=int, default=Difficulty().ops, help="operations per problem")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--params", default="{}", help='JSON: {"astar": {"k": 4}, ...}')
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    problems = generate_problems("test", args.problems, Difficulty(ops=args.ops), seed=args.seed)
    config = ModelConfig(policy=args.policy, reward=args.reward)
    engine = LocalEngine(build_policy(config), build_reward(config), concurrency=args.concurrency)
    extra = json.loads(args.params)

    rows, correct_by = [], {}
    for algorithm in args.algorithms.split(","):
        jobs = [
            SearchJob(algorithm, p.expression, params_for(algorithm, args.budget, extra), i)
            for i, p in enumerate(problems)
        ]
        started = time.perf_counter()
        done = await engine.solve_all(jobs)
        wall = time.perf_counter() - started
        answers = [f.result.answer for f in done]
        correct = [float(is_correct(p, a)) for p, a in zip(problems, answers, strict=True)]
        correct_by[algorithm] = correct
        low, high = bootstrap_interval(correct)
        row = {
            "algorithm": algorithm,
            "accuracy": sum(correct) / len(correct),
            "ci95": [low, high],
            "tokens": sum(f.result.spend.generated_tokens for f in done) / len(done),
            "prm_passes": sum(f.result.spend.prm_passes for f in done) / len(done),
            "wall_s": wall,
        }
        if "greedy" in correct_by and algorithm != "greedy":
            row["vs_greedy"] = paired_difference_interval(correct, correct_by["greedy"])
        rows.append(row)
        print(_format(row), flush=True)
    if args.json:
        settings = vars(args) | {"json": str(args.json)}
        args.json.write_text(json.dumps({"args": settings, "rows": rows}, indent=1))


def _format(row: dict[str, object]) -> str:
    low, high = row["ci95"]  # type: ignore[misc]
    text = (
        f"{row['algorithm']:>20}  acc {row['accuracy']:.3f} [{low:.3f}, {high:.3f}]"
        f"  tokens {row['tokens']:7.1f}  prm {row['prm_passes']:6.1f}  wall {row['wall_s']:6.1f}s"
    )
    if "vs_greedy" in row:
        d, dl, dh = row["vs_greedy"]  # type: ignore[misc]
        text += f"  vs greedy {d:+.3f} [{dl:+.3f}, {dh:+.3f}]"
    return text


if __name__ == "__main__":
    main()
