"""Pools of Ray model actors behind the `Workers` interface: placement, affinity, batching.

Each actor gets its own `RequestBatcher` per role, so the requests of every search routed to it
merge into one actor call per window. A search is pinned to one policy actor and one reward actor
for as long as it runs here (its KV caches live there); new searches go to the actor with the
fewest live searches. In `combined` mode each actor holds both models (one per GPU when both fit)
and a search's two roles land on the same actor. A policy split across k GPUs
(`models.tensor_parallel_size` = k) runs in an actor of its own placement group of k bundles.

Actor failures are Ray's to absorb: `max_restarts` brings a killed actor back (models reloaded,
caches empty) and `max_task_retries` re-sends the calls it lost; a retried call gives the same
outputs because sampling is seeded per request. Only when the retries run out does a search see
the error.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lodestar.orchestrator.batching import RequestBatcher, SearchScope, request_chars
from lodestar.orchestrator.errors import WorkersUnavailable
from lodestar.workers.actors import CONTROL, ModelHost, Role
from lodestar.workers.contract import CONCURRENT_CALLS
from lodestar.workers.factory import ModelConfig
from lodestar.workers.messages import (
    ExtendRequest,
    RequestFailed,
    ScoreRequest,
    StepOutput,
    StepScores,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolConfig:
    models: ModelConfig = field(default_factory=ModelConfig)
    policy_workers: int = 1
    reward_workers: int = 1
    """Ignored in combined mode (every actor holds both models)."""
    combined: bool = False
    num_gpus: float = 0.0
    """GPUs per actor; fractional shares one GPU (0.5: two actors per GPU). 0 on CPU nodes.
    With `models.tensor_parallel_size` > 1, GPUs per rank of a policy actor: 1 or 0."""
    num_cpus: float = 1.0
    threads: int | None = None
    """torch threads per actor; None keeps torch's default (all cores of the node)."""
    max_restarts: int = 4
    max_task_retries: int = 4
    max_batch: int = 256
    """Most requests in one actor call."""
    max_wait_s: float = 0.002
    """How long a batcher waits for more searches' requests before calling the actor."""
    max_call_chars: int | None = 1_000_000
    """Most prefix characters in one actor call (`batching.request_chars`): bounds a call's
    encoding work, so one search's long prefill never holds an actor for everyone."""
    call_timeout_s: float | None = 600.0
    """An actor call unanswered this long counts as a dead worker (UNAVAILABLE); far above any
    bounded call's time, it catches a hung actor, not a slow one."""

    def __post_init__(self) -> None:
        if self.policy_workers < 1 or (not self.combined and self.reward_workers < 1):
            raise ValueError("need at least one policy worker and one reward worker")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError("num_gpus and num_cpus must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.max_batch < 1 or self.max_wait_s < 0:
            raise ValueError("need max_batch >= 1 and max_wait_s >= 0")
        if self.max_call_chars is not None and self.max_call_chars < 1:
            raise ValueError("max_call_chars must be >= 1")
        if self.call_timeout_s is not None and self.call_timeout_s <= 0:
            raise ValueError("call_timeout_s must be > 0")
        if self.models.tensor_parallel_size > 1:
            if self.combined:  # the PRM would run in the policy's GPU-less actor process
                raise ValueError("tensor_parallel_size > 1 needs separate reward actors")
            if self.num_gpus not in (0, 1):
                raise ValueError("with tensor_parallel_size > 1, num_gpus (per rank) is 1 or 0")
            if self.num_gpus == 0 and self.num_cpus <= 0:
                raise ValueError("tensor_parallel_size > 1 on CPUs needs num_cpus > 0")


def tensor_parallel_bundles(config: PoolConfig) -> list[dict[str, float]] | None:
    """The placement group of one policy actor: a bundle per tensor-parallel rank, {"GPU": 1,
    "CPU": num_cpus} (CPU only on CPU nodes); None at tensor_parallel_size 1, where the actor
    asks for `num_gpus` itself. It does not depend on the engine; only vLLM uses more than one."""
    ranks = config.models.tensor_parallel_size
    if ranks == 1:
        return None
    bundle = {"GPU": config.num_gpus, "CPU": config.num_cpus}
    return [{k: v for k, v in bundle.items() if v > 0} for _ in range(ranks)]


class _Member:
    """One actor of a pool with its batchers and its count of live searches."""

    def __init__(self, handle: Any, roles: tuple[Role, ...], config: PoolConfig) -> None:
        self.handle = handle
        self.roles = roles
        self.live = 0
        self.call_timeout_s = config.call_timeout_s
        bounds = dict(cost=request_chars, max_cost=config.max_call_chars)
        self.extend = RequestBatcher(self._extend, config.max_batch, config.max_wait_s, **bounds)
        self.score = RequestBatcher(self._score, config.max_batch, config.max_wait_s, **bounds)

    async def _extend(self, requests: list[ExtendRequest]) -> list[StepOutput | RequestFailed]:
        return await self._call(self.handle.extend, "policy", requests)

    async def _score(self, requests: list[ScoreRequest]) -> list[StepScores | RequestFailed]:
        return await self._call(self.handle.score, "reward", requests)

    async def _call(self, method: Any, role: str, requests: list[Any]) -> Any:
        """One actor call; a dead actor, or one silent past `call_timeout_s`, is unavailable
        (the detail, with actor ids and hosts, stays in the log)."""
        try:
            async with asyncio.timeout(self.call_timeout_s):
                return await method.remote(requests)
        except (RayActorError, ActorUnavailableError, TimeoutError) as e:
            log.warning("%s worker call of %d requests failed: %s", role, len(requests), e)
            raise WorkersUnavailable(f"{role} worker unavailable") from e


class RayWorkerPool:
    """Creates the actors on construction (needs `ray.init` first); `ready()` waits for models."""

    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config = config or PoolConfig()
        actor_cls = ray.remote(concurrency_groups={CONTROL: 1})(ModelHost)
        options: dict[str, Any] = dict(
            max_concurrency=CONCURRENT_CALLS,
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            max_restarts=config.max_restarts,
            max_task_retries=config.max_task_retries,
        )
        self._groups: list[Any] = []
        """Placement groups of tensor-parallel policy actors, removed at `shutdown`."""

        def spawn(roles: tuple[Role, ...]) -> _Member:
            bundles = tensor_parallel_bundles(config) if "policy" in roles else None
            placed = options
            if bundles is not None:
                # On one node (STRICT_PACK). The actor holds no GPU of its own and still sees the
                # node's (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone at 0 GPUs); vLLM takes the
                # group it runs in (ray.util.get_current_placement_group) and puts one worker on
                # each GPU bundle.
                group = placement_group(bundles, strategy="STRICT_PACK")
                self._groups.append(group)
                strategy = PlacementGroupSchedulingStrategy(
                    group, placement_group_capture_child_tasks=True
                )
                placed = options | dict(num_gpus=0, scheduling_strategy=strategy)
            handle = actor_cls.options(**placed).remote(config.models, roles, config.threads)
            return _Member(handle, roles, config)

        n_policy = config.policy_workers
        if config.combined:
            self.policy_members = [spawn(("policy", "reward")) for _ in range(n_policy)]
            self.reward_members = self.policy_members
        else:
            self.policy_members = [spawn(("policy",)) for _ in range(n_policy)]
            self.reward_members = [spawn(("reward",)) for _ in range(config.reward_workers)]
        self._assigned: dict[str, tuple[_Member, _Member]] = {}
        self._dropping: set[asyncio.Future[Any]] = set()
        """Cache drops sent and not yet answered (see `release`)."""

    @property
    def members(self) -> list[_Member]:
        unique = {id(m): m for m in (*self.policy_members, *self.reward_members)}
        return list(unique.values())

    @property
    def handles(self) -> list[Any]:
        return [m.handle for m in self.members]

    async def ready(self) -> list[dict[str, Any]]:
        """Wait until every actor has loaded its models; returns each actor's `info()`. The
        engine is known only now (`auto` picks it on the actor's node), and so is whether an
        actor takes overlapping calls: its batchers are set to match."""
        members = self.members
        infos = list(await asyncio.gather(*(m.handle.info.remote() for m in members)))
        for m, info in zip(members, infos, strict=True):
            for role, batcher in (("policy", m.extend), ("reward", m.score)):
                if info["concurrent"].get(role):
                    batcher.overlap(CONCURRENT_CALLS)
        return infos

    def scope(self, search_id: str) -> SearchScope:
        if search_id in self._assigned:
            raise ValueError(f"search {search_id!r} is already running on this pool")
        policy = min(self.policy_members, key=lambda m: m.live)
        policy.live += 1
        if self.config.combined:
            reward = policy
        else:
            reward = min(self.reward_members, key=lambda m: m.live)
            reward.live += 1
        self._assigned[search_id] = (policy, reward)
        return SearchScope(search_id, policy.extend.submit, reward.score.submit)

    def batchers(self) -> dict[str, list[RequestBatcher[Any, Any]]]:
        return {
            "policy": [m.extend for m in self.policy_members],
            "reward": [m.score for m in self.reward_members],
        }

    async def release(self, search_id: str) -> None:
        """Forget the search's placement now and send its actors the order to drop its caches,
        without waiting for them: an actor runs model calls one at a time, so a busy one drops
        the caches only after its current call (seconds to minutes on a real model), and no one
        needs to wait for that: not the search's result, not its slot, not a shutdown (whose
        actors are killed anyway). A dead actor has no caches to drop."""
        placed = self._assigned.pop(search_id, None)
        if placed is None:
            return
        members = {id(m): m for m in placed}.values()
        for m in members:
            m.live -= 1
        prefix = SearchScope.prefix_of(search_id)
        # Never retried: an actor that restarts starts with empty caches.
        drop = [m.handle.release_prefix.options(max_task_retries=0) for m in members]
        # Collected, not dropped, so a dead actor's error is read here rather than logged.
        dropping = asyncio.ensure_future(
            asyncio.gather(*(d.remote(prefix) for d in drop), return_exceptions=True)
        )
        self._dropping.add(dropping)
        dropping.add_done_callback(self._dropped)

    def _dropped(self, dropping: asyncio.Future[Any]) -> None:
        self._dropping.discard(dropping)
        if not dropping.cancelled():
            dropping.exception()  # read: a cancel at shutdown is nobody's error

    @property
    def live_searches(self) -> int:
        return len(self._assigned)

    def crash(self, handle: Any) -> None:
        """Kill one actor as a failing node would (Ray restarts it): for fault drills."""
        ray.kill(handle, no_restart=False)

    def shutdown(self) -> None:
        for dropping in list(self._dropping):  # the actors and their caches go with them
            dropping.cancel()
        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        for group in self._groups:  # and with them any vLLM workers placed in them
            remove_placement_group(group)
        self._groups.clear()
