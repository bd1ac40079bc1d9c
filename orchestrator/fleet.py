"""A release's shared model fleet: its keeper, and taking it down.

A fleet (`PoolConfig.fleet`) is the policy and reward actors of a release, named after
`worker_pool.fleet_layout` (policy-0.., reward-0.., or model-0.. when combined) and detached in
the Ray namespace `lodestar-<fleet>`, so they outlive every gateway. Every gateway runs a
`FleetKeeper`, and one at a time keeps the fleet: the holder of the state-store lease
`fleet:<fleet>:owner`. Each turn (a third of the lease) the holder creates the actors that are
missing, kills those beyond the configured count and replaces any built from another config (a
release upgraded to other models); the others only try for the lease, so when the keeping
gateway dies another takes over within a lease. Creating is idempotent (`get_if_exists`), so two
keepers for a moment cannot double the fleet. Gateways find the actors by name
(`RayWorkerPool.ready`), whoever created them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group

from lodestar.orchestrator.state_store import StateStore, StateStoreUnavailable
from lodestar.orchestrator.worker_pool import (
    FLEET_ACTOR,
    PoolConfig,
    actor_spec,
    create_actor,
    fleet_group,
    fleet_layout,
    fleet_lease,
    fleet_namespace,
)

log = logging.getLogger(__name__)

PROBE_S = 2.0
"""Most the keeper waits for the actors' `info()` (all at once, and at most a quarter of its
lease, so a turn never outlasts the lease) to read their specs; one that is loading or
restarting does not answer in time and is judged on a later turn."""
NAME_FREED_S = 30.0
"""How long a killed actor's name may take to be free for its successor."""


@dataclass
class Reconciled:
    """What one keeper turn changed, by actor name."""

    created: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    """Beyond the configured count."""
    replaced: list[str] = field(default_factory=list)
    """Built from another config; also in `created`."""

    def __bool__(self) -> bool:
        return bool(self.created or self.removed)


class FleetKeeper:
    """Tries for the fleet's owner lease every `lease_s / 3` and, while it holds it, reconciles
    the fleet to `config`. `start()` runs the first turn before returning."""

    def __init__(self, config: PoolConfig, store: StateStore, owner: str, lease_s: float) -> None:
        if config.fleet is None:
            raise ValueError("a FleetKeeper needs PoolConfig.fleet")
        self.config = config
        self.fleet = config.fleet
        self.store = store
        self.owner = owner
        self.lease_s = lease_s
        self.held = False
        """Whether this keeper held the owner lease at its last turn."""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.turn()
        self._task = asyncio.create_task(self._keep(), name=f"fleet-{self.fleet}-keeper")

    async def stop(self) -> None:
        """Stop keeping; hand the lease back so another gateway keeps the fleet at once. The
        actors stay."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.held:
            with contextlib.suppress(StateStoreUnavailable):
                await self.store.release_lease(fleet_lease(self.fleet), self.owner)
            self.held = False

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await self.turn()

    async def turn(self) -> Reconciled | None:
        """Take or renew the lease; if held, reconcile. None when not held."""
        try:
            held = await self.store.hold_lease(fleet_lease(self.fleet), self.owner, self.lease_s)
        except StateStoreUnavailable as e:
            log.warning("fleet %s: owner lease not renewed (%s)", self.fleet, e)
            held = False
        if held != self.held:
            log.info("fleet %s: %s keeps it now", self.fleet, self.owner if held else "another")
        self.held = held
        if not held:
            return None
        try:
            changes = await reconcile(self.config, min(PROBE_S, self.lease_s / 4))
        except Exception:  # a Ray hiccup: the next turn tries again
            log.exception("fleet %s: reconcile failed", self.fleet)
            return None
        if changes:
            log.info(
                "fleet %s: created %s, removed %s (replaced %s)",
                self.fleet,
                changes.created,
                changes.removed,
                changes.replaced,
            )
        return changes


def fleet_actors(fleet: str) -> list[str]:
    """Names of the fleet's actors that Ray knows now (blocking: a GCS call)."""
    namespace = fleet_namespace(fleet)
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        a["name"] for a in named if a["namespace"] == namespace and FLEET_ACTOR.fullmatch(a["name"])
    )


async def reconcile(config: PoolConfig, probe_s: float = PROBE_S) -> Reconciled:
    """Make the fleet what `config` says: every actor of its layout, built from it, and no
    other (see the module's docstring)."""
    assert config.fleet is not None
    namespace = fleet_namespace(config.fleet)
    wanted = dict(fleet_layout(config))
    present = await asyncio.to_thread(fleet_actors, config.fleet)
    changes = Reconciled()
    for name in present:
        if name not in wanted:
            await asyncio.to_thread(remove_actor, namespace, name)
            changes.removed.append(name)
    kept = [name for name in present if name in wanted]
    infos = await asyncio.gather(*(_probe(namespace, name, probe_s) for name in kept))
    for name, info in zip(kept, infos, strict=True):
        if info is not None and info.get("spec") != actor_spec(config, wanted[name]):
            await asyncio.to_thread(remove_actor, namespace, name)
            changes.replaced.append(name)
    for name, roles in wanted.items():
        if name not in present or name in changes.replaced:
            create_actor(config, roles, name)
            changes.created.append(name)
    return changes


async def _probe(namespace: str, name: str, timeout_s: float) -> dict[str, Any] | None:
    try:
        async with asyncio.timeout(timeout_s):
            return await ray.get_actor(name, namespace=namespace).info.remote()
    except Exception:  # loading, restarting or gone: not judged this turn
        return None


def remove_actor(namespace: str, name: str) -> None:
    """Kill a fleet actor for good, remove its placement group, and wait until its name is free
    (a successor created earlier would get the dying actor back)."""
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    deadline = time.monotonic() + NAME_FREED_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            break
        time.sleep(0.1)
    group = fleet_group(name)
    if group is not None:
        remove_placement_group(group)


def fleet_down(fleet: str) -> list[str]:
    """Kill every actor of the fleet (and their placement groups): `lodestar fleet down`. The
    gateways of the release must be stopped first, or the next keeper turn starts it again."""
    namespace = fleet_namespace(fleet)
    names = fleet_actors(fleet)
    for name in names:
        remove_actor(namespace, name)
    return names
