"""What the distributed runtime costs and what it buys, on the shipped models.

    python -m benchmarks.orchestration --searches 64 --particles 16 --repeats 3

1. Overhead: the same N concurrent PF searches (same seeds, same batch limits) run
   - in process (`LocalEngine`: no store, no checkpoints, workers in this process),
   - through the orchestrator on in-process workers with the memory store,
   - through the orchestrator on Ray actors with Redis (checkpoint + event every step).
   Runs alternate, `--repeats` rounds, so machine noise hits all alike; medians are reported.
2. Cross-search batching: searches/min through Ray + Redis with 1, 8 and 32 live searches.
3. Scaling: 1 vs 2 policy actors (one torch thread each) for the same 32 searches.

Redis: `--redis URL`, or a private redis-server on a free port (needs the binary).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import ray
import torch

from lodestar.orchestrator.driver import Orchestrator, OrchestratorConfig
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.orchestrator.local_engine import LocalEngine, SearchJob
from lodestar.orchestrator.state_store import JobSpec, JobStatus, open_state_store
from lodestar.orchestrator.worker_pool import PoolConfig, RayWorkerPool
from lodestar.services.local_redis import LocalRedis
from lodestar.tasks.arithmetic import Difficulty, generate_problems
from lodestar.workers.factory import ModelConfig, build_policy, build_reward

MAX_BATCH, MAX_WAIT_S = 256, 0.002


def make_specs(n: int, particles: int, tag: str) -> list[JobSpec]:
    problems = generate_problems("test", n, Difficulty(), seed=3)
    return [
        JobSpec(f"{tag}-{i}", "pf", {"n": particles}, p.expression, seed=i)
        for i, p in enumerate(problems)
    ]


async def timed(run: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await run()
    return time.perf_counter() - started


async def through_orchestrator(
    store_url: str, workers: Any, specs: list[JobSpec], max_live: int
) -> None:
    async with open_state_store(store_url) as store:
        orch = Orchestrator(store, workers, OrchestratorConfig(max_live=max_live))
        records = await asyncio.gather(*(orch.solve(s) for s in specs))
        await orch.close()
    bad = [r.search_id for r in records if r.status is not JobStatus.SUCCEEDED]
    if bad:
        raise RuntimeError(f"searches did not succeed: {bad[:5]}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searches", type=int, default=64)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--redis", default=None, help="redis://host:port/db (default: private)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the in-process worker gets one thread, as each actor does
    local_redis = None
    if args.redis is None:
        local_redis = LocalRedis()
        local_redis.start()
    redis_url = args.redis or local_redis.url
    ray.init(address="local", include_dashboard=False, num_cpus=4, log_to_driver=False)
    models = ModelConfig()
    try:
        policy, reward = build_policy(models), build_reward(models)
        pool = RayWorkerPool(PoolConfig(models=models, threads=1))
        await pool.ready()
        n, rounds = args.searches, 0

        def specs(tag: str) -> list[JobSpec]:
            nonlocal rounds
            rounds += 1
            return make_specs(n, args.particles, f"{tag}{rounds}")

        async def in_process() -> None:
            engine = LocalEngine(policy, reward, MAX_BATCH, MAX_WAIT_S, concurrency=n)
            jobs = [SearchJob(s.algorithm, s.problem, s.params, s.seed) for s in specs("e")]
            await engine.solve_all(jobs)

        async def orchestrated_local() -> None:
            workers = LocalWorkers(policy, reward, MAX_BATCH, MAX_WAIT_S)
            await through_orchestrator("memory://", workers, specs("m"), n)

        async def orchestrated_ray() -> None:
            await through_orchestrator(redis_url, pool, specs("r"), n)

        modes = {
            "in-process engine": in_process,
            "orchestrator, memory store, local workers": orchestrated_local,
            "orchestrator, Redis, Ray actors": orchestrated_ray,
        }
        await orchestrated_ray()  # warm-up: actor code paths, Redis scripts
        walls: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.repeats):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            for mode in order:
                walls[mode].append(await timed(modes[mode]))
        base = statistics.median(walls["in-process engine"])
        print(f"1. overhead: {n} concurrent PF-{args.particles} searches, median of {args.repeats}")
        for mode, w in walls.items():
            med = statistics.median(w)
            print(f"   {mode:<44} {med:6.2f} s  ({(med / base - 1) * 100:+5.1f}% vs in-process)")

        print(f"2. cross-search batching through Ray + Redis ({n} searches in all)")
        for live in (1, 8, 32):
            batch = specs("b")
            wall = await timed(lambda b=batch, k=live: through_orchestrator(redis_url, pool, b, k))
            print(f"   {live:>2} live: {n / wall * 60:7.1f} searches/min  ({wall:.2f} s)")
        pool.shutdown()

        print(f"3. scaling: policy actors, one torch thread each, {n} searches, 32 live")
        for actors in (1, 2):
            scaled = RayWorkerPool(PoolConfig(models=models, threads=1, policy_workers=actors))
            await scaled.ready()
            await through_orchestrator(redis_url, scaled, specs("w"), 32)  # warm
            batch = specs("s")
            wall = await timed(lambda p=scaled, b=batch: through_orchestrator(redis_url, p, b, 32))
            print(f"   {actors} policy actor(s): {n / wall * 60:7.1f} searches/min ({wall:.2f} s)")
            scaled.shutdown()
    finally:
        ray.shutdown()
        if local_redis is not None:
            local_redis.close()


if __name__ == "__main__":
    asyncio.run(main())
