"""Every manifest in deploy/ validates against the Kubernetes OpenAPI schemas (offline).

Built-in kinds: kubernetes-validate (PyPI), whose package ships the JSON schemas of each
Kubernetes release generated from its OpenAPI spec; strict mode rejects unknown fields.
PodMonitor (a prometheus-operator CRD, in deploy/monitoring/): its embedded Kubernetes
types (ObjectMeta, LabelSelector) against the same bundled schemas, the rest against the
fields the CRD documents (see the test for why). kustomization.yaml files are
kustomize's, not API objects: checked for the files they name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# The oldest Kubernetes this targets (CAP_BPF/PERFMON in container runtimes, seccompProfile
# field, system-node-critical outside kube-system) and the newest the validator knows.
VERSIONS = ["1.28.0", "1.31.0", kv.utils.latest_version()]
CRD_KINDS = {"PodMonitor"}


def manifests() -> list[tuple[str, int, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((str(path.relative_to(DEPLOY)), i, doc))
    return out


MANIFESTS = manifests()
BUILTIN = [m for m in MANIFESTS if m[2]["kind"] not in CRD_KINDS]


def test_deploy_has_everything_the_daemonset_needs() -> None:
    kinds = sorted(d["kind"] for *_, d in MANIFESTS)
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                            "DaemonSet", "PodMonitor"])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("path", "index", "doc"), BUILTIN,
                         ids=[f"{p}#{i}-{d['kind']}" for p, i, d in BUILTIN])
def test_manifest_validates_against_kubernetes_schema(path: str, index: int, doc: dict, version: str) -> None:
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        pytest.fail(f"{path}#{index} ({doc['kind']}) invalid for Kubernetes {version}: "
                    f"{'.'.join(map(str, e.path))}: {e.message}")


def test_the_validator_rejects_what_it_should() -> None:
    """Guard against a validator that accepts anything (e.g. a missing schema)."""
    ds = next(d for *_, d in MANIFESTS if d["kind"] == "DaemonSet")
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["prot"] = 9754
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, VERSIONS[-1], strict=True)
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, VERSIONS[-1], strict=True)


def _validate_as(value: Any, schema_file: str, version: str) -> None:
    """Validate `value` against one bundled type schema (kubernetes-validate's registry)."""
    import jsonschema
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv.utils.schema_contents(f"{folder}/{schema_file}", version)
    defs = kv.utils.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    jsonschema.validators.Draft202012Validator(schema, registry=registry).validate(value)


def test_podmonitor_parts_that_are_kubernetes_types() -> None:
    """PodMonitor (monitoring.coreos.com/v1) is a prometheus-operator CRD: no PyPI package
    ships its schema without side effects (cloudcoil-models-prometheus-operator carries it
    as pydantic models, but also registers a pytest plugin that breaks this suite unless
    filelock is installed). Its metadata is an ObjectMeta and spec.selector a LabelSelector
    (the CRD embeds the upstream types), so those are validated strictly with the bundled
    Kubernetes schemas; the rest is checked against the fields the CRD documents.
    """
    version = VERSIONS[-1]
    monitors = [d for *_, d in MANIFESTS if d["kind"] == "PodMonitor"]
    assert monitors
    for doc in monitors:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
        _validate_as(doc["metadata"], "objectmeta-meta-v1.json", version)
        _validate_as(doc["spec"]["selector"], "labelselector-meta-v1.json", version)
        assert set(doc["spec"]) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel",
                                    "podTargetLabels", "sampleLimit", "attachMetadata"}
        for ep in doc["spec"]["podMetricsEndpoints"]:
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings",
                               "metricRelabelings", "honorLabels"}
            assert isinstance(ep["port"], str)  # a named container port
    with pytest.raises(Exception, match="is not of type"):
        _validate_as({"matchLabels": ["not", "a", "map"]}, "labelselector-meta-v1.json", version)


def test_daemonset_wiring() -> None:
    """What the schema cannot say: the pieces refer to each other and to the agent's port."""
    docs = {(d["kind"], d["metadata"]["name"]): d for *_, d in MANIFESTS}
    ds = docs[("DaemonSet", "stockade")]
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    c = spec["containers"][0]
    assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ("ServiceAccount", spec["serviceAccountName"]) in docs
    assert ("ConfigMap", c["envFrom"][0]["configMapRef"]["name"]) in docs
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "--metrics-address=0.0.0.0:9754" in c["args"]
    assert c["ports"][0]["containerPort"] == 9754 == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    caps = c["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and set(caps["add"]) == {"NET_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/sys/fs/bpf", "/lib/modules", "/usr/src"} <= mounts
    # Every $(VAR) in args comes from the ConfigMap or env.
    cm = docs[("ConfigMap", "stockade")]["data"]
    for arg in c["args"]:
        if "$(" in arg:
            var = arg.split("$(", 1)[1].split(")", 1)[0]
            assert var in cm or var in env, arg
    rules = docs[("ClusterRole", "stockade")]["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    for group, res in (("", "pods"), ("", "namespaces"), ("networking.k8s.io", "networkpolicies")):
        assert {(group, res, v) for v in ("get", "list", "watch")} <= granted
    assert ("", "nodes", "get") in granted
    assert not {v for *_, v in granted} - {"get", "list", "watch"}  # read-only
    binding = docs[("ClusterRoleBinding", "stockade")]
    assert binding["roleRef"]["name"] == "stockade"
    assert binding["subjects"][0]["name"] == spec["serviceAccountName"]


@pytest.mark.parametrize("kustomization", sorted(DEPLOY.rglob("kustomization.yaml")),
                         ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kustomization_names_existing_files_and_leaves_none_out(kustomization: Path) -> None:
    k = yaml.safe_load(kustomization.read_text())
    assert k["kind"] == "Kustomization"
    listed = {(kustomization.parent / r).resolve() for r in k["resources"]}
    assert all(p.is_file() for p in listed), listed
    here = {p.resolve() for p in kustomization.parent.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert here == listed


def test_containerfile_uses_debian_packages() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    assert "debian:bookworm" in text
    for pkg in ("nftables", "python3-nftables", "python3-bpfcc", "bpfcc-tools"):
        assert f" {pkg}" in text, pkg
    assert "--system-site-packages" in text
