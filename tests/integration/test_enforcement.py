"""Packet-level enforcement beyond the upstream cases, on every dataplane.

Each test builds its own lab (node + pod namespaces), writes manifests to a temp dir,
runs the real CLI inside the node namespace, and probes with real TCP/UDP packets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.kit import Lab, enforcement, until
from tests.kit.builders import policy
from tests.kit.enforcement import A6, ALLOW_A_TO_B, B6, DENY_B, A, B, C, apply, build, cluster, write


def test_isolation_both_families_and_replies(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    build(lab)
    src = tmp_path / "src"
    write(src, [*cluster(a={"app": "a", "role": "client"}), DENY_B, ALLOW_A_TO_B])
    apply(lab, src, dataplane)
    seen = lab.probe_many({
        "app/a": [f"tcp:{B}:80", f"tcp:{B6}:80", f"udp:{B}:80", f"tcp:{B}:81"],
        "app/c": [f"tcp:{B}:80", f"tcp:{A}:80"],
    })
    # A reply coming back proves replies of allowed connections pass (b is isolated).
    assert seen["app/a"] == {f"tcp:{B}:80": True, f"tcp:{B6}:80": True, f"udp:{B}:80": False,
                             f"tcp:{B}:81": False}
    assert seen["app/c"] == {f"tcp:{B}:80": False, f"tcp:{A}:80": True}


def test_node_to_pod_always_allowed_pod_to_node_judged(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    build(lab)
    lab.serve_on_node([9000])
    src = tmp_path / "src"
    deny_all = policy("app/deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    allow_c_out = policy("app/c-out", {"podSelector": {"matchLabels": {"app": "c"}}, "policyTypes": ["Egress"],
                                       "egress": [{"ports": [{"port": 9000}]}]})
    write(src, [*cluster(), deny_all, allow_c_out])
    apply(lab, src, dataplane)
    # Kubelet-style probes from the node into isolated pods always pass, on IPv4 and IPv6
    # (IPv6 also proves neighbour discovery is not blocked).
    lab.node_sh("ip", "-6", "neigh", "flush", "all")
    assert lab.probe_from_node(f"tcp:{A}:80")
    assert lab.probe_from_node(f"tcp:{A6}:80")
    # Pod -> node is egress like any other destination.
    assert not lab.reachable("app/a", "169.254.1.1", 9000)
    assert lab.reachable("app/c", "169.254.1.1", 9000)


def test_port_ranges_and_named_ports(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    build(lab)
    src = tmp_path / "src"
    ranges = policy("app/ranges", {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [
        {"ports": [{"port": 1024, "endPort": 65535}, {"port": 80, "protocol": "UDP"}]}]})
    named = policy("app/named-egress", {"podSelector": {"matchLabels": {"app": "c"}}, "policyTypes": ["Egress"],
                                        "egress": [{"ports": [{"port": "web"}]}]})
    write(src, [*cluster(), ranges, named])
    apply(lab, src, dataplane)
    seen = lab.probe_many({
        "app/a": [f"tcp:{B}:40000", f"tcp:{B}:2000", f"tcp:{B}:81", f"udp:{B}:80", f"tcp:{B}:80"],
        "app/c": [f"tcp:{A}:80", f"tcp:{A}:81", f"tcp:{B}:2000", f"tcp:{B}:40000"],
    })
    assert seen["app/a"] == {f"tcp:{B}:40000": True, f"tcp:{B}:2000": True, f"tcp:{B}:81": False,
                             f"udp:{B}:80": True, f"tcp:{B}:80": False}
    # "web" is 80 on a and 2000 on b: the egress rule resolves per destination pod.
    assert seen["app/c"] == {f"tcp:{A}:80": True, f"tcp:{A}:81": False, f"tcp:{B}:2000": True,
                             f"tcp:{B}:40000": False}


def test_bad_input_keeps_last_good_and_exits_2(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    build(lab)
    src = tmp_path / "src"
    write(src, [*cluster(a={"app": "a", "role": "client"}), DENY_B, ALLOW_A_TO_B])
    apply(lab, src, dataplane)
    broken = json.loads(json.dumps(ALLOW_A_TO_B))
    broken["spec"]["ingress"][0]["ports"] = [{"port": 80, "protocol": "TCPX"}]  # would it widen? no
    deny_c = policy("app/deny-c", {"podSelector": {"matchLabels": {"app": "c"}}})
    write(src, [*cluster(a={"app": "a", "role": "client"}), DENY_B, broken, deny_c])
    err = apply(lab, src, dataplane, expect_rc=2)
    assert "NetworkPolicy app/a-to-b" in err and "spec.ingress[0].ports[0].protocol" in err
    seen = lab.probe_many({"app/a": [f"tcp:{B}:80", f"tcp:{C}:80"]})
    assert seen["app/a"] == {f"tcp:{B}:80": True, f"tcp:{C}:80": False}  # old a-to-b kept; deny-c applied


def test_counters_of_deciding_rules_move(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    build(lab)
    src = tmp_path / "src"
    write(src, [*cluster(a={"app": "a", "role": "client"}), DENY_B, ALLOW_A_TO_B])
    apply(lab, src, dataplane)

    def counters() -> list[dict[str, Any]]:
        out = lab.stockade("counters", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                           "--output", "json", "--state-dir", "")
        return json.loads(out.stdout)

    def packets(rows: list[dict[str, Any]], needle: str) -> int:
        return sum(r["packets"] for r in rows if needle in r["policy"] and r["endpoint"] == "app/b")

    before = counters()
    assert lab.reachable("app/a", B, 80) and not lab.reachable("app/c", B, 80)
    after = counters()
    assert packets(after, "app/a-to-b ingress[0]") > packets(before, "app/a-to-b ingress[0]")
    assert packets(after, "default deny of app/a-to-b, app/deny-b") > packets(before, "default deny")


def test_daemon_applies_changes_without_restart(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    build(lab)
    src = tmp_path / "src"
    write(src, [*cluster(a={"app": "a", "role": "client"}), DENY_B, ALLOW_A_TO_B])
    agent = lab.spawn_agent("run", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                            "--state-dir", str(tmp_path / "state"), "--metrics-address", "127.0.0.1:9754")
    # generous: the eBPF dataplane compiles its program before the first sync
    assert until(lambda: lab.http_get("http://127.0.0.1:9754/readyz")[0] == 200, 60), "agent never ready"
    assert lab.http_get("http://127.0.0.1:9754/healthz")[0] == 200
    assert lab.reachable("app/a", B, 80) and not lab.reachable("app/c", B, 80)

    # A pod's labels change: c becomes a client.
    write(src, [*cluster(a={"app": "a", "role": "client"}, c={"app": "c", "role": "client"}), DENY_B, ALLOW_A_TO_B])
    assert until(lambda: lab.reachable("app/c", B, 80, timeout=0.5))
    # A policy changes: port 80 -> 81.
    changed = json.loads(json.dumps(ALLOW_A_TO_B))
    changed["spec"]["ingress"][0]["ports"] = [{"port": 81}]
    write(src, [*cluster(a={"app": "a", "role": "client"}), DENY_B, changed])
    assert until(lambda: lab.reachable("app/a", B, 81, timeout=0.5) and not lab.reachable("app/a", B, 80, 0.5))
    # Policies are deleted: b is open again.
    write(src, cluster())
    assert until(lambda: lab.reachable("app/c", B, 80, timeout=0.5))
    assert agent.poll() is None, lab.agent_output(agent)
    metrics = lab.http_get("http://127.0.0.1:9754/metrics")[1]
    assert 'stockade_syncs_total{result="success"}' in metrics


def test_apply_converges_and_cleanup_leaves_foreign_state(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    build(lab)
    lab.node_sh("nft", "add table inet foreign; add chain inet foreign c { type filter hook forward priority 10; }")
    lab.node_sh("nft", "add rule inet foreign c tcp dport 9 counter accept")
    src = tmp_path / "src"
    write(src, [*cluster(), DENY_B])
    apply(lab, src, dataplane)
    assert not lab.reachable("app/a", B, 80)
    write(src, cluster())
    apply(lab, src, dataplane)  # the deletion converges
    assert lab.reachable("app/a", B, 80)
    write(src, [*cluster(), DENY_B])
    apply(lab, src, dataplane)
    assert lab.stockade("cleanup", "--dataplane", dataplane).returncode == 0
    assert lab.reachable("app/a", B, 80)
    ruleset = lab.node_sh("nft", "list ruleset").stdout
    assert "table inet foreign" in ruleset and "tcp dport 9 counter" in ruleset
    assert "stockade" not in ruleset


def test_keep_established_leaves_flows(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    build(lab)
    src = tmp_path / "src"
    write(src, cluster())
    apply(lab, src, dataplane)
    to_b = lab.hold("app/a", B, 80)
    assert to_b.ping()
    write(src, [*cluster(), DENY_B])
    res = lab.stockade("apply", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                       "--keep-established", "--state-dir", "")
    assert res.returncode == 0, res.stderr
    assert to_b.ping()  # opened before the policy: kept, as asked
    assert not lab.reachable("app/a", B, 80)  # new connections are judged


def test_strict_mode_cuts_flows_no_longer_allowed(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    enforcement.strict_mode_cuts_flows_no_longer_allowed(lab, dataplane, tmp_path)
