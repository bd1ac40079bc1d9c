import asyncio

import pytest

from lodestar.orchestrator.algorithms.base import run_search
from lodestar.orchestrator.algorithms.registry import start_search
from lodestar.orchestrator.batching import RequestBatcher, SearchScope
from tests.scripted import ScriptedWorld


def test_concurrent_callers_share_one_call_and_get_their_own_outputs():
    calls: list[list[int]] = []

    async def double(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        return [2 * x for x in xs]

    async def main():
        batcher = RequestBatcher(double, max_batch=100, max_wait_s=0.01)
        return await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(10)))

    results = asyncio.run(main())
    assert results == [[2 * i, 2 * (i + 100)] for i in range(10)]
    assert len(calls) == 1 and len(calls[0]) == 20


def test_batches_never_exceed_max_batch_and_keep_a_callers_requests_together():
    calls: list[list[int]] = []

    async def ident(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        return xs

    async def main():
        batcher = RequestBatcher(ident, max_batch=5, max_wait_s=0.005)
        return await asyncio.gather(
            batcher.submit([1, 2, 3]), batcher.submit([4, 5, 6]), batcher.submit(list(range(12)))
        )

    a, b, big = asyncio.run(main())
    assert a == [1, 2, 3] and b == [4, 5, 6] and big == list(range(12))
    assert all(len(c) <= 5 for c in calls)
    assert [1, 2, 3] in calls or any(c[:3] == [1, 2, 3] for c in calls)


def test_a_worker_failure_reaches_every_waiting_caller():
    async def broken(xs):
        raise ConnectionError("worker died")

    async def main():
        batcher = RequestBatcher(broken, max_wait_s=0.005)
        return await asyncio.gather(
            batcher.submit([1]), batcher.submit([2]), return_exceptions=True
        )

    errors = asyncio.run(main())
    assert all(isinstance(e, ConnectionError) for e in errors)


def test_scoped_concurrent_searches_equal_their_sequential_results():
    world = ScriptedWorld()
    names = [f"task-{i}" for i in range(12)]

    def solve(name: str, seed: int, policy, reward):
        algorithm, state = start_search("pf", name, {"n": 4}, seed)
        return run_search(algorithm, state, policy, reward)

    sequential = [asyncio.run(solve(n, i, world, world)) for i, n in enumerate(names)]

    seen_ids: set[str] = set()

    async def extend(reqs):
        seen_ids.update(r.seq_id for r in reqs)
        return await world.extend(reqs)

    async def main():
        policy = RequestBatcher(extend, max_batch=64, max_wait_s=0.002)
        reward = RequestBatcher(world.score, max_batch=64, max_wait_s=0.002)
        scopes = [SearchScope(f"s{i}", policy.submit, reward.submit) for i in range(len(names))]
        results = await asyncio.gather(
            *(solve(n, i, s, s) for i, (n, s) in enumerate(zip(names, scopes, strict=True)))
        )
        return results, policy.batch_sizes

    concurrent, sizes = asyncio.run(main())
    assert concurrent == sequential
    assert max(sizes) > 4  # requests of several searches really shared a call
    assert all(i.split("/")[0] in {f"s{k}" for k in range(len(names))} for i in seen_ids)


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError):
        RequestBatcher(lambda xs: xs, max_batch=0)
