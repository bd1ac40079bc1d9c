"""The composition root: a `RuntimeConfig` in, running workers + state store + orchestrator out.

Every command builds its runtime here (`serve`, `batch run`, `solve`, `eval`, `bench`, the
reliability bench), so there is one search loop (`Orchestrator` over a `StateStore`) and one place
that starts Ray. The workers are Ray actors (`RayWorkerPool`) or, with `in_process`, the same
engines in threads of this process (`LocalWorkers`: no actor hop, for one-machine commands).
With `pool.fleet` the actors are the release's shared fleet: this runtime joins Ray in the
fleet's namespace, runs a `FleetKeeper` (which keeps the fleet while it holds the owner lease)
and leaves the actors running when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lodestar.orchestrator.driver import Orchestrator, OrchestratorConfig
from lodestar.orchestrator.inprocess import LocalWorkers
from lodestar.orchestrator.state_store import open_state_store
from lodestar.orchestrator.worker_pool import PoolConfig, fleet_namespace
from lodestar.workers.contract import PolicyEngine, RewardEngine
from lodestar.workers.factory import build_intake, build_policy, build_reward
from lodestar.workers.intake import ProblemLimits

if TYPE_CHECKING:
    from lodestar.orchestrator.fleet import FleetKeeper
    from lodestar.orchestrator.worker_pool import RayWorkerPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeConfig:
    pool: PoolConfig = field(default_factory=PoolConfig)
    """The models (`pool.models`) and, on Ray, the actors that hold them."""
    in_process: bool = False
    """The engines in threads of this process instead of Ray actors (`pool.threads` torch
    threads); nothing but the models is started."""
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    store_url: str = "memory://"
    """memory:// (one process, nothing survives) or redis://host:port/db."""
    store_password: str | None = None
    """Redis password when the url has none (from LODESTAR_REDIS_PASSWORD, a Secret on k8s)."""
    ray_address: str = "local"
    """"local" starts a private Ray; "auto" or "ray://host:10001" joins a cluster."""
    ray_cpus: int | None = None
    """CPUs a private Ray offers its actors (None: the machine's)."""
    connect_attempts: int = 5
    """Tries at joining a cluster before giving up (see `connect_ray`)."""
    limits: ProblemLimits = field(default_factory=ProblemLimits)
    """What one problem may be; checked at submit against the served policy's tokenizer."""

    def __post_init__(self) -> None:
        if self.pool.fleet is not None:
            if self.in_process:
                raise ValueError("a fleet is Ray actors: not with in-process workers")
            if self.store_url == "memory://":
                raise ValueError(
                    "a fleet needs a Redis store (--redis / LODESTAR_REDIS_URL): its owner "
                    "lease and its searches are shared by every gateway through it"
                )


@dataclass(frozen=True)
class Runtime:
    orchestrator: Orchestrator
    workers: LocalWorkers | RayWorkerPool
    keeper: FleetKeeper | None = None
    """With a fleet: whether this gateway keeps it now (`keeper.held`)."""

    async def start(self) -> list[dict[str, Any]]:
        """Wait for the models to load, then start the orchestrator; returns each worker
        host's `info()` (device, roles, counters)."""
        infos = await self.workers.ready()
        await self.orchestrator.start()
        return infos


@contextlib.asynccontextmanager
async def open_runtime(
    config: RuntimeConfig, engines: tuple[PolicyEngine, RewardEngine] | None = None
) -> AsyncIterator[Runtime]:
    """Ray (unless `in_process`), the state store, the workers and the orchestrator, torn down in
    reverse. On entry the models may still be loading and the orchestrator is not started:
    `await runtime.start()`. `engines` serves already-built engines in process (a benchmark
    that shares weights between sides)."""
    in_process = config.in_process or engines is not None
    owns_ray = not in_process and not _ray_running()
    fleet = config.pool.fleet
    if owns_ray:
        namespace = None if fleet is None else fleet_namespace(fleet)
        await connect_ray(
            config.ray_address,
            config.connect_attempts,
            namespace=namespace,
            num_cpus=config.ray_cpus,
        )
    settings = {"password": config.store_password} if config.store_password else {}
    store = open_state_store(config.store_url, **settings)
    keeper = None
    try:
        await store.ping()
        workers: LocalWorkers | RayWorkerPool
        if in_process:
            workers = await asyncio.to_thread(_local_workers, config.pool, engines)
        else:
            from lodestar.orchestrator.worker_pool import RayWorkerPool

            if fleet is not None:  # the first turn creates the actors if this one keeps them
                from lodestar.orchestrator.fleet import FleetKeeper

                lease_s = config.orchestrator.lease_s
                keeper = FleetKeeper(config.pool, store, config.orchestrator.owner, lease_s)
                await keeper.start()
            workers = RayWorkerPool(config.pool)  # the actors load while the intake loads here
        intake = await asyncio.to_thread(build_intake, config.pool.models, config.limits)
        orchestrator = Orchestrator(store, workers, config.orchestrator, intake=intake)
        try:
            yield Runtime(orchestrator, workers, keeper)
        finally:
            await orchestrator.close()
            workers.shutdown()
    finally:
        if keeper is not None:  # the lease handed back: another gateway keeps the fleet now
            await keeper.stop()
        await store.close()
        if owns_ray:
            import ray

            ray.shutdown()


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def _local_workers(
    pool: PoolConfig, engines: tuple[PolicyEngine, RewardEngine] | None
) -> LocalWorkers:
    if engines is None:
        if pool.threads is not None:
            import torch

            torch.set_num_threads(pool.threads)
        engines = build_policy(pool.models), build_reward(pool.models)
    return LocalWorkers(*engines, pool.max_batch, pool.max_wait_s, pool.max_call_chars)


async def connect_ray(
    address: str,
    attempts: int,
    wait_s: float = 2.0,
    namespace: str | None = None,
    **local: int | None,
) -> None:
    """`ray.init`, retried on a connection failure when joining a cluster: on Kubernetes the
    gateway starts beside the head, whose client server may not be up yet, and the head's Ray
    client proxier sometimes fails to start the per-connection server (seen here on about 1
    connection in 8, the child dying at fork; a new connection gets a new server). `local`
    (num_cpus, num_gpus) sizes a private Ray; a cluster has its own. `namespace`: the Ray
    namespace this driver names things in (a fleet's; None: an anonymous one)."""
    import ray

    local = {k: v for k, v in local.items() if v is not None and address == "local"}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                address=address,
                namespace=namespace,
                include_dashboard=False,
                log_to_driver=False,
                **local,
            )
            return
        except ConnectionError as e:
            if address == "local" or attempt == attempts:
                raise
            log.warning("Ray at %s refused (%s); retry %d/%d", address, e, attempt, attempts - 1)
            ray.shutdown()
            await asyncio.sleep(wait_s * attempt)
