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

With `PoolConfig.fleet` the actors are not this driver's: they are one model fleet per release,
named (`fleet_layout`) and detached in the Ray namespace `lodestar-<fleet>`, shared by every
gateway of the release. `orchestrator.fleet.FleetKeeper` creates them (one gateway at a time,
the holder of a Redis lease); the pool only finds them by name (`ready`), routes a search by a
stable hash of its id, so every gateway that drives it uses the same actors and their caches,
and leaves them running at `shutdown`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.placement_group import (
    get_placement_group,
    placement_group,
    remove_placement_group,
)
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
    fleet: str | None = None
    """None: this driver's own actors, killed at shutdown. A name (the release's): the shared
    model fleet `lodestar-<fleet>` (detached, named, restarted without limit; `max_restarts`
    does not apply), found by name, kept by `orchestrator.fleet.FleetKeeper`, never killed here."""
    fleet_wait_s: float = 300.0
    """How long `ready` waits for a fleet's actors to exist (another gateway may be creating
    them, or its owner lease may have to lapse first)."""

    def __post_init__(self) -> None:
        if self.fleet is not None and not FLEET_NAME.fullmatch(self.fleet):
            raise ValueError(
                f"fleet name must be lowercase letters, digits and '-' (at most 63), "
                f"starting and ending alphanumeric; got {self.fleet!r}"
            )
        if self.fleet_wait_s <= 0:
            raise ValueError("fleet_wait_s must be > 0")
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


FLEET_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
"""A Kubernetes name's alphabet and length (a DNS label), so a chart's release name fits."""
FLEET_ACTOR = re.compile(r"(policy|reward|model)-\d+")
"""The names a fleet's actors take (`fleet_layout`); anything else in its namespace is left."""


def fleet_namespace(fleet: str) -> str:
    """The Ray namespace a fleet's actors (and tensor-parallel placement groups) live in."""
    return f"lodestar-{fleet}"


def fleet_lease(fleet: str) -> str:
    """The state-store lease whose holder keeps the fleet (`StateStore.hold_lease`)."""
    return f"fleet:{fleet}:owner"


def fleet_layout(config: PoolConfig) -> list[tuple[str, tuple[Role, ...]]]:
    """The actors of a pool by name and roles, in the order `RayWorkerPool` lists them:
    model-0.. in combined mode (each holds both models), else policy-0.. then reward-0..."""
    if config.combined:
        return [(f"model-{i}", ("policy", "reward")) for i in range(config.policy_workers)]
    return [(f"policy-{i}", ("policy",)) for i in range(config.policy_workers)] + [
        (f"reward-{i}", ("reward",)) for i in range(config.reward_workers)
    ]


def actor_spec(config: PoolConfig, roles: tuple[Role, ...]) -> str:
    """What an actor of this pool is built from and with (models, roles, threads, resources) as
    a short fingerprint; the actor reports it in `info()`, and a fleet's keeper replaces one
    whose fingerprint is not its own config's (a release upgraded to other models)."""
    built = dict(
        models=dataclasses.asdict(config.models),
        roles=roles,
        threads=config.threads,
        resources=(config.num_cpus, config.num_gpus, tensor_parallel_bundles(config)),
        retries=config.max_task_retries,
    )
    text = json.dumps(built, default=str, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stable_index(search_id: str, size: int) -> int:
    """The same member for the same search in every process (Python's `hash` is salted)."""
    return zlib.crc32(search_id.encode()) % size


def tensor_parallel_bundles(config: PoolConfig) -> list[dict[str, float]] | None:
    """The placement group of one policy actor: a bundle per tensor-parallel rank, {"GPU": 1,
    "CPU": num_cpus} (CPU only on CPU nodes); None at tensor_parallel_size 1, where the actor
    asks for `num_gpus` itself. It does not depend on the engine; only vLLM uses more than one."""
    ranks = config.models.tensor_parallel_size
    if ranks == 1:
        return None
    bundle = {"GPU": config.num_gpus, "CPU": config.num_cpus}
    return [{k: v for k, v in bundle.items() if v > 0} for _ in range(ranks)]


def create_actor(
    config: PoolConfig, roles: tuple[Role, ...], name: str | None = None
) -> tuple[Any, Any | None]:
    """Start one model actor (a policy split across GPUs in a placement group of its own);
    returns its handle and that group. With `name` it is the fleet's: detached, in the fleet's
    namespace, restarted without limit, and its group detached too (an existing actor of that
    name is returned instead of a second one)."""
    actor_cls = ray.remote(concurrency_groups={CONTROL: 1})(ModelHost)
    options: dict[str, Any] = dict(
        max_concurrency=CONCURRENT_CALLS,
        num_cpus=config.num_cpus,
        num_gpus=config.num_gpus,
        max_restarts=config.max_restarts,
        max_task_retries=config.max_task_retries,
    )
    if name is not None:
        assert config.fleet is not None
        options |= dict(
            name=name,
            namespace=fleet_namespace(config.fleet),
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,  # no driver is left to make a new one: Ray keeps it up
        )
    bundles = tensor_parallel_bundles(config) if "policy" in roles else None
    group: Any | None = None
    if bundles is not None:
        # On one node (STRICT_PACK). The actor holds no GPU of its own and still sees the
        # node's (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone at 0 GPUs); vLLM takes the group
        # it runs in (ray.util.get_current_placement_group) and puts one worker on each GPU
        # bundle.
        group = None if name is None else fleet_group(name)  # a restarted keeper finds it
        if group is None:
            named = {} if name is None else dict(name=group_name(name), lifetime="detached")
            group = placement_group(bundles, strategy="STRICT_PACK", **named)
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
        options |= dict(num_gpus=0, scheduling_strategy=strategy)
    spec = actor_spec(config, roles)
    handle = actor_cls.options(**options).remote(config.models, roles, config.threads, spec)
    return handle, group


def group_name(actor: str) -> str:
    """The detached placement group of the fleet's tensor-parallel actor `actor`."""
    return f"{actor}-tp"


def fleet_group(actor: str) -> Any | None:
    """A fleet actor's detached placement group, if it has one. Ray names placement groups in
    the caller's namespace, which for a fleet's gateways (and `lodestar fleet down`) is the
    fleet's own: they join Ray in it (`services.runtime.connect_ray`)."""
    try:
        return get_placement_group(group_name(actor))
    except ValueError:
        return None


class _Member:
    """One actor of a pool with its batchers and its count of live searches. A fleet member
    also has its actor's name: its handle is looked up (`RayWorkerPool.ready`), and looked up
    again when the actor it held is gone for good (its keeper replaced it)."""

    def __init__(
        self, handle: Any, roles: tuple[Role, ...], config: PoolConfig, name: str | None = None
    ) -> None:
        self.handle = handle
        self.roles = roles
        self.name = name
        self.namespace = fleet_namespace(config.fleet) if config.fleet is not None else None
        self.live = 0
        self.call_timeout_s = config.call_timeout_s
        bounds = dict(cost=request_chars, max_cost=config.max_call_chars)
        self.extend = RequestBatcher(self._extend, config.max_batch, config.max_wait_s, **bounds)
        self.score = RequestBatcher(self._score, config.max_batch, config.max_wait_s, **bounds)

    async def _extend(self, requests: list[ExtendRequest]) -> list[StepOutput | RequestFailed]:
        return await self._call("extend", "policy", requests)

    async def _score(self, requests: list[ScoreRequest]) -> list[StepScores | RequestFailed]:
        return await self._call("score", "reward", requests)

    async def _call(self, method: str, role: str, requests: list[Any]) -> Any:
        """One actor call; a dead actor, or one silent past `call_timeout_s`, is unavailable
        (the detail, with actor ids and hosts, stays in the log). A fleet's actor that died for
        good may have a successor under its name: the call goes there once (calls are
        idempotent)."""
        try:
            try:
                return await self._send(method, requests)
            except ActorDiedError:
                if self.name is None or not await asyncio.to_thread(self.rejoin):
                    raise
                log.warning("%s: the fleet's actor was replaced; call sent to the new one", role)
                return await self._send(method, requests)
        except (RayActorError, ActorUnavailableError, TimeoutError) as e:
            log.warning("%s worker call of %d requests failed: %s", role, len(requests), e)
            raise WorkersUnavailable(f"{role} worker unavailable") from e

    async def _send(self, method: str, requests: list[Any]) -> Any:
        async with asyncio.timeout(self.call_timeout_s):
            return await getattr(self.handle, method).remote(requests)

    def lookup(self) -> Any | None:
        """The fleet actor now under this member's name; None while there is none."""
        try:
            return ray.get_actor(self.name, namespace=self.namespace)
        except ValueError:
            return None

    def rejoin(self) -> bool:
        """Take the handle of the actor now under this member's name; True if it is another
        actor than the one held (blocking: GCS calls)."""
        handle = self.lookup()
        if handle is None or (self.handle is not None and same_actor(handle, self.handle)):
            return False
        self.handle = handle
        return True


def same_actor(a: Any, b: Any) -> bool:
    return a._actor_id == b._actor_id


class RayWorkerPool:
    """Creates the actors on construction (needs `ray.init` first); `ready()` waits for models.
    With `config.fleet` it creates nothing: `ready()` finds the fleet's actors by name."""

    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config = config or PoolConfig()
        self._groups: list[Any] = []
        """Placement groups of tensor-parallel policy actors, removed at `shutdown`."""
        if config.fleet is not None:
            members = {n: _Member(None, roles, config, n) for n, roles in fleet_layout(config)}
            self.policy_members = [m for m in members.values() if "policy" in m.roles]
            self.reward_members = [m for m in members.values() if "reward" in m.roles]
        else:
            spawned = {n: self._spawn(roles) for n, roles in fleet_layout(config)}
            self.policy_members = [m for m in spawned.values() if "policy" in m.roles]
            self.reward_members = [m for m in spawned.values() if "reward" in m.roles]
        self._assigned: dict[str, tuple[_Member, _Member]] = {}
        self._dropping: set[asyncio.Future[Any]] = set()
        """Cache drops sent and not yet answered (see `release`)."""

    def _spawn(self, roles: tuple[Role, ...]) -> _Member:
        config = self.config
        handle, group = create_actor(config, roles)
        if group is not None:
            self._groups.append(group)
        return _Member(handle, roles, config)

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
        actor takes overlapping calls: its batchers are set to match. A fleet's actors are
        looked up by name first (`_find_fleet`)."""
        if self.config.fleet is not None:
            await self._find_fleet()
        members = self.members
        infos = list(await asyncio.gather(*(m.handle.info.remote() for m in members)))
        for m, info in zip(members, infos, strict=True):
            for role, batcher in (("policy", m.extend), ("reward", m.score)):
                if info["concurrent"].get(role):
                    batcher.overlap(CONCURRENT_CALLS)
        return infos

    async def _find_fleet(self) -> None:
        """Each member's handle: the actor under its name, waited for up to `fleet_wait_s` the
        first time (its keeper may be creating it, or its lease may have to lapse first). Later
        rounds (the watchdog's) pick up the successor of an actor replaced for good; a name
        with no actor keeps the dead handle, which then fails the health probe."""
        deadline = time.monotonic() + self.config.fleet_wait_s
        while True:
            await asyncio.to_thread(lambda: [m.rejoin() for m in self.members])
            missing = [m.name for m in self.members if m.handle is None]
            if not missing:
                return
            if time.monotonic() > deadline:
                where = f"namespace {self.members[0].namespace!r}"
                raise WorkersUnavailable(
                    f"no fleet actor {', '.join(map(str, missing))} in {where} "
                    f"after {self.config.fleet_wait_s:.0f} s"
                )
            await asyncio.sleep(0.5)

    def scope(self, search_id: str) -> SearchScope:
        """Place a search: on a fleet by a stable hash of its id (every gateway that drives it,
        the one that resumes it included, uses the same actors and finds its caches there);
        on private actors on the one with the fewest live searches."""
        if search_id in self._assigned:
            raise ValueError(f"search {search_id!r} is already running on this pool")
        if self.config.fleet is not None:
            policy = self.policy_members[stable_index(search_id, len(self.policy_members))]
            reward = self.reward_members[stable_index(search_id, len(self.reward_members))]
        else:
            policy = min(self.policy_members, key=lambda m: m.live)
            reward = min(self.reward_members, key=lambda m: m.live)
        policy.live += 1
        if reward is not policy:
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
        """Kill this driver's actors; a fleet's stay (other gateways use them, and the searches
        left here resume on them with their caches)."""
        for dropping in list(self._dropping):  # the actors and their caches go with them
            dropping.cancel()
        if self.config.fleet is not None:
            return
        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        for group in self._groups:  # and with them any vLLM workers placed in them
            remove_placement_group(group)
        self._groups.clear()
