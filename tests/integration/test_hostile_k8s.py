"""Hostile Kubernetes input, proven with packets on both dataplanes.

Each case writes manifests the API server would accept (or a manifest directory could
hold), runs the real `stockade apply`, and probes every pod pair with real TCP packets.
Every grid is also what `stockade matrix` says (same state dir), so simulator and kernel
agree on fail-closed input too. Bad input exits 2 and never opens a flow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.kit import Lab
from tests.kit.builders import ns, pod, policy
from tests.kit.enforcement import write

PODS = {"app/a": "10.20.0.1", "app/b": "10.20.0.2", "app/c": "10.20.0.3", "prod/p": "10.20.0.4"}
PORT = 80


def cluster(**labels: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        ns("app"), ns("prod", env="prod"),
        *(pod(k, ip, labels.get(k.split("/")[1], {"app": k.split("/")[1]}), nodeName="lab")
          for k, ip in PODS.items()),
    ]


def grid(lab: Lab) -> dict[str, set[str]]:
    """source -> the pods it reaches on tcp/80."""
    spec = {d: f"tcp:{ip}:{PORT}" for d, ip in PODS.items()}
    seen = lab.probe_many({s: [spec[d] for d in PODS if d != s] for s in PODS})
    return {s: {d for d in PODS if d != s and seen[s][spec[d]]} for s in PODS}


def simulated(lab: Lab, src: Path) -> dict[str, set[str]]:
    out = lab.stockade("matrix", "--source", str(src), "--port", str(PORT), "--protocol", "TCP",
                       "--output", "json", "--state-dir", str(src.parent / "state"))
    v = json.loads(out.stdout)["verdicts"]
    return {s: {d for d in PODS if d != s and v[s][d] == "allow"} for s in PODS}


def enforce(lab: Lab, tmp_path: Path, dataplane: str, docs: list[dict[str, Any]], *problems: str
            ) -> dict[str, set[str]]:
    """Apply `docs`; the run must report each of `problems` (object and field path) and exit
    2; returns the kernel's grid, checked equal to the simulator's."""
    src = tmp_path / "src"
    write(src, docs)
    res = lab.stockade("apply", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                       "--state-dir", str(tmp_path / "state"), check=False)
    kernel = grid(lab)
    assert kernel == simulated(lab, src)
    assert res.returncode == 2, res.stderr
    for p in problems:
        assert p in res.stderr, res.stderr
    return kernel


ALL = set(PODS)


@pytest.fixture
def pods(lab: Lab) -> Lab:
    for key, ip in PODS.items():
        lab.add_pod(key, [ip], ports=(PORT,))
    return lab


def test_bad_ip_block_rule_keeps_isolation_and_leading_zeros_are_decimal(
    pods: Lab, dataplane: str, tmp_path: Path
) -> None:
    # b: a default deny, plus a policy whose only valid rule admits c, next to a rule the API
    # would reject (/33). Dropping the whole policy used to leave b open to a and p.
    bad = policy("app/b-in", {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.20.0.0/33"}}]},
        {"from": [{"podSelector": {"matchLabels": {"app": "c"}}}]}]})
    # c: admits only 010.020.000.001/32, which the API server reads as 10.20.0.1 (a).
    sloppy = policy("app/c-in", {"podSelector": {"matchLabels": {"app": "c"}}, "ingress": [
        {"from": [{"ipBlock": {"cidr": "010.020.000.001/32"}}]}]})
    seen = enforce(pods, tmp_path, dataplane, [*cluster(), bad, sloppy],
                   "NetworkPolicy app/b-in", "spec.ingress[0].from[0].ipBlock.cidr")
    reach_b = {s for s in PODS if "app/b" in seen[s]}
    reach_c = {s for s in PODS if "app/c" in seen[s]}
    assert reach_b == {"app/c"}
    assert reach_c == {"app/a"}


def test_integer_pod_label_stays_isolated_and_is_no_peer(pods: Lab, dataplane: str, tmp_path: Path) -> None:
    deny_b = policy("app/deny-b", {"podSelector": {"matchLabels": {"app": "b"}}})
    # c admits pods without a `version` label: b's `version: 2` is unreadable, so b is no peer.
    c_in = policy("app/c-in", {"podSelector": {"matchLabels": {"app": "c"}}, "ingress": [
        {"from": [{"podSelector": {"matchExpressions": [{"key": "version", "operator": "DoesNotExist"}]}}]}]})
    seen = enforce(pods, tmp_path, dataplane, [*cluster(b={"app": "b", "version": 2}), deny_b, c_in],
                   "Pod app/b", "metadata.labels[version]")
    assert {s for s in PODS if "app/b" in seen[s]} == set()  # b is still isolated
    assert {s for s in PODS if "app/c" in seen[s]} == {"app/a"}
    assert seen["app/a"] == ALL - {"app/a", "app/b"}


def test_integer_namespace_label_is_matched_by_no_not_in(pods: Lab, dataplane: str, tmp_path: Path) -> None:
    not_prod = policy("app/not-prod", {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [
        {"from": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "NotIn",
                                                               "values": ["prod"]}]}}]}]})
    docs = cluster()
    docs[1]["metadata"]["labels"] = {"env": "prod", "tier": 1}  # prod: one unreadable label
    seen = enforce(pods, tmp_path, dataplane, [*docs, not_prod], "Namespace prod", "metadata.labels[tier]")
    assert {s for s in PODS if "app/b" in seen[s]} == {"app/a", "app/c"}  # not prod/p


def test_match_labels_zero_selects_nothing_as_peer_and_isolates_as_target(
    pods: Lab, dataplane: str, tmp_path: Path
) -> None:
    as_peer = policy("app/peer", {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": 0}}]}]})
    as_target = policy("prod/target", {"podSelector": {"matchLabels": 0}, "ingress": [{}]})
    seen = enforce(pods, tmp_path, dataplane, [*cluster(), as_peer, as_target],
                   "spec.ingress[0].from[0].podSelector.matchLabels", "spec.podSelector.matchLabels")
    assert {s for s in PODS if "app/b" in seen[s]} == set()  # was: every pod of app
    assert {s for s in PODS if "prod/p" in seen[s]} == set()  # was: an allow-all on every pod
    assert seen["prod/p"] == {"app/a", "app/c"}  # p's egress untouched (b is isolated)
