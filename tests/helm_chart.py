"""Render the Helm chart offline and check what it renders: Kubernetes' own API schemas for core
objects, KubeRay's CRD schema for Ray objects (tests/data/kuberay, see its README)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "lodestar"
GPU_VALUES = CHART / "examples" / "values-gpu.yaml"
CRDS = Path(__file__).resolve().parent / "data" / "kuberay"
KUBE_VERSIONS = ("1.27.0", "1.37.0")
"""The chart's oldest supported Kubernetes (Chart.yaml kubeVersion) and the newest schema."""

Doc = dict[str, Any]


def gpu_values() -> dict[str, Any]:
    return yaml.safe_load(GPU_VALUES.read_text())


def render(values: dict[str, Any] | None = None, name: str = "lodestar") -> list[Doc]:
    """Every object the chart renders (NOTES.txt excluded), in template order."""
    chart = helm_python.Chart.load(CHART)
    try:
        out = chart.render(values or {}, name=name, namespace="search", is_install=True)
    finally:
        chart.close()
    return [
        doc
        for path, text in sorted(out.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def lint(values: dict[str, Any] | None = None) -> list[str]:
    """Strict lint findings of severity warning or error, as readable lines."""
    report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSIONS[0]}")
    found = [f"{m['path']}: {m['error'].strip()}" for m in report["messages"] if m["severity"] >= 2]
    return found + [e.strip() for e in report["errors"] if e.strip() not in " ".join(found)]


def one(docs: list[Doc], kind: str, component: str | None = None) -> Doc:
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and (
            component is None or d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        )
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects (component {component})"
    return found[0]


# -- Kubernetes core objects ------------------------------------------------------------------


def core_errors(doc: Doc, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
        cause = getattr(e, "caused_by", e)
        where = "/".join(str(p) for p in cause.absolute_path)
        return [f"{doc['kind']}/{doc['metadata'].get('name')} at {where}: {cause.message}"]
    return []


def as_pod_template(template: Doc) -> Doc:
    """A pod template embedded in a Ray object, as the core PodTemplate object that holds one."""
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "t"},
        "template": template,
    }


# -- KubeRay objects --------------------------------------------------------------------------


def closed(schema: Any) -> Any:
    """The API server *prunes* fields a structural CRD schema does not declare (silently), so a
    misspelt field would be dropped, not rejected: check with every declared object closed."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(kind: str) -> Doc:
    return yaml.safe_load((CRDS / f"{kind.lower()}-v1.schema.yaml").read_text())


def crd_errors(doc: Doc) -> list[str]:
    validator = jsonschema.Draft7Validator(closed(crd_schema(doc["kind"])))
    return [
        f"{doc['kind']}/{doc['metadata']['name']} at {'/'.join(map(str, e.absolute_path))}: "
        f"{e.message}"
        for e in validator.iter_errors(doc)
    ]


def cluster_specs(doc: Doc) -> list[Doc]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob":
        return [doc["spec"]["rayClusterSpec"]]
    return []


def ray_pod_templates(doc: Doc) -> Iterator[tuple[str, Doc]]:
    """(where, template) for every pod template inside a RayCluster or RayJob."""
    for spec in cluster_specs(doc):
        yield "head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"worker group {group['groupName']}", group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]


def secret_values(docs: list[Doc]) -> dict[tuple[str, str], str]:
    """(secret name, key) -> decoded value, for the Secrets the chart renders."""
    return {
        (d["metadata"]["name"], key): base64.b64decode(value).decode()
        for d in docs
        if d["kind"] == "Secret"
        for key, value in d.get("data", {}).items()
    }


def env_of(container: Doc, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's environment as the kubelet would build it from the rendered Secrets."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[(ref["name"], ref["key"])]
    return env


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """Kubernetes LabelSelector semantics: every matchLabels pair and every expression holds."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        held = {
            "In": present and value in e.get("values", []),
            "NotIn": not present or value not in e.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[e["operator"]]
        if not held:
            return False
    return True


def pod_labels(docs: list[Doc]) -> dict[str, dict[str, str]]:
    """Component -> labels of every pod the release runs (Deployments, StatefulSets, Ray pods)."""
    templates = [
        template
        for doc in docs
        for template in (
            [t for _, t in ray_pod_templates(doc)]
            if doc["apiVersion"].startswith("ray.io/")
            else [doc["spec"]["template"]]
            if doc["kind"] in ("Deployment", "StatefulSet")
            else []
        )
    ]
    labels = [t["metadata"]["labels"] for t in templates]
    return {label["app.kubernetes.io/component"]: label for label in labels}
