"""The packet-enforcement cluster: three pods in namespace app, the manifests written to a source
directory, and the scenarios other suites run again (e.g. under the container's confinement)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.kit import Lab
from tests.kit.builders import dump_manifests, ns, pod, policy

A, B, C = "10.20.0.1", "10.20.0.2", "10.20.0.3"
A6, B6 = "fd00:20::1", "fd00:20::2"


def cluster(**labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        ns("app"),
        pod("app/a", [A, A6], labels.get("a", {"app": "a"}), nodeName="lab",
            ports=[{"name": "web", "containerPort": 80}]),
        pod("app/b", [B, B6], labels.get("b", {"app": "b"}), nodeName="lab",
            ports=[{"name": "web", "containerPort": 2000}]),
        pod("app/c", C, labels.get("c", {"app": "c"}), nodeName="lab"),
    ]


def write(src: Path, docs: list[dict[str, Any]]) -> None:
    src.mkdir(exist_ok=True)
    tmp = src / ".manifests.tmp"
    tmp.write_text(dump_manifests(docs))
    tmp.rename(src / "manifests.yaml")  # atomic, as an operator's tooling would


def build(lab: Lab) -> None:
    lab.add_pod("app/a", [A, A6], ports=(80, 81, 8080))
    lab.add_pod("app/b", [B, B6], ports=(80, 81, 2000, 40000))
    lab.add_pod("app/c", [C], ports=(80, 81))


def apply(lab: Lab, src: Path, dataplane: str, expect_rc: int = 0) -> str:
    res = lab.stockade("apply", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                       "--state-dir", str(src.parent / "state"), check=False)
    assert res.returncode == expect_rc, res.stderr
    return res.stderr


DENY_B = policy("app/deny-b", {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]})

ALLOW_A_TO_B = policy("app/a-to-b", {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [
    {"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": 80}]}]})


def strict_mode_cuts_flows_no_longer_allowed(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    build(lab)
    src = tmp_path / "src"
    allow_from_a = policy("app/from-a", {"podSelector": {}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]})
    allow_a_to_c = policy("app/a-to-c", {"podSelector": {"matchLabels": {"app": "c"}}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]})
    write(src, [*cluster(), allow_from_a, allow_a_to_c])
    apply(lab, src, dataplane)
    to_b, to_c = lab.hold("app/a", B, 80), lab.hold("app/a", C, 80)
    assert to_b.ping() and to_c.ping()
    # Only a -> c stays allowed: b is now isolated by a policy that does not admit a.
    write(src, [*cluster(), DENY_B, allow_a_to_c])
    apply(lab, src, dataplane)
    assert not to_b.ping()
    assert to_c.ping()
