"""A tensor-parallel policy on Ray: its actor runs in a placement group of one bundle per rank,
which vLLM's Ray executor picks up from inside the actor; the pool removes the group at shutdown.
The placement does not depend on the engine, so the Ray test runs the HF engine ("auto" with the
shipped policy resolves to it) and needs no vLLM."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import typer

from lodestar.orchestrator.driver import Orchestrator
from lodestar.orchestrator.state_store import JobStatus, open_state_store
from lodestar.orchestrator.worker_pool import PoolConfig, RayWorkerPool, tensor_parallel_bundles
from lodestar.services.cli import _runtime_config
from lodestar.workers import factory
from lodestar.workers.factory import ModelConfig
from tests.runtime_parts import problem_specs

TP2 = ModelConfig(engine="auto", tensor_parallel_size=2)


def test_one_bundle_per_rank_and_none_for_a_policy_on_one_device() -> None:
    assert tensor_parallel_bundles(PoolConfig(num_gpus=1)) is None  # TP 1: the actor asks itself
    on_gpus = PoolConfig(models=TP2, num_gpus=1, num_cpus=2)
    assert tensor_parallel_bundles(on_gpus) == [{"GPU": 1, "CPU": 2}] * 2
    assert tensor_parallel_bundles(PoolConfig(models=TP2)) == [{"CPU": 1}] * 2
    assert (
        tensor_parallel_bundles(PoolConfig(models=TP2, num_gpus=1, num_cpus=0)) == [{"GPU": 1}] * 2
    )


def test_each_rank_binds_its_own_cpus_and_the_cpu_build_starts_ranks_as_processes(monkeypatch):
    """The vLLM CPU build asserts one CPU list per rank, and has no Ray executor."""
    import torch

    from lodestar.workers import vllm_policy

    monkeypatch.setattr(vllm_policy.os, "sched_getaffinity", lambda _: {4, 5, 6, 7})
    assert vllm_policy.cpu_lists(1, 1) == "4"
    assert vllm_policy.cpu_lists(2, 2) == "4,5|6,7"
    assert vllm_policy.cpu_lists(3, 2) == "4,5,6|4,5,7"  # too few CPUs: ranks share some
    cpu = torch.device("cpu")
    assert (
        vllm_policy.engine_kwargs("m", cpu, tensor_parallel_size=2)["distributed_executor_backend"]
        == "mp"
    )
    assert "distributed_executor_backend" not in vllm_policy.engine_kwargs("m", cpu)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ModelConfig(tensor_parallel_size=0), "must be >= 1"),
        (lambda: ModelConfig(engine="hf", tensor_parallel_size=2), "needs the vllm engine"),
        (lambda: PoolConfig(models=TP2, combined=True), "separate reward actors"),
        (lambda: PoolConfig(models=TP2, num_gpus=0.5), "1 or 0"),
        (lambda: PoolConfig(models=TP2, num_cpus=0), "num_cpus > 0"),
    ],
)
def test_layouts_a_tensor_parallel_policy_cannot_have_are_refused(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_the_vllm_builder_and_the_command_line_pass_the_size_on(monkeypatch) -> None:
    import lodestar.workers.vllm_policy as vllm_policy

    seen: dict[str, Any] = {}
    monkeypatch.setattr(vllm_policy, "VLLMPolicy", lambda path, **kw: seen.update(kw))
    factory.vllm_policy(ModelConfig(engine="vllm", tensor_parallel_size=4))
    assert seen["tensor_parallel_size"] == 4

    args = (None, "verifier", None, None, "local", 1, 1, 1.0, None, 8, 8, 15.0)
    config = _runtime_config(*args, engine="vllm", tensor_parallel_size=2)
    assert config.runtime.pool.models.tensor_parallel_size == 2
    assert config.runtime.pool.num_gpus == 1
    with pytest.raises(typer.BadParameter, match="needs the vllm engine"):
        _runtime_config(*args, tensor_parallel_size=2)  # engine hf
    with pytest.raises(typer.BadParameter, match="1 or 0"):
        _runtime_config(*args[:7], 0.5, *args[8:], engine="vllm", tensor_parallel_size=2)


def live_groups(ray: Any) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}


def test_a_tensor_parallel_policy_actor_runs_in_its_own_group_until_shutdown(ray_cluster) -> None:
    ray = ray_cluster
    before = set(live_groups(ray))
    config = PoolConfig(models=TP2, threads=1)

    async def main() -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], JobStatus]:
        pool = RayWorkerPool(config)
        try:
            infos = await pool.ready()
            created = {k: v for k, v in live_groups(ray).items() if k not in before}
            async with open_state_store("memory://") as store:
                orch = Orchestrator(store, pool)
                (spec,) = problem_specs(1, "tensor-parallel")
                status = (await orch.solve(spec)).status
                await orch.close()
            return infos, created, status
        finally:
            pool.shutdown()

    infos, created, status = asyncio.run(main())
    (group_id,) = created  # one group: the policy actor's, none for the reward actor
    group = created[group_id]
    assert group["state"] == "CREATED" and group["strategy"] == "STRICT_PACK"
    assert group["bundles"] == {0: {"CPU": 1.0}, 1: {"CPU": 1.0}}
    placed = {tuple(i["roles"]): i["placement_group_id"] for i in infos}
    assert placed == {("policy",): group_id, ("reward",): None}
    assert status is JobStatus.SUCCEEDED  # the grouped actor serves searches as any other
    deadline = time.monotonic() + 30
    while ray.util.placement_group_table()[group_id]["state"] != "REMOVED":
        assert time.monotonic() < deadline, ray.util.placement_group_table()[group_id]
        time.sleep(0.1)
