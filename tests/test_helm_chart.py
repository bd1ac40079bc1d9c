"""The Helm chart, proved without a cluster (none can run here): strict lint, offline renders with
the default and the GPU values, every core object against Kubernetes' API schema, every Ray object
against KubeRay's CRD schema, bad values rejected with a message naming the key, the topology (any
number of gateway pods, each a Ray node without resources, sharing one model fleet sized by
`actors`), and the rendered commands are the real `lodestar` and `ray start` CLIs, run against a
Ray cluster started the way KubeRay starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
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
    if name == "gpu":  # three gateway replicas get a PDB; the batch and NetworkPolicies are on
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
        (
            {"gateway": {"rayStartParams": {"num-cpus": "4"}}},
            "at '/gateway/rayStartParams/num-cpus'",
        ),
        ({"gateway": {"rayStartParams": {"block": "true"}}}, "at '/gateway/rayStartParams/block'"),
        (
            {"gateway": {"rayStartParams": {"object-store-memory": 1}}},
            "at '/gateway/rayStartParams/object-store-memory'",
        ),
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


def gateway_argv(container: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(`ray start` argv, `lodestar serve` argv) of the gateway container, which runs
    `sh -c 'ray start ... && exec lodestar serve "$@"' lodestar ARGS...`."""
    shell, flag, script, name = container["command"]
    assert (shell, flag, name) == ("sh", "-c", "lodestar"), container["command"]
    ray_start, serve = script.split(" && ")
    words = shlex.split(serve)
    assert words[:3] == ["exec", "lodestar", "serve"] and words[3:] == ["$@"], script
    return shlex.split(ray_start), [*words[1:3], *container["args"]]


def serve_params(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The gateway's `lodestar serve` parameters, parsed by the real command line."""
    command, params = parse(gateway_argv(gateway_container(docs))[1])
    assert command == "lodestar serve"
    return params


def ray_start_params(argv: list[str]) -> dict[str, Any]:
    """`ray start` argv parsed by Ray's own command line (a bad flag raises a usage error)."""
    from ray.scripts.scripts import start

    assert argv[:2] == ["ray", "start"], argv
    return start.make_context("start", list(argv[2:])).params


def test_gateway_runs_lodestar_serve_against_the_clusters_head_service(rendered) -> None:
    name, docs = rendered
    values = gpu_values() if name == "gpu" else chart_defaults()
    container = gateway_container(docs)
    ray_start, serve = gateway_argv(container)
    command, params = parse(serve)
    cluster = one(docs, "RayCluster")
    assert command == "lodestar serve"
    # The pod joins the cluster as a Ray node (the head's GCS port, as KubeRay's workers do) with
    # nothing to place actors on; its driver then connects to that local node: no Ray Client.
    head = f"{cluster['metadata']['name']}-head-svc:6379"
    node = ray_start_params(ray_start)
    assert node["address"] == head and not node["head"] and not node["block"]
    assert node["num_cpus"] == 0 and node["num_gpus"] == 0
    assert params["ray_address"] == "auto"
    assert params["fleet"] == "lodestar"  # the release's fullname: one fleet per release
    # The fleet's owner lease needs a redis:// store: the chart's (or redis.external).
    assert env_of(container, secret_values(docs))["LODESTAR_REDIS_URL"].startswith("redis://")
    (wait,) = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["initContainers"]
    assert f"ray health-check --address={head} " in wait["command"][-1]  # KubeRay's wait-gcs-ready
    assert wait["image"] == container["image"]  # the head's image: the same Ray
    head_pod = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["image"] == head_pod["image"]
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
    assert container["startupProbe"]["grpc"] == {"port": probe_port, "service": LIVENESS}
    service = one(docs, "Service", "gateway")
    assert {"name": "grpc", "targetPort": "grpc"}.items() <= service["spec"]["ports"][0].items()


def test_three_gateway_replicas_are_three_gateway_pods_sharing_one_fleet() -> None:
    """gateway.replicas scales the CPU-only gateway pods and nothing else: the gateway command (the
    fleet's name and size), the Ray cluster and its GPU groups render the same for 1 and for 3
    gateways, and the GPUs the GPU group holds are the fleet's, numGpus x (policyWorkers x
    tensorParallelSize + rewardWorkers), not replicas x fleet."""
    renders = {}
    for replicas in (1, 3):
        values = gpu_values()
        values["gateway"]["replicas"] = replicas
        renders[replicas] = render(values)
    single, three = renders[1], renders[3]
    assert one(three, "Deployment", "gateway")["spec"]["replicas"] == 3
    assert gateway_argv(gateway_container(single)) == gateway_argv(gateway_container(three))
    for kind in ("RayCluster", "RayJob"):
        assert one(single, kind)["spec"] == one(three, kind)["spec"], kind
    actors = gpu_values()["actors"]
    params = serve_params(three)
    assert params["fleet"] == "lodestar"
    assert params["policy_workers"] == actors["policyWorkers"] == 2
    assert params["reward_workers"] == actors["rewardWorkers"] == 2
    per_policy = actors["numGpus"] * actors["tensorParallelSize"]
    fleet_gpus = actors["policyWorkers"] * per_policy + actors["rewardWorkers"] * actors["numGpus"]
    (group,) = one(three, "RayCluster")["spec"]["workerGroupSpecs"]
    (ray_container,) = group["template"]["spec"]["containers"]
    per_pod = ray_container["resources"]["limits"]["nvidia.com/gpu"]
    assert group["maxReplicas"] * per_pod == fleet_gpus == 4  # 3 gateways: 4 GPUs, not 3 x 4
    pod = one(three, "Deployment", "gateway")["spec"]["template"]["spec"]
    for container in pod["containers"] + pod["initContainers"]:
        assert not [r for r in container["resources"].get("limits", {}) if r.endswith("gpu")]


def test_the_autoscaler_scales_gateway_pods_only() -> None:
    """The HPA targets the gateway Deployment, which then has no replicas of its own; the Ray
    cluster and the fleet flags are those of a fixed single gateway."""
    autoscaling = {"enabled": True, "minReplicas": 2, "maxReplicas": 10}
    docs, fixed = render({"gateway": {"autoscaling": autoscaling}}), render()
    hpa = one(docs, "HorizontalPodAutoscaler", "gateway")
    deployment = one(docs, "Deployment", "gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert "replicas" not in deployment["spec"]
    assert one(docs, "RayCluster")["spec"] == one(fixed, "RayCluster")["spec"]
    assert gateway_argv(gateway_container(docs)) == gateway_argv(gateway_container(fixed))
    assert [e for v in KUBE_VERSIONS for e in core_errors(hpa, v)] == []
    assert not any(d["kind"] == "HorizontalPodAutoscaler" for d in fixed)


def test_install_fails_when_the_gpu_groups_cannot_hold_the_fleet() -> None:
    """The fleet's GPUs against what the worker groups can hold (GPUs per pod x maxReplicas): one
    more policy actor than the GPU group holds fails the render with the numbers; the gateway
    count never enters into it; shared GPUs (numGpus 0.5) count as shares."""
    values = gpu_values()
    values["actors"]["policyWorkers"] = 3  # 3 + 2 GPUs; the group holds 4 pods x 1 GPU
    with pytest.raises(Exception, match=r"the model fleet needs 5 GPUs .* hold at most 4 "):
        render(values)
    values["additionalWorkerGroups"]["gpu"]["maxReplicas"] = 5
    values["gateway"]["replicas"] = 20
    assert one(render(values), "Deployment", "gateway")["spec"]["replicas"] == 20
    values["additionalWorkerGroups"]["gpu"]["maxReplicas"] = 4
    values["actors"] |= {"numGpus": 0.5, "policyWorkers": 4, "rewardWorkers": 4}  # 8 halves
    render(values)
    values["actors"]["tensorParallelSize"] = 2  # with TP each policy rank takes numGpus
    values["actors"]["numGpus"] = 1
    values["actors"] |= {"policyWorkers": 1, "rewardWorkers": 2}
    render(values)
    values["actors"]["policyWorkers"] = 2
    with pytest.raises(Exception, match=r"needs 6 GPUs"):
        render(values)
    render({"actors": {"policyWorkers": 8, "rewardWorkers": 8}})  # CPU actors: no GPU check


def test_gateway_ray_start_params_become_flags_as_kuberay_writes_them() -> None:
    """gateway.rayStartParams reach the gateway's `ray start` as KubeRay writes a Ray pod's:
    "true" a bare flag, "false" dropped except for flags that take a boolean, else --key=value;
    the chart's address, num-cpus and num-gpus stay (the schema refuses them as keys)."""
    params = {
        "disable-usage-stats": "true",
        "include-log-monitor": "false",
        "object-store-memory": "100000000",
        "verbose": "false",
    }
    docs = render({"gateway": {"rayStartParams": params}})
    ray_start, _ = gateway_argv(gateway_container(docs))
    assert "--disable-usage-stats" in ray_start and "--verbose" not in ray_start
    node = ray_start_params(ray_start)
    assert node["disable_usage_stats"] is True and node["include_log_monitor"] is False
    assert node["object_store_memory"] == 100_000_000
    assert node["address"] == "lodestar-ray-head-svc:6379"
    assert node["num_cpus"] == 0 and node["num_gpus"] == 0
    default = ray_start_params(gateway_argv(gateway_container(render()))[0])
    assert default["object_store_memory"] == int(
        chart_defaults()["gateway"]["rayStartParams"]["object-store-memory"]
    )
    pod = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "shm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]


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
    for argv in (gateway_argv(gateway)[1], entrypoint):
        _, params = parse(argv)
        assert params["gpu_memory_utilization"] == 0.6
        assert params["max_model_len"] == 1_048_576  # an integer, not Go's 1.048576e+06
    argv = gateway_argv(gateway_container(render()))[1]
    assert "--gpu-memory-utilization" not in argv and "--max-model-len" not in argv


def test_a_tls_secret_is_mounted_and_served_and_probes_move_to_the_plaintext_health_port() -> None:
    """gateway.tls.secretName: the Secret's tls.crt / tls.key are mounted where the rendered
    `lodestar serve --tls-cert/--tls-key` reads them; the probes use `--health-port`, which
    neither the Service nor the NetworkPolicy opens to clients (the kubelet probes from the node;
    the release's Ray nodes reach every port of a gateway, itself a Ray node)."""
    tls = {"secretName": "my-tls"}
    docs = render({"gateway": {"tls": tls}, "networkPolicy": {"enabled": True}})
    container = gateway_container(docs)
    params = serve_params(docs)
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
    clients, _ray_nodes = one(docs, "NetworkPolicy", "gateway")["spec"]["ingress"]
    assert probe not in [p["port"] for p in clients["ports"]]
    assert [e for d in docs if d["kind"] != "RayCluster" for e in core_errors(d, "1.27.0")] == []

    plain_docs = render()  # the default: plaintext, probes on the gRPC port
    plain, params = gateway_container(plain_docs), serve_params(plain_docs)
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
    clients, ray_nodes = policies["lodestar-gateway"]["ingress"]  # its ports, from the clients
    assert sorted(p["port"] for p in clients["ports"]) == sorted(
        [values["gateway"].get("port", 50051), chart_defaults()["gateway"]["metrics"]["port"]]
    )
    assert clients["from"] == values["networkPolicy"]["gatewayFrom"]
    # A gateway is a Ray node: the release's Ray pods and other gateways reach its raylet, object
    # manager and driver on whatever ports Ray picked, and nothing else of the release does.
    assert "ports" not in ray_nodes
    (peer,) = ray_nodes["from"]
    admitted = sorted(c for c, pod in pods.items() if selects(peer["podSelector"], pod))
    assert admitted == ["gateway", "ray-head", "ray-worker"]
    assert not any(d["kind"] == "NetworkPolicy" for d in render())  # off by default


def test_every_secret_reference_resolves_and_ray_auth_is_shared(rendered) -> None:
    name, docs = rendered
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
    (wait,) = one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["initContainers"]
    assert env_of(wait, secrets)["RAY_AUTH_TOKEN"] == gateway["RAY_AUTH_TOKEN"]
    # With GCS fault tolerance the gateway's raylet waits for a restarted head as long as KubeRay
    # lets its worker pods wait (600 s), so the gateways, like the detached fleet, outlive it.
    fault_tolerant = one(docs, "RayCluster")["spec"].get("gcsFaultToleranceOptions") is not None
    assert fault_tolerant == (name == "gpu")
    timeout = gateway.get("RAY_gcs_rpc_server_reconnect_timeout_s")
    assert timeout == ("600" if fault_tolerant else None)
    redis = one(docs, "Service", "redis")["metadata"]["name"]
    assert gateway["LODESTAR_REDIS_URL"] == f"redis://{redis}:6379/0"
    for doc in docs:
        if doc["apiVersion"] == "ray.io/v1":
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            # KubeRay injects this token into Ray pods; the gateway (a Ray node KubeRay does not
            # manage) gets the same.
            key = (spec["authOptions"]["secretName"], "auth_token")
            assert secrets[key] == gateway["RAY_AUTH_TOKEN"]


def test_worker_groups_run_the_gateways_image_and_see_the_same_models() -> None:
    """No second code path: Ray pods run `ray start` from the gateway's image (the GPU group may
    take the CUDA tag of the same repository), and the model directories the gateway names are
    mounted at the same path on every Ray pod, where the actors load them."""
    values = gpu_values()
    docs = render(values)
    gateway = gateway_container(docs)
    params = serve_params(docs)
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


def processes_marked(marker: str) -> list[int]:
    """Pids of the processes whose environment holds `marker` (NAME=value): what one gateway
    "pod" started here, including the Ray daemons its `ray start` left running (raylet, agents),
    which the end of a real pod would kill."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if marker.encode() in environ:
            found.append(int(entry.name))
    return found


def end_processes(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)


class GatewayPod:
    """One gateway pod of the rendered Deployment, as processes here: the init container's
    command, then the container's, with the pod's environment, its own /tmp (the emptyDir) and a
    marker in the environment that finds everything it started."""

    def __init__(self, pod: dict[str, Any], env: dict[str, str], tmp: Path, index: int) -> None:
        self.marker = f"LODESTAR_TEST_POD={os.getpid()}-{index}"
        bin_dir = str(Path(sys.executable).parent)
        self.env = dict(env, PATH=f"{bin_dir}:{env.get('PATH', '')}", RAY_TMPDIR=str(tmp))
        self.env.update([self.marker.split("=", 1)])
        self.pod = pod
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def run_init_containers(self, replace: dict[str, str]) -> None:
        for init in self.pod["initContainers"]:
            argv = substitute(init["command"] + init.get("args", []), replace)
            done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def start(self, replace: dict[str, str]) -> None:
        (container,) = self.pod["containers"]
        argv = substitute(container["command"] + container["args"], replace)
        self.proc = subprocess.Popen(
            argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def wait_serving(self, timeout_s: float = 300) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while not any("SERVING on" in line for line in self.lines):
            line = self.proc.stdout.readline()
            assert line or self.proc.poll() is None, "".join(self.lines)[-3000:]
            self.lines.append(line)
            assert time.monotonic() < deadline, "".join(self.lines)[-3000:]

    def stop(self) -> int | None:
        """SIGTERM to the server (PID 1 of the pod: `exec` replaced the shell), then the end of
        the pod: whatever else it started. The server's exit status, or None if it was killed."""
        status = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        end_processes(processes_marked(self.marker))
        return status


def fleet_probe(gcs: str, fleet: str, env: dict[str, str]) -> dict[str, Any]:
    """What the cluster holds of the fleet (tests/fleet_probe.py, a driver of its own)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.fleet_probe", fleet],
        env=dict(env, RAY_ADDRESS=gcs),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.integration
def test_rendered_gateways_share_one_fleet_and_batch_job_runs_on_a_ray_cluster_like_kuberay(
    tmp_path: Path,
) -> None:
    """Head (`num-cpus 0`) and one worker started with `ray start` and the rendered rayStartParams,
    token auth on as authOptions sets it. Then the rendered gateway pod, as many times as the
    Deployment has replicas (2): its init container (KubeRay's wait for the GCS), then its
    container command as written, `sh -c 'ray start ... && exec lodestar serve ... "$@"'`, with
    Secrets resolved from the rendered Secret and cluster DNS names pointed at this machine. Each
    gateway joins as a Ray node without CPUs or GPUs and answers a search; the cluster holds one
    fleet, of the configured size, detached, on the worker, and no other model actor, the same
    after the second gateway joined; the fleet outlives both gateways. Then the rendered RayJob
    entrypoint solves a file. (All nodes share this host, where a driver attaches to the head's
    raylet, Ray's choice among local nodes; in a pod the gateway's own raylet is the only one.)"""
    problems = tmp_path / "problems.jsonl"
    problems.write_text('"(1+2)*3"\n"4*5-6"\n')
    output = tmp_path / "results.jsonl"
    values = {
        "batch": {"enabled": True, "input": str(problems), "output": str(output), "budget": 2},
        "actors": {"threads": 1},
        "gateway": {"replicas": 2},
    }
    docs = render(values)
    secrets = secret_values(docs)
    cluster = one(docs, "RayCluster")
    deployment = one(docs, "Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    gateway_env = env_of(gateway_container(docs), secrets)
    fleet = serve_params(docs)["fleet"]
    ray_env = dict(pod_env(), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=gateway_env["RAY_AUTH_TOKEN"])

    # Ray's sockets live under its temp dir: keep the path short (a Unix socket path has a limit).
    ray_tmp = Path(tempfile.mkdtemp(prefix="ls", dir="/tmp"))
    gcs, client = free_port(), free_port()
    redis = LocalRedis(password=gateway_env["LODESTAR_REDIS_PASSWORD"])
    redis.start()
    head_params = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    worker_params = cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]
    head = RayNode(
        head_params,
        [
            *("--head", f"--port={gcs}", f"--ray-client-server-port={client}"),
            *("--include-dashboard=false", "--min-worker-port=22000", "--max-worker-port=22999"),
            f"--temp-dir={ray_tmp / 'ray'}",  # a pod's /tmp/ray: every node here uses the head's
        ],
        ray_env,
    )
    nodes, gateways = [head], []
    try:
        wait_for_nodes(f"127.0.0.1:{gcs}", 1, ray_env)
        # All nodes share this host: keep the worker's worker ports clear of the head's.
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
            f"{cluster['metadata']['name']}-head-svc:6379": f"127.0.0.1:{gcs}",
            f"{redis_host}:6379": f"127.0.0.1:{redis.port}",
            "0.0.0.0": "127.0.0.1",
        }
        env = dict(pod_env(), **substitute_env(gateway_env, to_here))
        ports = []
        for index in range(deployment["spec"]["replicas"]):
            # Each pod has its own IP; here each gateway gets its own ports instead.
            grpc_port = free_port()
            mine = to_here | {"50051": str(grpc_port), "9090": str(free_port())}
            gateway = GatewayPod(pod, env, ray_tmp, index)
            gateways.append(gateway)
            gateway.run_init_containers(mine)
            gateway.start(mine)
            gateway.wait_serving()
            ready, live, result = search_once(
                f"127.0.0.1:{grpc_port}", gateway_env["LODESTAR_AUTH_TOKEN"]
            )
            assert ready == live == health_pb2.HealthCheckResponse.SERVING
            assert result.final_answer == "36"
            ports.append(grpc_port)

            held = fleet_probe(f"127.0.0.1:{gcs}", fleet, ray_env)
            actors = chart_defaults()["actors"] | values["actors"]
            assert len(held["fleet"]) == actors["policyWorkers"] + actors["rewardWorkers"]
            assert {h["id"] for h in held["hosts"]} == set(held["fleet"].values())  # no others
            assert all(h["detached"] for h in held["hosts"])
            # Nodes: the head, the worker, and one without CPUs per gateway so far.
            cpus = held["nodes"]
            assert sorted(cpus.values()) == [0.0] * (index + 2) + [4.0]
            assert {h["node"] for h in held["hosts"]} == {n for n, c in cpus.items() if c == 4.0}
            if index == 0:
                first = held["fleet"]
            assert held["fleet"] == first  # the second gateway found the fleet, made none

        token = gateway_env["LODESTAR_AUTH_TOKEN"]
        for grpc_port in ports:  # every gateway serves from the one fleet
            _, _, result = search_once(f"127.0.0.1:{grpc_port}", token)
            assert result.final_answer == "36"
        for gateway in gateways:
            assert gateway.stop() == 0, "".join(gateway.lines)[-3000:]
        assert fleet_probe(f"127.0.0.1:{gcs}", fleet, ray_env)["fleet"] == first  # detached

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
        for gateway in gateways:
            gateway.stop()
        for node in reversed(nodes):
            node.stop()
        redis.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


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
