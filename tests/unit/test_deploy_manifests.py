"""Every manifest in deploy/ validates against the Kubernetes OpenAPI schemas (offline),
and each dataplane gets the privileges it needs and no more.

Built-in kinds: kubernetes-validate (PyPI), whose package ships the JSON schemas of each
Kubernetes release generated from its OpenAPI spec; strict mode rejects unknown fields.
PodMonitor (a prometheus-operator CRD, in deploy/monitoring/): its embedded Kubernetes
types (ObjectMeta, LabelSelector) against the same bundled schemas, the rest against the
fields the CRD documents (see the test for why). kustomization.yaml files are
kustomize's, not API objects: checked for the files they name, and rendered here (their
resources plus patches, by the kit's renderer tests/kit/kustomize.py) so that the eBPF overlay is
validated as applied. No kustomize ships in Debian 12 or on PyPI (Debian's
kubernetes-client 1.20 bundles kustomize 2, which knows neither `labels:` nor
`patches:`); where a newer `kubectl` is installed, the render is compared with its own.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.dns import hold
from agent.sources.kubernetes import RESOURCES
from tests.kit.kustomize import render
from tests.kit.manifests import DEPLOY, EBPF, MANIFESTS, Rendered, container, objects

kv = pytest.importorskip("kubernetes_validate")

# The oldest Kubernetes this targets (CAP_BPF/PERFMON in container runtimes, seccompProfile
# field, system-node-critical outside kube-system) and the newest the validator knows.
VERSIONS = ["1.28.0", "1.31.0", kv.utils.latest_version()]
CRD_KINDS = {"PodMonitor"}


DNS = render(DEPLOY / "overlays" / "dns-egress", DEPLOY)  # DNS egress: the eBPF overlay plus the hold's needs

# The overlays' objects as patched (the others are the base's, validated once).
BUILTIN = [m for m in MANIFESTS + [m for m in EBPF + DNS if "+" in m[0]] if m[2]["kind"] not in CRD_KINDS]


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


def _host_paths(docs: list[Rendered]) -> dict[str, dict[str, Any]]:
    spec = objects(docs)[("DaemonSet", "stockade")]["spec"]["template"]["spec"]
    return {v["hostPath"]["path"]: v for v in spec.get("volumes", []) if "hostPath" in v}


def _agent_args(docs: list[Rendered]) -> argparse.Namespace:
    """The DaemonSet's args as `stockade run` parses them, $(VAR)s from the ConfigMap."""
    from agent.cli import parser

    cm = objects(docs)[("ConfigMap", "stockade")]["data"]
    args = [re.sub(r"\$\((\w+)\)", lambda m: cm[m.group(1)], a) for a in container(docs)["args"]]
    return parser().parse_args(args)


@pytest.mark.parametrize(("docs", "dataplane"), [(MANIFESTS, "nftables"), (EBPF, "ebpf")], ids=["base", "ebpf"])
def test_the_agent_parses_the_daemonsets_arguments(docs: list[Rendered], dataplane: str) -> None:
    args = _agent_args(docs)
    assert (args.command, args.source, args.dataplane) == ("run", "kubernetes", dataplane)
    assert args.state_dir == ""  # no state directory, hence no host path for one


def test_the_kubernetes_source_writes_no_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the DaemonSet has no state volume: with --source kubernetes the agent keeps
    last-good objects in memory, whatever --state-dir says. If this changes, the
    DaemonSet needs a volume for it."""
    import agent.pipeline
    from agent.cli import _pipeline, parser

    seen: dict[str, Any] = {}
    monkeypatch.setattr(agent.pipeline, "KubernetesPipeline", lambda *a, **kw: seen.update(kw))
    _pipeline(parser().parse_args(["run", "--source=kubernetes", "--state-dir=/var/lib/stockade"]), "node-1")
    assert "state_file" in seen and seen["state_file"] is None


def test_base_runs_nftables_with_least_privilege() -> None:
    c = container(MANIFESTS)
    sc = c["securityContext"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    spec = objects(MANIFESTS)[("DaemonSet", "stockade")]["spec"]["template"]["spec"]
    assert "securityContext" not in spec or spec["securityContext"].get("seccompProfile", {}).get(
        "type") != "Unconfined"
    assert not spec.get("hostPID") and not spec.get("hostIPC")
    assert _host_paths(MANIFESTS) == {}
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/tmp"]
    assert objects(MANIFESTS)[("ConfigMap", "stockade")]["data"]["STOCKADE_DATAPLANE"] == "nftables"


def test_ebpf_overlay_adds_exactly_what_ebpf_needs() -> None:
    c = container(EBPF)
    sc = c["securityContext"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["BPF", "NET_ADMIN", "PERFMON"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    paths = _host_paths(EBPF)
    assert set(paths) == {"/sys/fs/bpf", "/lib/modules", "/usr/src"}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts[paths["/sys/fs/bpf"]["name"]]["mountPropagation"] == "HostToContainer"
    assert not mounts[paths["/sys/fs/bpf"]["name"]].get("readOnly")  # pins are written
    for headers in ("/lib/modules", "/usr/src"):
        assert mounts[paths[headers]["name"]]["readOnly"] is True
    assert objects(EBPF)[("ConfigMap", "stockade")]["data"]["STOCKADE_DATAPLANE"] == "ebpf"
    # its own memory figures (measured: bench/memory.py; the reasons are beside them)
    assert c["resources"]["requests"]["memory"] == "256Mi" and c["resources"]["limits"]["memory"] == "1Gi"
    assert c["resources"]["requests"]["cpu"] == container(MANIFESTS)["resources"]["requests"]["cpu"]

    # Nothing else differs from the base: take the additions out again and compare.
    base = objects(MANIFESTS)
    back = objects(EBPF)
    ds = copy.deepcopy(back[("DaemonSet", "stockade")])
    spec = ds["spec"]["template"]["spec"]
    added = {v["name"] for v in paths.values()}
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] not in added]
    ctr = spec["containers"][0]
    ctr["volumeMounts"] = [m for m in ctr["volumeMounts"] if m["name"] not in added]
    ctr["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]
    ctr["resources"] = container(MANIFESTS)["resources"]
    assert ds == base[("DaemonSet", "stockade")]
    cm = copy.deepcopy(back[("ConfigMap", "stockade")])
    cm["data"]["STOCKADE_DATAPLANE"] = "nftables"
    assert cm == base[("ConfigMap", "stockade")]
    assert {k: v for k, v in back.items() if k[0] not in ("DaemonSet", "ConfigMap")} == \
        {k: v for k, v in base.items() if k[0] not in ("DaemonSet", "ConfigMap", "PodMonitor")}


def test_dns_egress_overlay_adds_exactly_what_the_hold_needs() -> None:
    """deploy/overlays/dns-egress = the eBPF overlay + what agent/dns/hold.py says the hold
    needs (its CAPABILITIES and DEVICES, read from the code) + `--dns-egress`; nothing else.
    Every other build leaves DNS egress off."""
    c, ebpf = container(DNS), container(EBPF)
    caps = c["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    want = {n.removeprefix("CAP_") for n in hold.CAPABILITIES} | set(ebpf["securityContext"]["capabilities"]["add"])
    assert sorted(caps["add"]) == sorted(want) == ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"]
    paths = _host_paths(DNS)
    assert set(paths) == set(_host_paths(EBPF)) | set(hold.DEVICES)
    for dev in hold.DEVICES:
        assert paths[dev]["hostPath"]["type"] == "CharDevice"
        assert any(m["mountPath"] == dev and m["name"] == paths[dev]["name"] for m in c["volumeMounts"])
    assert c["args"] == [*ebpf["args"], "--dns-egress"]
    assert _agent_args(DNS).dns_egress and not _agent_args(EBPF).dns_egress and not _agent_args(MANIFESTS).dns_egress
    assert _agent_args(DNS).dataplane == "ebpf"

    # Nothing else differs from the eBPF overlay: take the additions out again and compare.
    ds = copy.deepcopy(objects(DNS)[("DaemonSet", "stockade")])
    spec = ds["spec"]["template"]["spec"]
    added = {paths[d]["name"] for d in hold.DEVICES}
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] not in added]
    ctr = spec["containers"][0]
    ctr["volumeMounts"] = [m for m in ctr["volumeMounts"] if m["name"] not in added]
    ctr["securityContext"]["capabilities"]["add"] = ebpf["securityContext"]["capabilities"]["add"]
    ctr["args"] = ctr["args"][:-1]
    assert sorted(ctr["volumeMounts"], key=str) == sorted(ebpf["volumeMounts"], key=str)
    ctr["volumeMounts"] = ebpf["volumeMounts"]
    assert ds == objects(EBPF)[("DaemonSet", "stockade")]
    assert {k: v for k, v in objects(DNS).items() if k[0] != "DaemonSet"} == \
        {k: v for k, v in objects(EBPF).items() if k[0] != "DaemonSet"}


def test_the_dns_egress_overlay_renders_as_kustomize_does() -> None:
    kubectl = shutil.which("kubectl")
    version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True).stdout \
        if kubectl else ""
    m = re.search(r"Kustomize Version: v(\d+)", version)
    if not kubectl or not m or int(m.group(1)) < 4:
        pytest.skip("no kubectl with kustomize >= 4 (not packaged in Debian 12)")
    root = DEPLOY / "overlays" / "dns-egress"
    out = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, check=True).stdout
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    pod = theirs[("DaemonSet", "stockade")]["spec"]["template"]["spec"]
    assert pod == objects(DNS)[("DaemonSet", "stockade")]["spec"]["template"]["spec"]


def test_the_render_agrees_with_kustomize() -> None:
    """Cross-check the kit's renderer against kubectl's kustomize where one that reads these
    files (v4+) is installed; the pod spec and ConfigMap data must match (kustomize also
    applies labels, which the render leaves out)."""
    kubectl = shutil.which("kubectl")
    version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True).stdout \
        if kubectl else ""
    m = re.search(r"Kustomize Version: v(\d+)", version)
    if not kubectl or not m or int(m.group(1)) < 4:
        pytest.skip("no kubectl with kustomize >= 4 (not packaged in Debian 12)")
    for root, ours in ((DEPLOY, MANIFESTS), (DEPLOY / "overlays" / "ebpf", EBPF)):
        out = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, check=True).stdout
        theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
        mine = objects(ours)
        pod = theirs[("DaemonSet", "stockade")]["spec"]["template"]["spec"]
        assert pod == mine[("DaemonSet", "stockade")]["spec"]["template"]["spec"], root
        assert theirs[("ConfigMap", "stockade")]["data"] == mine[("ConfigMap", "stockade")]["data"], root


def test_daemonset_wiring() -> None:
    """What the schema cannot say: the pieces refer to each other and to the agent's port."""
    docs = objects(MANIFESTS)
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
    # Every mount names a volume of the pod (base and overlay).
    for rendered in (MANIFESTS, EBPF):
        pod_spec = objects(rendered)[("DaemonSet", "stockade")]["spec"]["template"]["spec"]
        volumes = {v["name"] for v in pod_spec["volumes"]}
        assert {m["name"] for m in pod_spec["containers"][0]["volumeMounts"]} <= volumes
    # Every $(VAR) in args comes from the ConfigMap or env.
    cm = docs[("ConfigMap", "stockade")]["data"]
    for arg in c["args"]:
        if "$(" in arg:
            var = arg.split("$(", 1)[1].split(")", 1)[0]
            assert var in cm or var in env, arg
    rules = docs[("ClusterRole", "stockade")]["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    # Exactly get/list/watch on what the API source lists and watches: nothing more, nothing less.
    assert granted == {(r.group, r.plural, v) for r in RESOURCES.values() for v in ("get", "list", "watch")}
    assert {(g, r) for g, r, _ in granted} >= {
        ("", "nodes"), ("policy.networking.k8s.io", "clusternetworkpolicies"),
        ("policy.networking.k8s.io", "adminnetworkpolicies"),
        ("policy.networking.k8s.io", "baselineadminnetworkpolicies")}
    assert all(not rule.get("resourceNames") and not rule.get("nonResourceURLs") for rule in rules)
    binding = docs[("ClusterRoleBinding", "stockade")]
    assert binding["roleRef"]["name"] == "stockade"
    assert binding["subjects"][0]["name"] == spec["serviceAccountName"]


@pytest.mark.parametrize("kustomization", sorted(DEPLOY.rglob("kustomization.yaml")),
                         ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kustomization_names_existing_files_and_leaves_none_out(kustomization: Path) -> None:
    k = yaml.safe_load(kustomization.read_text())
    assert k["kind"] == "Kustomization"
    listed = {(kustomization.parent / r).resolve() for r in k["resources"]}
    dirs = {p for p in listed if p.is_dir()}
    assert all((d / "kustomization.yaml").is_file() for d in dirs), dirs
    # kustomize refuses a resource directory that contains this kustomization (a cycle).
    assert not any(kustomization.parent.resolve().is_relative_to(d) for d in dirs)
    files = (listed - dirs) | {(kustomization.parent / p["path"]).resolve() for p in k.get("patches", [])}
    assert all(p.is_file() for p in files), files
    here = {p.resolve() for p in kustomization.parent.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert here == files


def test_containerfile_uses_debian_packages() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    assert "debian:bookworm" in text
    for pkg in ("nftables", "python3-nftables", "python3-bpfcc", "bpfcc-tools"):
        assert f" {pkg}" in text, pkg
    assert "--system-site-packages" in text
