"""One model fleet per release, shared by every gateway (`lodestar serve --fleet NAME`).

The keeper and the pool on a local Ray first (one keeper at a time, the count and config
reconciled, a replaced actor followed by name), then end to end on a Ray cluster started the
way KubeRay starts its pods: a head (`--num-cpus=0`) and a worker joined
with `ray start`, token auth on. Each gateway runs as the chart's gateway pod does: a Ray node of
its own (`ray start --address=<head> --num-cpus=0 --num-gpus=0`), then `lodestar serve
--ray-address auto` (no Ray Client). Both gateways share one private redis-server.

On one machine Ray attaches every driver to the head's raylet (it prefers the head among the
local nodes; a pod has only its own), so the gateway nodes here prove the topology, not the
attachment. Figures (actors counted, searches resumed, time to resume) are printed with -s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from lodestar.orchestrator.driver import OrchestratorConfig
from lodestar.orchestrator.fleet import FleetKeeper, fleet_actors, fleet_down
from lodestar.orchestrator.state_store import (
    JobSpec,
    JobStatus,
    MemoryStateStore,
    open_state_store,
)
from lodestar.orchestrator.state_store.redis_keys import lease_key
from lodestar.orchestrator.worker_pool import (
    PoolConfig,
    RayWorkerPool,
    fleet_lease,
    fleet_namespace,
    stable_index,
)
from lodestar.services.cli import app
from lodestar.services.local_redis import LocalRedis, free_port
from lodestar.services.runtime import RuntimeConfig, open_runtime
from lodestar.v1 import search_pb2 as pb
from lodestar.v1 import search_pb2_grpc as pb_grpc
from lodestar.workers.factory import ModelConfig
from lodestar.workers.messages import ExtendRequest, StepOutput
from tests.runtime_parts import assert_same_results, comparable, problem_specs
from tests.test_distributed import wait_for_checkpoints

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLEET = "e2e"
POLICY_WORKERS, REWARD_WORKERS = 2, 1
LEASE_S = 2.0
"""The gateways' search and fleet leases (`--lease-s`): what a resume waits for at most."""
LONG = dict(ops=4, params={"n": 48})
"""The searches a kill lands in the middle of: 4 operations (5 steps or so), 48 particles."""


# -- configuration ----------------------------------------------------------------------------


def test_a_fleet_is_refused_without_a_shared_store_or_a_usable_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a Redis store"):
        RuntimeConfig(pool=PoolConfig(fleet="demo"))
    with pytest.raises(ValueError, match="not with in-process"):
        RuntimeConfig(pool=PoolConfig(fleet="demo"), in_process=True, store_url="redis://x:1/0")
    for bad in ("Demo", "demo_1", "-demo", "d" * 64, ""):
        with pytest.raises(ValueError, match="fleet name"):
            PoolConfig(fleet=bad)
    PoolConfig(fleet="lodestar-prod-2")  # a release name
    problems = tmp_path / "problems.jsonl"
    problems.write_text('"1+2"\n')
    run = ["batch", "run", str(problems), "-o", str(tmp_path / "out.jsonl")]  # as serve parses
    refused = CliRunner().invoke(app, [*run, "--fleet", "demo"], env={"LODESTAR_REDIS_URL": ""})
    assert refused.exit_code == 2 and "needs a Redis store" in refused.output
    from_env = CliRunner().invoke(app, run, env={"LODESTAR_FLEET": "Bad"})
    assert from_env.exit_code == 2 and "fleet name" in from_env.output


# -- the keeper and the pool on a local Ray ---------------------------------------------------


def test_one_keeper_at_a_time_reconciles_the_fleet_and_pools_find_it_by_name(ray_cluster) -> None:
    """Two gateways' keepers and pools on one store: the lease holder creates the layout and
    the other only finds it; both pools place a search on the same actors; a pool's shutdown
    leaves them. The keeper after them, with a smaller fleet built otherwise, removes the
    surplus actor and replaces the others; a pool still holding a replaced actor follows its
    name to the successor. `fleet_down` ends the fleet."""
    fleet = "unit"
    config = PoolConfig(fleet=fleet, policy_workers=2, threads=1, fleet_wait_s=120)
    smaller = dataclasses.replace(config, policy_workers=1, max_task_retries=3)

    async def main() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with MemoryStateStore() as store:
            keepers = [FleetKeeper(config, store, f"gw-{i}", lease_s=30) for i in range(2)]
            for k in keepers:
                await k.start()
            seen["held"] = [k.held for k in keepers]
            pools = [RayWorkerPool(config) for _ in keepers]
            for p in pools:
                await p.ready()
            seen["ids"] = [[m.handle._actor_id for m in p.members] for p in pools]
            seen["names"] = fleet_actors(fleet)
            placed = []
            for sid in (f"search-{i}" for i in range(16)):
                for p in pools:
                    p.scope(sid)
                placed.append([p._assigned[sid][0].name for p in pools])
                for p in pools:
                    await p.release(sid)
            seen["placed"] = placed
            pools[1].shutdown()
            seen["after shutdown"] = fleet_actors(fleet)
            await keepers[0].stop()  # the lease handed back: the other keeps it now
            await keepers[1].turn()
            seen["handed over"] = keepers[1].held
            await keepers[1].stop()
            upgraded = FleetKeeper(smaller, store, "gw-new", lease_s=30)
            seen["changes"] = await upgraded.turn()
            seen["after upgrade"] = fleet_actors(fleet)
            member = pools[0].policy_members[0]
            old = member.handle._actor_id
            request = ExtendRequest("follow", None, "(1+2)*3", (), 0)
            seen["followed"] = await member._extend([request])
            seen["moved"] = member.handle._actor_id != old
            pools[0].shutdown()
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        downed = fleet_down(fleet)
    assert seen["held"] == [True, False]
    assert seen["ids"][0] == seen["ids"][1] and len(seen["ids"][0]) == 3
    assert seen["names"] == seen["after shutdown"] == ["policy-0", "policy-1", "reward-0"]
    assert all(a == b for a, b in seen["placed"])  # both gateways, the same actor
    assert {a for a, _ in seen["placed"]} == {"policy-0", "policy-1"}  # spread by the hash
    assert seen["handed over"]
    changes = seen["changes"]
    assert changes.removed == ["policy-1"] and changes.replaced == ["policy-0", "reward-0"]
    assert sorted(changes.created) == ["policy-0", "reward-0"]
    assert seen["after upgrade"] == ["policy-0", "reward-0"]
    assert seen["moved"] and isinstance(seen["followed"][0], StepOutput)
    assert downed == ["policy-0", "reward-0"] and fleet_actors(fleet) == []


def test_a_tensor_parallel_fleet_actor_keeps_a_detached_group_until_fleet_down(ray_cluster) -> None:
    """The policy's placement group (one bundle per rank) outlives the gateway that made it, is
    found by name by the next keeper turn (no second group), and goes with `fleet_down`."""
    ray = ray_cluster
    fleet = "tp"
    config = PoolConfig(models=ModelConfig(engine="auto", tensor_parallel_size=2), fleet=fleet)

    def groups() -> dict[str, dict[str, Any]]:
        table = ray.util.placement_group_table().items()
        return {k: v for k, v in table if v["state"] != "REMOVED" and v["name"] == "policy-0-tp"}

    async def main() -> tuple[list[dict[str, Any]], Any, dict[str, Any]]:
        async with MemoryStateStore() as store:
            keeper = FleetKeeper(config, store, "gw", lease_s=30)
            await keeper.start()
            pool = RayWorkerPool(config)
            try:
                infos = await pool.ready()
            finally:
                await keeper.stop()
                pool.shutdown()
            after = FleetKeeper(config, store, "gw-next", lease_s=30)
            return infos, await after.turn(), groups()

    try:
        infos, again, kept = asyncio.run(main())
    finally:
        fleet_down(fleet)
    (group_id,) = kept
    assert kept[group_id]["bundles"] == {0: {"CPU": 1.0}, 1: {"CPU": 1.0}}
    placed = {tuple(i["roles"]): i["placement_group_id"] for i in infos}
    assert placed == {("policy",): group_id, ("reward",): None}
    assert again is not None and not again  # held, nothing to change
    deadline = time.monotonic() + 30
    while groups():
        assert time.monotonic() < deadline, "fleet_down left the group"
        time.sleep(0.1)


# -- end to end on a cluster started like KubeRay's -------------------------------------------


class RayNode:
    """`ray start --block` as a KubeRay pod runs it; stopped and killed by its process group.
    Returns once the node is up: nodes started at the same moment on one machine race for the
    session's socket names (a raylet aborted on a taken plasma socket), pods never do."""

    def __init__(self, flags: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", *flags],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (text := log.read_text()):
            assert self.proc.poll() is None and time.monotonic() < deadline, text[-3000:]
            time.sleep(0.2)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()


class Gateway:
    """A gateway pod: its Ray node, then `lodestar serve --fleet` on it."""

    def __init__(self, name: str, gcs: int, ports: str, env: dict[str, str], logs: Path):
        self.name = name
        self.env = env
        self.logs = logs
        flags = [f"--address=127.0.0.1:{gcs}", "--num-cpus=0", "--num-gpus=0", *node_ports(ports)]
        self.node = RayNode(flags, env, logs / f"node-{name}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.owner = ""
        self.actors: dict[str, str] = {}
        """The fleet's actors as this gateway found them: name -> Ray actor id."""

    def serve(self, redis_url: str) -> None:
        self.log = log = self.logs / f"gateway-{self.name}.log"
        argv = [
            *(str(BIN / "lodestar"), "serve", "--port", str(self.port), "--threads", "1"),
            *("--fleet", FLEET, "--ray-address", "auto", "--redis", redis_url),
            *("--lease-s", str(LEASE_S), "--max-live", "16"),
            *("--policy-workers", str(POLICY_WORKERS), "--reward-workers", str(REWARD_WORKERS)),
        ]
        with log.open("a") as out:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout_s: float = 240) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while not re.search(r"SERVING on", text := self.log.read_text()):
            assert self.proc.poll() is None, text[-3000:]
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(0.2)
        found = re.search(rf"fleet {FLEET} as (\S+) \(kept by", text)
        assert found, text[-3000:]
        self.owner = found.group(1)
        namespace = re.escape(fleet_namespace(FLEET))
        self.actors = dict(re.findall(rf"fleet actor {namespace}/(\S+) ([0-9a-f]+)", text))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """As a pod dies: the server and its Ray node, SIGKILL, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.node.kill()

    def stop(self) -> int | None:
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(60)
        self.node.stop()
        self.node.wait()
        return code


def node_ports(ports: str) -> list[str]:
    """Every Ray node on this machine gets its own worker-port range (and no dashboard agent
    port clash): KubeRay pods each have their own network namespace."""
    low, high = ports.split("-")
    return [f"--min-worker-port={low}", f"--max-worker-port={high}"]


def pod_env(token: str, gcs: int) -> dict[str, str]:
    """A pod's environment: none of this process's Ray driver settings, token auth as the
    chart's authOptions sets it, and the head's address where `auto` looks first (on a pod
    `ray start` leaves it in /tmp/ray; here that file may belong to another test's cluster)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "LODESTAR_")) and k != "PYTHONBREAKPOINT"
    }
    return env | dict(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ADDRESS=f"127.0.0.1:{gcs}")


def probe(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.fleet_probe", FLEET],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_for_nodes(env: dict[str, str], count: int, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            seen = probe(env)
            if len(seen["nodes"]) >= count:
                return seen
        except AssertionError:
            pass  # the head's GCS is not up yet
        assert time.monotonic() < deadline, f"fewer than {count} Ray nodes came up"
        time.sleep(1)


def request(spec: JobSpec) -> pb.SearchRequest:
    return pb.SearchRequest(
        problem=pb.Problem(text=spec.problem),
        params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=spec.params["n"])),
        seed=spec.seed,
        search_id=spec.search_id,
    )


async def search(address: str, spec: JobSpec) -> pb.SearchResult:
    async with grpc.aio.insecure_channel(address) as channel:
        return await pb_grpc.SearchServiceStub(channel).Search(request(spec), timeout=300)


async def followed_to_end(address: str, search_id: str, timeout_s: float = 300) -> pb.SearchStatus:
    """A search's status from a gateway, polled until it has finished (wherever it ran)."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        while True:
            status = await stub.GetSearch(pb.GetSearchRequest(search_id=search_id), timeout=10)
            if status.state not in (pb.SEARCH_STATE_QUEUED, pb.SEARCH_STATE_RUNNING):
                return status
            assert time.monotonic() < deadline, f"{search_id} never finished"
            await asyncio.sleep(0.1)


def routed_to(index: int, count: int, prefix: str, **kwargs: Any) -> list[JobSpec]:
    """`count` searches whose ids hash to policy actor `index` (`RayWorkerPool.scope`)."""
    specs = problem_specs(8 * count, prefix, **kwargs)
    mine = [s for s in specs if stable_index(s.search_id, POLICY_WORKERS) == index]
    assert len(mine) >= count
    return mine[:count]


def undisturbed(specs: list[JobSpec]) -> list[dict[str, Any]]:
    """Each search alone, in this process, through the same intake and orchestrator."""

    async def main() -> list[dict[str, Any]]:
        config = RuntimeConfig(in_process=True, orchestrator=OrchestratorConfig(max_live=1))
        async with open_runtime(config) as runtime:
            await runtime.start()
            solve = runtime.orchestrator.solve
            return [comparable((await solve(s)).result) for s in specs]

    return asyncio.run(main())


@pytest.mark.slow
@pytest.mark.integration
def test_gateways_share_one_fleet_and_survive_a_dead_gateway_and_a_dead_actor(
    redis_server: LocalRedis, tmp_path: Path
) -> None:
    """Two gateways, one fleet: exactly the configured actors (not one set per gateway), found
    by both; searches through both succeed. A fleet actor SIGKILLed mid-search restarts in
    place (same actor, new process), its searches finish, and both gateways use the new one.
    The gateway keeping the fleet SIGKILLed mid-search (with its Ray node): the other keeps
    serving, resumes the dead one's searches from their Redis checkpoints on the same actors,
    and takes over the fleet's lease; the actors are untouched. Every result equals the
    undisturbed run's. Then `lodestar fleet down` removes the fleet."""
    redis_server.restart()
    token = secrets.token_hex(16)
    gcs = free_port()
    env = pod_env(token, gcs)
    temp_dir = tempfile.mkdtemp(prefix="lsf-", dir="/tmp")  # a Ray of our own, short socket paths
    nodes: list[RayNode] = []
    gateways: list[Gateway] = []
    figures: dict[str, Any] = {}
    ran: list[JobSpec] = []
    try:
        head = [
            *("--head", f"--port={gcs}", "--num-cpus=0", f"--temp-dir={temp_dir}"),
            *("--include-dashboard=false", *node_ports("27000-27999")),
        ]
        nodes.append(RayNode(head, env, tmp_path / "node-head.log"))
        worker = [f"--address=127.0.0.1:{gcs}", "--num-cpus=4", *node_ports("28000-28999")]
        nodes.append(RayNode(worker, env, tmp_path / "node-worker.log"))
        for name, ports in (("a", "29000-29999"), ("b", "30000-30999")):
            gateways.append(Gateway(name, gcs, ports, env, tmp_path))
        cluster = wait_for_nodes(env, 4)
        worker_node = next(n for n, cpus in cluster["nodes"].items() if cpus == 4)
        started = time.monotonic()
        for g in gateways:
            g.serve(redis_server.url)
        for g in gateways:
            g.wait_serving()
        figures["gateways up (s)"] = round(time.monotonic() - started, 1)

        # -- one fleet, the configured size, found by both -----------------------------------
        seen = probe(env)
        wanted = sorted(
            [f"policy-{i}" for i in range(POLICY_WORKERS)]
            + [f"reward-{i}" for i in range(REWARD_WORKERS)]
        )
        hosts = seen["hosts"]
        figures["model actors in the cluster"] = len(hosts)
        assert sorted(seen["fleet"]) == wanted
        assert len(hosts) == POLICY_WORKERS + REWARD_WORKERS  # not once per gateway
        assert all(h["detached"] and h["node"] == worker_node for h in hosts)
        assert gateways[0].actors == gateways[1].actors == seen["fleet"]

        results: list[dict[str, Any]] = []

        async def phases() -> None:
            a, b = gateways
            leases = aioredis.from_url(redis_server.url)
            key = lease_key("lodestar", fleet_lease(FLEET))  # lodestar:fleet:e2e:owner
            async with open_state_store(redis_server.url) as store:
                # -- searches through both gateways -----------------------------------------
                shared = problem_specs(6, "shared")
                outs = await asyncio.gather(
                    *(search((a, b)[i % 2].address, s) for i, s in enumerate(shared))
                )
                assert all(o.final_answer for o in outs)
                ran.extend(shared)

                # -- a fleet actor dies mid-search ------------------------------------------
                seen = probe(env)
                victim = seen["hosts"][0]
                assert victim["name"] == "policy-0"
                spared = seen["stats"]["policy-1"]["policy"]["requests"]
                doomed = routed_to(0, 4, "actor-kill", **LONG)
                calls = [
                    asyncio.ensure_future(search((a, b)[i % 2].address, s))
                    for i, s in enumerate(doomed)
                ]
                await wait_for_checkpoints(store, doomed, timeout_s=120)
                killed = time.monotonic()
                os.kill(victim["pid"], signal.SIGKILL)
                hit = [s for s in doomed if not (await store.get_job(s.search_id)).status.finished]
                assert hit, "every search finished before the kill: make them longer"
                outs = await asyncio.gather(*calls)
                assert all(o.final_answer for o in outs)
                figures["searches running on the killed actor, finished"] = len(hit)
                figures["killed actor: its searches done after (s)"] = round(
                    time.monotonic() - killed, 2
                )
                seen = probe(env)
                # both gateways sent these searches to policy-0 alone (by the hash of their ids)
                assert seen["stats"]["policy-1"]["policy"]["requests"] == spared
                after = {h["name"]: h for h in seen["hosts"]}
                reborn = after["policy-0"]
                assert reborn["id"] == victim["id"] and reborn["pid"] != victim["pid"]
                assert reborn["restarts"] == victim["restarts"] + 1
                figures["policy-0 restarts"] = reborn["restarts"]
                ran.extend(doomed)
                # every gateway is served by the new process
                later = routed_to(0, 2, "after-restart")
                outs = await asyncio.gather(
                    search(a.address, later[0]), search(b.address, later[1])
                )
                assert all(o.final_answer for o in outs)
                ran.extend(later)

                # -- the gateway keeping the fleet dies mid-search ------------------------------
                keeper_id = await leases.get(key)
                keeper = next(g for g in gateways if g.owner.encode() == keeper_id)
                other = b if keeper is a else a
                on_keeper = problem_specs(4, "gateway-kill", **LONG)
                on_other = problem_specs(2, "beside-kill", **LONG)
                before_kill = probe(env)["hosts"]
                to_keeper = [asyncio.ensure_future(search(keeper.address, s)) for s in on_keeper]
                to_other = [asyncio.ensure_future(search(other.address, s)) for s in on_other]
                await wait_for_checkpoints(store, on_keeper, timeout_s=120)
                keeper.kill()
                killed = time.monotonic()
                stopped_at = {}  # the dead gateway's unfinished searches: generation at death
                for s in on_keeper:
                    record = await store.get_job(s.search_id)
                    assert record.owner == keeper.owner
                    if not record.status.finished:
                        stopped_at[s.search_id] = (await store.load_checkpoint(s.search_id))[0]
                assert stopped_at, "every search finished before the kill: make them longer"
                claimed: dict[str, float] = {}
                stepped_on: dict[str, float] = {}
                took_lease = None
                while len(stepped_on) < len(stopped_at):
                    now = time.monotonic() - killed
                    for sid, generation in stopped_at.items():
                        record = await store.get_job(sid)
                        if sid not in claimed and record.owner == other.owner:
                            claimed[sid] = now
                        if sid in claimed and sid not in stepped_on:
                            checkpoint = await store.load_checkpoint(sid)
                            if record.status.finished or checkpoint[0] > generation:
                                stepped_on[sid] = now
                    if took_lease is None and await leases.get(key) == other.owner.encode():
                        took_lease = now
                    assert now < 60, f"not resumed: claimed {claimed}, stepped {stepped_on}"
                    await asyncio.sleep(0.05)
                for call in to_keeper:  # the dead gateway's clients lost their connection
                    with pytest.raises(grpc.aio.AioRpcError):
                        await call
                outs = await asyncio.gather(*to_other)  # the other one kept serving
                assert all(o.final_answer for o in outs)
                finals = [await followed_to_end(other.address, s.search_id) for s in on_keeper]
                assert all(f.state == pb.SEARCH_STATE_SUCCEEDED for f in finals)
                figures["searches resumed"] = len(stopped_at)
                figures["time to resume: claimed after (s)"] = round(max(claimed.values()), 2)
                figures["time to resume: first new step after (s)"] = round(
                    max(stepped_on.values()), 2
                )
                while took_lease is None:
                    if await leases.get(key) == other.owner.encode():
                        took_lease = time.monotonic() - killed
                    assert time.monotonic() - killed < 30, "the fleet's lease was never taken over"
                    await asyncio.sleep(0.1)
                figures["fleet lease taken over after (s)"] = round(took_lease, 2)
                untouched = probe(env)["hosts"]
                assert [(h["id"], h["pid"], h["restarts"]) for h in untouched] == [
                    (h["id"], h["pid"], h["restarts"]) for h in before_kill
                ]
                ran.extend(on_keeper)
                ran.extend(on_other)
                for s in ran:
                    record = await store.get_job(s.search_id)
                    assert record.status is JobStatus.SUCCEEDED, (s.search_id, record)
                    results.append(comparable(record.result))
            await leases.aclose()

        asyncio.run(phases())
        survivor = next(g for g in gateways if g.proc is not None and g.proc.poll() is None)
        assert survivor.stop() == 0, survivor.log.read_text()[-3000:]
        down = subprocess.run(
            [str(BIN / "lodestar"), "fleet", "down", "--fleet", FLEET, "--ray-address", "auto"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert f"killed {len(wanted)} actor(s)" in down.stdout
        gone = probe(env)
        assert gone["fleet"] == {} and gone["hosts"] == []
    finally:
        for g in gateways:
            g.kill()
        for node in nodes:
            node.stop()
        for node in nodes:
            node.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert_same_results(results, undisturbed(ran))
    figures["results equal to undisturbed runs"] = len(results)
    print("\nfleet figures: " + json.dumps(figures))
