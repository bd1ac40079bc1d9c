"""The Helm chart, proved without a cluster (none can run here): strict lint, offline renders with
the default and the GPU values, every core object against Kubernetes' API schema, every Ray object
against KubeRay's CRD schema, bad values rejected with a message naming the key, and the rendered
commands are the real `lodestar` CLI, run against a Ray cluster started the way KubeRay starts it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import typer
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lodestar.orchestrator.algorithms.registry import ALGORITHMS
from lodestar.services.cli import app
from lodestar.services.local_redis import LocalRedis, free_port
from lodestar.services.server import LIVENESS
from lodestar.v1 import search_pb2 as pb
from lodestar.v1 import search_pb2_grpc as pb_grpc
from tests.helm_chart import (
    CHART,
    KUBE_VERSIONS,
    ROOT,
    as_pod_template,
    closed,
    core_errors,
    crd_errors,
    crd_schema,
    env_of,
    gpu_values,
    lint,
    one,
    pod_labels,
    ray_pod_templates,
    render,
    secret_values,
    selects,
)

VALUE_SETS = {"default": None, "gpu": "gpu"}


def chart_defaults() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def values_for(name: str | None) -> dict[str, Any] | None:
    return gpu_values() if name == "gpu" else None


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(values_for(VALUE_SETS[request.param]))


# -- lint and schemas -------------------------------------------------------------------------


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_chart_lints_clean_in_strict_mode(values: str) -> None:
    assert lint(values_for(VALUE_SETS[values])) == []


def test_renders_the_expected_objects(rendered) -> None:
    name, docs = rendered
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    expected = [
        "Deployment/lodestar-gateway",
        "RayCluster/lodestar-ray",
        "Secret/lodestar",
        "Service/lodestar",
        "Service/lodestar-redis",
        "StatefulSet/lodestar-redis",
    ]
    if name == "gpu":  # two gateway replicas get a PDB; the batch and NetworkPolicies are on
        expected += ["PodDisruptionBudget/lodestar-gateway", "RayJob/lodestar-batch"]
        expected += [f"NetworkPolicy/lodestar-{c}" for c in ("ray", "gateway", "redis")]
    assert kinds == sorted(expected)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_core_objects_and_ray_pod_templates_are_valid_kubernetes(rendered, version: str) -> None:
    _, docs = rendered
    errors = []
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            for where, template in ray_pod_templates(doc):
                errors += [f"{where}: {e}" for e in core_errors(as_pod_template(template), version)]
        else:
            errors += core_errors(doc, version)
    assert errors == []


def test_ray_objects_match_the_kuberay_crd_schema(rendered) -> None:
    _, docs = rendered
    ray_docs = [d for d in docs if d["apiVersion"] == "ray.io/v1"]
    assert ray_docs
    assert [e for d in ray_docs for e in crd_errors(d)] == []


def test_the_checks_catch_what_the_api_server_would_reject_or_silently_drop() -> None:
    """The validators are not vacuous: a wrong type, a misspelt CRD field (the API server would
    prune it) and an unknown pod-template field all fail."""
    cluster = one(render(), "RayCluster")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "2"
    cluster["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePull"] = "Always"
    errors = crd_errors(cluster)
    assert any("maxReplicas" in e and "not of type 'integer'" in e for e in errors), errors
    assert any("'minReplica' was unexpected" in e for e in errors), errors
    template = cluster["spec"]["headGroupSpec"]["template"]
    assert "'imagePull' was unexpected" in core_errors(as_pod_template(template), "1.31.0")[0]
    schema = closed(crd_schema("RayCluster"))
    assert schema["properties"]["spec"]["additionalProperties"] is False
    trimmed = schema["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    assert "additionalProperties" not in trimmed  # preserved-unknown stays open (checked as core)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gateway": {"replica": 2}}, "at '/gateway': additional properties 'replica' not allowed"),
        ({"actors": {"numGpus": "one"}}, "at '/actors/numGpus': got string, want number"),
        ({"actors": {"tensorParallelSize": 0}}, "at '/actors/tensorParallelSize'"),
        ({"actors": {"gpuMemoryUtilization": 1.5}}, "at '/actors/gpuMemoryUtilization'"),
        ({"actors": {"gpuMemoryUtilization": 0}}, "at '/actors/gpuMemoryUtilization'"),
        ({"actors": {"maxModelLen": 0}}, "at '/actors/maxModelLen'"),
        ({"actors": {"maxModelLen": 4096.5}}, "at '/actors/maxModelLen'"),
        ({"worker": {"groupName": "GPU_1"}}, "at '/worker/groupName'"),
        ({"batch": {"algorithm": "pff"}}, "at '/batch/algorithm'"),
        (
            {"additionalWorkerGroups": {"gpu": {"replicas": 1, "tolerration": []}}},
            "additional properties 'tolerration' not allowed",
        ),
        ({"redis": {"persistence": {"enabled": "yes"}}}, "at '/redis/persistence/enabled'"),
        ({"redis": {"persistence": {"size": "2 GB"}}}, "at '/redis/persistence/size'"),
        ({"gateway": {"tls": {"secret": "x"}}}, "additional properties 'secret' not allowed"),
        ({"gateway": {"tls": {"secretName": "My_TLS"}}}, "at '/gateway/tls/secretName'"),
        ({"networkPolicy": {"gatewayFrom": {"ns": "x"}}}, "at '/networkPolicy/gatewayFrom'"),
    ],
)
def test_bad_values_fail_lint_and_install_with_a_message_naming_the_key(
    tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    values_file = tmp_path / "values.yaml"  # as an operator would pass with -f
    values_file.write_text(yaml.safe_dump(values))
    loaded = yaml.safe_load(values_file.read_text())
    assert any(message in finding for finding in lint(loaded)), lint(loaded)
    with pytest.raises(Exception, match="schema") as info:
        render(loaded)
    assert message in str(info.value)


def test_values_schema_knows_every_algorithm() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["batch"]["properties"]["algorithm"]["enum"]) == set(ALGORITHMS)


# -- the rendered commands are the real CLI ----------------------------------------------------


def parse(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse `lodestar ...` argv with the real command line (typer's own click, so by duck type);
    (command path, the command's parsed parameters). A bad flag raises a usage error."""
    assert argv[0] == "lodestar", argv
    command = typer.main.get_command(app)
    path, rest = ["lodestar"], list(argv[1:])
    while hasattr(command, "commands"):
        name, rest = rest[0], rest[1:]
        assert name in command.commands, f"no command {' '.join([*path, name])}"
        command = command.commands[name]
        path.append(name)
    return " ".join(path), command.make_context(path[-1], rest).params


def gateway_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return container


def test_gateway_runs_lodestar_serve_against_the_clusters_head_service(rendered) -> None:
    name, docs = rendered
    values = gpu_values() if name == "gpu" else chart_defaults()
    container = gateway_container(docs)
    command, params = parse(container["command"] + container["args"])
    cluster = one(docs, "RayCluster")
    assert command == "lodestar serve"
    assert params["ray_address"] == f"ray://{cluster['metadata']['name']}-head-svc:10001"
    assert params["host"] == "0.0.0.0"
    assert params["num_gpus"] == values["actors"]["numGpus"]
    assert params["policy_workers"] == values["actors"]["policyWorkers"]
    assert params["engine"] == values["actors"]["engine"] == ("vllm" if name == "gpu" else "hf")
    assert params["tensor_parallel_size"] == values["actors"]["tensorParallelSize"] == 1
    assert params["gpu_memory_utilization"] == 0.85  # unset (default) or set to the default (gpu)
    assert params["max_model_len"] is None
    # Probes hit a port the server binds: the gRPC port, or with TLS (Kubernetes' gRPC probes
    # speak none) the plaintext health port; liveness asks for the status loading never fails.
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert params["port"] == grpc_port
    tls_secret = values["gateway"].get("tls", {}).get("secretName")
    assert (params["tls_cert"] is not None) == bool(tls_secret) == (name == "gpu")
    probe_port = params["health_port"] if params["tls_cert"] else grpc_port
    assert container["readinessProbe"]["grpc"]["port"] == probe_port
    assert "service" not in container["readinessProbe"]["grpc"]  # overall status: models loaded
    assert container["livenessProbe"]["grpc"] == {"port": probe_port, "service": LIVENESS}
    service = one(docs, "Service", "gateway")
    assert {"name": "grpc", "targetPort": "grpc"}.items() <= service["spec"]["ports"][0].items()


def test_vllm_memory_settings_reach_the_gateway_and_batch_commands_only_when_set(
    tmp_path: Path,
) -> None:
    """actors.gpuMemoryUtilization / maxModelLen become --gpu-memory-utilization /
    --max-model-len of `lodestar serve` and `lodestar batch run`; unset, neither flag is there."""
    actors = {"engine": "vllm", "gpuMemoryUtilization": 0.6, "maxModelLen": 1_048_576}
    problems = tmp_path / "problems.jsonl"
    problems.write_text('"1+2"\n')
    batch = {"enabled": True, "input": str(problems), "output": str(tmp_path / "out.jsonl")}
    docs = render({"actors": actors, "batch": batch})
    gateway = gateway_container(docs)
    entrypoint = shlex.split(one(docs, "RayJob")["spec"]["entrypoint"])
    for argv in (gateway["command"] + gateway["args"], entrypoint):
        _, params = parse(argv)
        assert params["gpu_memory_utilization"] == 0.6
        assert params["max_model_len"] == 1_048_576  # an integer, not Go's 1.048576e+06
    plain = gateway_container(render())
    argv = plain["command"] + plain["args"]
    assert "--gpu-memory-utilization" not in argv and "--max-model-len" not in argv


def test_a_tls_secret_is_mounted_and_served_and_probes_move_to_the_plaintext_health_port() -> None:
    """gateway.tls.secretName: the Secret's tls.crt / tls.key are mounted where the rendered
    `lodestar serve --tls-cert/--tls-key` reads them; the probes use `--health-port`, which
    neither the Service nor the NetworkPolicy opens (the kubelet probes from the node)."""
    tls = {"secretName": "my-tls"}
    docs = render({"gateway": {"tls": tls}, "networkPolicy": {"enabled": True}})
    container = gateway_container(docs)
    _, params = parse(container["command"] + container["args"])
    cert, key = Path(params["tls_cert"]), Path(params["tls_key"])
    assert (cert.name, key.name) == ("tls.crt", "tls.key")  # a kubernetes.io/tls Secret's keys
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(cert.parent)]
    assert key.parent == cert.parent and mount["readOnly"] is True
    pod = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "my-tls" and "items" not in volume["secret"]
    probe = chart_defaults()["gateway"]["tls"]["probePort"]
    assert params["health_port"] == probe != params["port"]
    assert {"name": "probe", "containerPort": probe} in container["ports"]
    assert container["readinessProbe"]["grpc"] == {"port": probe}
    assert container["livenessProbe"]["grpc"] == {"port": probe, "service": LIVENESS}
    service = one(docs, "Service", "gateway")
    assert probe not in [p["port"] for p in service["spec"]["ports"]]
    policy = one(docs, "NetworkPolicy", "gateway")
    assert probe not in [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert [e for d in docs if d["kind"] != "RayCluster" for e in core_errors(d, "1.27.0")] == []

    plain = gateway_container(render())  # the default: plaintext, probes on the gRPC port
    _, params = parse(plain["command"] + plain["args"])
    assert params["tls_cert"] is params["tls_key"] is params["health_port"] is None
    assert plain["readinessProbe"]["grpc"] == {"port": params["port"]}
    assert not any(m["name"] == "tls" for m in plain["volumeMounts"])


def redis_command(docs: list[dict[str, Any]], port: int, data: Path) -> list[str]:
    """The chart's Redis container command, pointed at a port and folder of this machine."""
    (container,) = one(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    script = container["args"][0].replace("--port 6379", f"--port {port}")
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data")
    assert f"--dir {mount} " in script
    script = script.replace(f"--dir {mount} ", f"--dir {data} ") + " --bind 127.0.0.1"
    return [*container["command"], script]


@pytest.mark.parametrize("persistence", [True, False])
@pytest.mark.integration
def test_redis_keeps_an_append_only_file_on_a_volume_claim_by_default(
    tmp_path: Path, persistence: bool
) -> None:
    """On by default: AOF (fsync every second) in the data folder, which is a PersistentVolumeClaim.
    The rendered command, run here and SIGKILLed after a write, comes back with the write; with
    persistence off (an emptyDir, no AOF) the same restart comes back empty."""
    import redis

    values = None if persistence else {"redis": {"persistence": {"enabled": False}}}
    docs = render(values)
    spec = one(docs, "StatefulSet", "redis")["spec"]
    claims = spec.get("volumeClaimTemplates", [])
    volumes = spec["template"]["spec"].get("volumes", [])
    if persistence:
        (claim,) = claims
        size = chart_defaults()["redis"]["persistence"]["size"]
        assert claim["metadata"]["name"] == "data"
        assert claim["spec"]["resources"]["requests"]["storage"] == size
        assert not any(v["name"] == "data" for v in volumes)
    else:
        assert claims == [] and {"name": "data", "emptyDir": {}} in volumes

    password = secret_values(docs)[("lodestar", "redis-password")]
    port = free_port()
    argv = redis_command(docs, port, tmp_path)
    env = dict(os.environ, REDIS_PASSWORD=password)
    found = []
    for round_ in range(2):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            client = redis.Redis(port=port, password=password, socket_timeout=5)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    assert proc.poll() is None and time.monotonic() < deadline, "no redis"
                    time.sleep(0.05)
            if round_ == 0:
                client.set("search:1", "checkpoint")
            found.append(client.get("search:1"))
            client.close()
        finally:
            proc.kill()  # a crash, not a clean shutdown
            proc.wait(10)
    assert found == [b"checkpoint", b"checkpoint" if persistence else None]
    assert any(tmp_path.rglob("*.aof")) == persistence


def test_network_policies_select_their_pods_and_admit_the_releases_own() -> None:
    values = gpu_values()
    docs = render(values)
    pods = pod_labels(docs)
    assert set(pods) == {"gateway", "redis", "ray-head", "ray-worker", "batch-submitter"}
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    chosen = {
        name: sorted(c for c, labels in pods.items() if selects(spec["podSelector"], labels))
        for name, spec in policies.items()
    }
    assert chosen == {
        "lodestar-ray": ["ray-head", "ray-worker"],
        "lodestar-gateway": ["gateway"],
        "lodestar-redis": ["redis"],
    }
    for name in ("lodestar-ray", "lodestar-redis"):  # every pod of the release gets in
        same_namespace = [
            peer["podSelector"]
            for rule in policies[name]["ingress"]
            for peer in rule.get("from", [])
            if "namespaceSelector" not in peer
        ]
        admitted = {c for c, pod in pods.items() if any(selects(s, pod) for s in same_namespace)}
        assert admitted == set(pods), name
    operator_rules = [
        rule
        for rule in policies["lodestar-ray"]["ingress"]
        if any("namespaceSelector" in peer for peer in rule.get("from", []))
    ]
    (rule,) = operator_rules  # the KubeRay operator: the head's dashboard port only
    assert rule["ports"] == [{"port": 8265, "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert peer == values["networkPolicy"]["kuberayOperator"]
    (rule,) = policies["lodestar-gateway"]["ingress"]  # its ports, from the clients only
    assert sorted(p["port"] for p in rule["ports"]) == sorted(
        [values["gateway"].get("port", 50051), chart_defaults()["gateway"]["metrics"]["port"]]
    )
    assert rule["from"] == values["networkPolicy"]["gatewayFrom"]
    assert not any(d["kind"] == "NetworkPolicy" for d in render())  # off by default


def test_every_secret_reference_resolves_and_ray_auth_is_shared(rendered) -> None:
    _, docs = rendered
    secrets = secret_values(docs)
    containers = [gateway_container(docs)]
    for doc in docs:
        for _, template in ray_pod_templates(doc):
            containers += template["spec"]["containers"]
    envs = [env_of(c, secrets) for c in containers]  # KeyError if a reference dangles
    for env in envs:
        if env:  # the batch submitter has none: it only runs `ray job submit`
            assert env["LODESTAR_REDIS_PASSWORD"] and env["HF_HUB_OFFLINE"] == "1"
    gateway = envs[0]
    assert gateway["LODESTAR_AUTH_TOKEN"] and gateway["RAY_AUTH_MODE"] == "token"
    redis = one(docs, "Service", "redis")["metadata"]["name"]
    assert gateway["LODESTAR_REDIS_URL"] == f"redis://{redis}:6379/0"
    for doc in docs:
        if doc["apiVersion"] == "ray.io/v1":
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            # KubeRay injects this token into Ray pods; the gateway (a Ray client) gets the same.
            key = (spec["authOptions"]["secretName"], "auth_token")
            assert secrets[key] == gateway["RAY_AUTH_TOKEN"]


def test_worker_groups_run_the_gateways_image_and_see_the_same_models() -> None:
    """No second code path: Ray pods run `ray start` from the gateway's image (the GPU group may
    take the CUDA tag of the same repository), and the model directories the gateway names are
    mounted at the same path on every Ray pod, where the actors load them."""
    values = gpu_values()
    docs = render(values)
    gateway = gateway_container(docs)
    _, params = parse(gateway["command"] + gateway["args"])
    mount = chart_defaults()["models"]["mountPath"]
    assert str(params["policy"]).startswith(mount + "/") and params["reward"].startswith(mount)
    repository = gateway["image"].rsplit(":", 1)[0]
    for doc in (one(docs, "RayCluster"), one(docs, "RayJob")):
        for where, template in ray_pod_templates(doc):
            (container,) = template["spec"]["containers"]
            assert container["image"].rsplit(":", 1)[0] == repository, where
            assert "command" not in container and "args" not in container, where  # KubeRay's own
            if where == "submitter":
                continue
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get(mount) == "models", where
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "lodestar-models"
            if where.startswith("worker group gpu"):
                assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    cluster = one(docs, "RayCluster")["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no actor on the head
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["gpu"]  # cpu group disabled


@pytest.mark.integration
def test_batch_rayjob_runs_lodestar_batch_run_on_its_own_cluster(tmp_path: Path) -> None:
    values = gpu_values()
    problems = tmp_path / "problems.jsonl"
    problems.write_text('"1+2"\n')
    values["batch"] |= {"input": str(problems), "output": str(tmp_path / "out.jsonl")}
    values["batch"]["params"] = {"temperature": 0.8, "resample": "it's quoted"}
    job = one(render(values), "RayJob")
    command, params = parse(shlex.split(job["spec"]["entrypoint"]))
    assert command == "lodestar batch run"
    assert params["ray_address"] == "auto" and params["budget"] == 16
    assert sorted(params["param"]) == ['resample="it\'s quoted"', "temperature=0.8"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert chart_defaults()["batch"]["dataMountPath"] in mounts  # the entrypoint runs on the head


# -- the rendered commands, run --------------------------------------------------------------


class RayNode:
    """`ray start --block` as a KubeRay pod runs it (rayStartParams become flags)."""

    def __init__(self, params: dict[str, str], extra: list[str], env: dict[str, str]) -> None:
        flags = [f"--{key}={value}" for key, value in params.items()]
        argv = [str(Path(sys.executable).with_name("ray")), "start", "--block", *flags, *extra]
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def wait_for_nodes(address: str, count: int, env: dict[str, str], timeout_s: float = 60) -> None:
    script = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False);"
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            [sys.executable, "-c", script, address], env=env, capture_output=True, text=True
        )
        if out.returncode == 0 and int(out.stdout.strip().splitlines()[-1]) >= count:
            return
        assert time.monotonic() < deadline, out.stderr[-2000:]
        time.sleep(1)


def substitute(argv: list[str], replace: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        for old, new in replace.items():
            arg = arg.replace(old, new)
        out.append(arg)
    return out


def search_once(address: str, token: str) -> tuple[int, int, pb.SearchResult]:
    async def main() -> tuple[int, int, pb.SearchResult]:
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            ready = await health.Check(health_pb2.HealthCheckRequest(service=""))
            live = await health.Check(health_pb2.HealthCheckRequest(service=LIVENESS))
            request = pb.SearchRequest(
                problem=pb.Problem(text="(7+5)*3"),
                params=pb.AlgorithmParams(pf=pb.ParticleFilterParams(n=4)),
            )
            metadata = [("authorization", f"Bearer {token}")]
            result = await pb_grpc.SearchServiceStub(channel).Search(
                request, metadata=metadata, timeout=60
            )
            return ready.status, live.status, result

    return asyncio.run(main())


@pytest.mark.slow
@pytest.mark.integration
def test_rendered_gateway_and_batch_job_run_on_a_ray_cluster_started_like_kuberay(
    tmp_path: Path,
) -> None:
    """Head (`num-cpus 0`) and one worker started with `ray start` and the rendered rayStartParams,
    token auth on as authOptions sets it; then the rendered gateway command and environment
    (Secrets resolved from the rendered Secret, cluster DNS names pointed at this machine) serve a
    search from actors on the worker; then the rendered RayJob entrypoint solves a file."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text('"(1+2)*3"\n"4*5-6"\n')
    output = tmp_path / "results.jsonl"
    values = {
        "batch": {"enabled": True, "input": str(problems), "output": str(output), "budget": 2},
        "actors": {"threads": 1},
    }
    docs = render(values)
    secrets = secret_values(docs)
    cluster = one(docs, "RayCluster")
    gateway = gateway_container(docs)
    gateway_env = env_of(gateway, secrets)
    ray_env = dict(pod_env(), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=gateway_env["RAY_AUTH_TOKEN"])

    gcs, client, grpc_port = free_port(), free_port(), free_port()
    redis = LocalRedis(password=gateway_env["LODESTAR_REDIS_PASSWORD"])
    redis.start()
    head_params = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    worker_params = cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]
    head = RayNode(
        head_params,
        [
            *("--head", f"--port={gcs}", f"--ray-client-server-port={client}"),
            *("--include-dashboard=false", "--min-worker-port=22000", "--max-worker-port=22999"),
        ],
        ray_env,
    )
    nodes = [head]
    server = None
    try:
        wait_for_nodes(f"127.0.0.1:{gcs}", 1, ray_env)
        # Both nodes share this machine: keep their worker ports clear of 23000-23999, where the
        # head's Ray client proxier starts one server per client connection.
        worker_ports = ("--min-worker-port=24000", "--max-worker-port=24999")
        worker = RayNode(
            worker_params,
            [f"--address=127.0.0.1:{gcs}", "--num-cpus=4", *worker_ports],
            ray_env,
        )
        nodes.append(worker)
        wait_for_nodes(f"127.0.0.1:{gcs}", 2, ray_env)

        redis_host = one(docs, "Service", "redis")["metadata"]["name"]
        to_here = {
            f"{cluster['metadata']['name']}-head-svc:10001": f"127.0.0.1:{client}",
            f"{redis_host}:6379": f"127.0.0.1:{redis.port}",
            "0.0.0.0": "127.0.0.1",
            "50051": str(grpc_port),
            "9090": str(free_port()),
        }
        argv = substitute(gateway["command"] + gateway["args"], to_here)
        env = dict(pod_env(), **substitute_env(gateway_env, to_here))
        argv[0] = str(Path(sys.executable).with_name("lodestar"))
        server = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines = []
        deadline = time.monotonic() + 240  # a refused Ray client connection costs ~40 s a retry
        while not any("SERVING on" in line for line in lines):
            line = server.stdout.readline() if server.stdout else ""
            assert line or server.poll() is None, "".join(lines)[-3000:]
            lines.append(line)
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
        ready, live, result = search_once(
            f"127.0.0.1:{grpc_port}", gateway_env["LODESTAR_AUTH_TOKEN"]
        )
        assert ready == live == health_pb2.HealthCheckResponse.SERVING
        assert result.final_answer == "36"
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0

        job = one(docs, "RayJob")
        job_argv = substitute(shlex.split(job["spec"]["entrypoint"]), to_here)
        job_argv[0] = str(Path(sys.executable).with_name("lodestar"))
        job_env = dict(env, RAY_ADDRESS=f"127.0.0.1:{gcs}")  # what `auto` finds on a head pod
        done = subprocess.run(job_argv, env=job_env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        results = [json.loads(line) for line in output.read_text().splitlines()]
        assert sorted(r["line"] for r in results) == [1, 2]
        assert all(r["status"] == "succeeded" for r in results)
        assert all(r["final_answer"] for r in results)
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(10)
        for node in reversed(nodes):
            node.stop()
        redis.close()


def pod_env() -> dict[str, str]:
    """This process's environment without what a Ray driver (the session's `ray_cluster`
    fixture) put into it: a pod starts without those, and inherited they broke the head's Ray
    client server for the gateway's connection."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONBREAKPOINT"
    }


def substitute_env(env: dict[str, str], replace: dict[str, str]) -> dict[str, str]:
    return dict(zip(env, substitute(list(env.values()), replace), strict=True))


def test_dockerfile_matches_the_package_and_the_chart() -> None:
    """The image cannot be built here (no Docker engine): check what can drift instead."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = next(line.strip(' ",') for line in pyproject.splitlines() if '"torch==' in line)
    assert f"pip install {torch_pin} --index-url" in dockerfile
    uid = chart_defaults()["podSecurityContext"]["runAsUser"]
    assert f"--uid {uid}" in dockerfile and f"USER {uid}:" in dockerfile
    ignored = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()
    }
    package_dirs = {
        line.split("=")[1].strip(' "').split("/")[0]
        for line in pyproject.split("package-dir = {")[1].split("}")[0].split(",")
    }
    assert package_dirs and not package_dirs & ignored  # every package folder reaches the image
    assert "README.md" not in ignored  # pyproject's readme
    assert "wget" in dockerfile  # KubeRay's probes use it
