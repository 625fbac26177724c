"""tests/kit/kustomize.py, the renderer the container test reads deploy/ through, does what
`kustomize build` does for the fields it implements, and refuses the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.kit import ROOT
from tests.kit.kustomize import KustomizeError, build

BASE_DS = {
    "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
    "spec": {"template": {"spec": {
        "containers": [{"name": "agent", "image": "agent", "securityContext": {"capabilities": {
            "drop": ["ALL"], "add": ["NET_ADMIN"]}}, "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]},
                       {"name": "sidecar", "image": "other:1"}],
        "volumes": [{"name": "tmp", "emptyDir": {}}]}}},
}


def tree(tmp_path: Path, overlay: dict, files: dict[str, object]) -> Path:
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(BASE_DS))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"resources": ["ds.yaml"], "namespace": "kube-system", "images": [{"name": "agent", "newTag": "0.1"}]}))
    over = tmp_path / "overlays" / "x"
    over.mkdir(parents=True)
    (over / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["../../"], **overlay}))
    for name, doc in files.items():
        (over / name).write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return over


def test_overlay_strategic_merge_and_json6902(tmp_path: Path) -> None:
    smp = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
           "spec": {"template": {"spec": {
               "containers": [{"name": "agent", "securityContext": {"capabilities": {"add": ["NET_ADMIN", "BPF"]}},
                               "volumeMounts": [{"name": "bpffs", "mountPath": "/sys/fs/bpf"}]}],
               "volumes": [{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf"}}]}}}}
    json6902 = yaml.safe_dump([{"op": "add", "value": "PERFMON",
                                "path": "/spec/template/spec/containers/0/securityContext/capabilities/add/-"}])
    over = tree(tmp_path, {"patches": [{"path": "smp.yaml"}, {"patch": json6902,
                                                              "target": {"kind": "DaemonSet", "name": "agent"}}]},
                {"smp.yaml": smp})
    [ds] = build(over)
    spec = ds["spec"]["template"]["spec"]
    agent, sidecar = spec["containers"]
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "BPF", "PERFMON"]}
    assert [m["mountPath"] for m in agent["volumeMounts"]] == ["/sys/fs/bpf", "/tmp"]  # new items first, as kustomize
    assert [v["name"] for v in spec["volumes"]] == ["bpffs", "tmp"]
    assert agent["image"] == "agent:0.1" and sidecar == {"name": "sidecar", "image": "other:1"}
    assert ds["metadata"]["namespace"] == "kube-system"


def test_delete_directive_removes_a_mount(tmp_path: Path) -> None:
    smp = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
           "spec": {"template": {"spec": {"containers": [
               {"name": "agent", "volumeMounts": [{"mountPath": "/tmp", "$patch": "delete"}]}]}}}}
    [ds] = build(tree(tmp_path, {"patchesStrategicMerge": ["smp.yaml"]}, {"smp.yaml": smp}))
    assert ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] == []


@pytest.mark.parametrize(("overlay", "match"), [
    ({"configMapGenerator": [{"name": "x"}]}, "does not implement"),
    ({"patches": [{"patch": yaml.safe_dump({"kind": "DaemonSet", "metadata": {"name": "nope"}})}]}, "matches nothing"),
    ({"patches": [{"patch": "- {op: move, from: /a, path: /b}\n", "target": {"kind": "DaemonSet"}}]},
     "not implemented"),
])
def test_what_it_cannot_render_raises(tmp_path: Path, overlay: dict, match: str) -> None:
    with pytest.raises(KustomizeError, match=match):
        build(tree(tmp_path, overlay, {}))


def test_deploy_renders() -> None:
    docs = build(ROOT / "deploy")
    [ds] = [d for d in docs if d["kind"] == "DaemonSet"]
    assert ds["metadata"]["namespace"] == "kube-system"
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"].startswith("stockade:")
