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


@pytest.mark.parametrize("in_flight", [1, 3])
def test_calls_overlap_up_to_max_in_flight_and_no_further(in_flight):
    """One call at a time for an engine that runs one batch at a time; up to `max_in_flight`
    overlapping calls, each dispatched as it arrives, for a concurrent engine (vLLM)."""
    running, peak, calls = 0, 0, []

    async def slow(xs: list[int]) -> list[int]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        calls.append(list(xs))
        await asyncio.sleep(0.02)
        running -= 1
        return [-x for x in xs]

    async def main():
        batcher = RequestBatcher(slow, max_batch=1, max_wait_s=0.0, max_in_flight=in_flight)
        return await asyncio.gather(*(batcher.submit([i]) for i in range(8)))

    assert asyncio.run(main()) == [[-i] for i in range(8)]
    assert peak == in_flight and sorted(calls) == [[i] for i in range(8)]


def test_one_call_at_a_time_takes_what_arrived_during_the_last_into_the_next():
    """While a call runs, new callers queue and all go together in the next call."""
    calls: list[list[int]] = []

    async def slow(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        await asyncio.sleep(0.02)
        return xs

    async def main():
        batcher = RequestBatcher(slow, max_wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit([0]))
        await asyncio.sleep(0.005)  # the first call is running now
        rest = await asyncio.gather(*(batcher.submit([i]) for i in range(1, 5)))
        return [await first, *rest]

    assert asyncio.run(main()) == [[i] for i in range(5)]
    assert calls == [[0], [1, 2, 3, 4]]


def test_max_in_flight_must_be_positive():
    with pytest.raises(ValueError):
        RequestBatcher(lambda xs: xs, max_in_flight=0)
