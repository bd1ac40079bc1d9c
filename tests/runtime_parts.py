"""Shared parts of the runtime tests: the shipped models as workers, a paced policy, job specs.

`Paced` slows a real policy worker down (a sleep before each call) so that a test can act while
searches are provably mid-flight: kill a process, stop Redis, cancel. It changes no output.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from typing import Any

from lodestar.orchestrator.driver import Orchestrator, OrchestratorConfig
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.orchestrator.state_store import JobSpec, MemoryStateStore, StoreConfig
from lodestar.tasks.arithmetic import Difficulty, generate_problems
from lodestar.workers.factory import ModelConfig, build_policy, build_reward
from lodestar.workers.messages import ExtendRequest, StepOutput

CACHE_DEPENDENT_SPEND = ("prompt_tokens", "prm_tokens")
"""Spend that counts tokens encoded, which depends on what the workers' caches held."""


class Paced:
    """A policy worker that sleeps `delay_s` before every `extend`."""

    concurrent = False

    def __init__(self, worker: Any, delay_s: float) -> None:
        self.worker = worker
        self.delay_s = delay_s

    def extend(self, requests: Sequence[ExtendRequest]) -> list[StepOutput]:
        time.sleep(self.delay_s)
        return self.worker.extend(requests)

    def release_prefix(self, prefix: str) -> int:
        return self.worker.release_prefix(prefix)


def shipped_workers(reward: str = "verifier") -> tuple[Any, Any]:
    config = ModelConfig(reward=reward)
    return build_policy(config), build_reward(config)


def solve_alone(models: tuple[Any, Any], specs: Sequence[JobSpec]) -> list[dict[str, Any]]:
    """Each search run alone in process, one after another (an orchestrator on the memory store
    with one live slot; a batch item as a lone search): the undisturbed result, as `comparable`
    gives it."""

    async def run() -> list[dict[str, Any]]:
        async with MemoryStateStore(StoreConfig()) as store:
            orchestrator = Orchestrator(
                store, LocalWorkers(*models), OrchestratorConfig(max_live=1)
            )
            try:
                alone = [dataclasses.replace(s, batch_id=None, batch_index=None) for s in specs]
                return [comparable((await orchestrator.solve(s)).result) for s in alone]
            finally:
                await orchestrator.close()

    return asyncio.run(run())


async def stepped(store: Any, search_id: str) -> bool:
    """Whether the search has checkpointed a step (generation 0 is its initial state, written at
    submit)."""
    checkpoint = await store.load_checkpoint(search_id)
    return checkpoint is not None and checkpoint.generation > 0


def problem_specs(
    count: int,
    prefix: str,
    algorithm: str = "pf",
    ops: int = 2,
    params: dict[str, Any] | None = None,
) -> list[JobSpec]:
    """`count` held-out arithmetic problems as jobs (PF with 4 particles unless told), seed i
    for the i-th."""
    problems = generate_problems("test", count, Difficulty(ops=ops), seed=11)
    params = {"n": 4} if params is None else params
    return [
        JobSpec(f"{prefix}-{i}", algorithm, dict(params), p.expression, seed=i)
        for i, p in enumerate(problems)
    ]


def comparable(result: str | dict[str, Any] | None) -> dict[str, Any]:
    """A result without the spend that depends on cache state: what must match across runs
    that differ only in where and when they ran."""
    assert result is not None
    doc = json.loads(result) if isinstance(result, str) else json.loads(json.dumps(result))
    for key in CACHE_DEPENDENT_SPEND:
        doc["spend"].pop(key)
    return doc


def assert_same_results(got: list[dict[str, Any]], want: list[dict[str, Any]], tol: float = 1e-5):
    """Equal texts, answers, choices and counts; floats (scores, weights) equal up to `tol`:
    a reward model batched with other searches' requests rounds differently in the last bits."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        _assert_close(g, w, f"result[{i}]", tol)


def _assert_close(got: Any, want: Any, path: str, tol: float) -> None:
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, int | float) and isinstance(want, int | float), path
        assert math.isclose(got, want, rel_tol=tol, abs_tol=tol), f"{path}: {got} != {want}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{path}: keys differ"
        for k in want:
            _assert_close(got[k], want[k], f"{path}.{k}", tol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: lengths differ"
        for j, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close(g, w, f"{path}[{j}]", tol)
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"
