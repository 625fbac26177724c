"""Peers that are pods and peers that are ipBlocks, in one rule, changed under a running
daemon, by packets on every dataplane.

On nftables a rule's single addresses live in a hash set and its wider prefixes in an
interval set of their own (element updates then cost nft no fetch of every interval set):
this checks that both kinds allow, that an element update in either takes effect, and
that a rule losing or gaining its prefixes (its second set) is rewritten, not left stale.
"""

from __future__ import annotations

import copy
from pathlib import Path

from tests.kit import Lab, until
from tests.kit.builders import policy
from tests.kit.enforcement import B6, DENY_B, A, B, build, cluster, write

# b's ingress on port 80: pods labelled role=client, and 10.20.0.0/30 except a (so c, 10.20.0.3).
MIXED = policy("app/mixed", {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [{
    "from": [{"podSelector": {"matchLabels": {"role": "client"}}},
             {"ipBlock": {"cidr": "10.20.0.0/30", "except": [f"{A}/32"]}}],
    "ports": [{"port": 80}]}]})


def _reach(lab: Lab, want: dict[tuple[str, str], bool]) -> bool:
    specs: dict[str, list[str]] = {}
    for src, dst in want:
        specs.setdefault(src, []).append(f"tcp:{dst}:80")
    seen = lab.probe_many(specs, timeout=0.5)
    return all(seen[src][f"tcp:{dst}:80"] == ok for (src, dst), ok in want.items())


def test_pod_and_ipblock_peers_in_one_rule_change_under_the_daemon(lab: Lab, dataplane: str,
                                                                    tmp_path: Path) -> None:
    build(lab)
    src = tmp_path / "src"
    client = {"app": "a", "role": "client"}
    write(src, [*cluster(a=client), DENY_B, MIXED])
    agent = lab.spawn_agent("run", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                            "--state-dir", str(tmp_path / "state"), "--metrics-address", "127.0.0.1:9754")
    assert until(lambda: lab.http_get("http://127.0.0.1:9754/readyz")[0] == 200, 60), "agent never ready"
    # a by its label (both families: its v6 address is only a pod peer), c by the ipBlock.
    assert until(lambda: _reach(lab, {("app/a", B): True, ("app/a", B6): True, ("app/c", B): True}), 20)

    # a loses the label: its addresses leave the rule's peers (element deletes); c stays in.
    write(src, [*cluster(), DENY_B, MIXED])
    assert until(lambda: _reach(lab, {("app/a", B): False, ("app/a", B6): False, ("app/c", B): True}), 20)

    # c gets the label too and the ipBlock goes: the rule loses its prefixes, c stays allowed
    # as a pod, a (back as a client) is allowed again.
    only_pods = copy.deepcopy(MIXED)
    only_pods["spec"]["ingress"][0]["from"] = only_pods["spec"]["ingress"][0]["from"][:1]
    write(src, [*cluster(a=client, c={"app": "c", "role": "client"}), DENY_B, only_pods])
    assert until(lambda: _reach(lab, {("app/a", B): True, ("app/a", B6): True, ("app/c", B): True}), 20)

    # c loses the label: with no ipBlock left, nothing else lets it in.
    write(src, [*cluster(a=client), DENY_B, only_pods])
    assert until(lambda: _reach(lab, {("app/a", B): True, ("app/c", B): False}), 20)

    # The ipBlock comes back (the rule gains its prefix set again): c is in once more.
    write(src, [*cluster(a=client), DENY_B, MIXED])
    assert until(lambda: _reach(lab, {("app/a", B): True, ("app/c", B): True}), 20)
    assert agent.poll() is None, lab.agent_output(agent)
    assert "sync failed" not in lab.agent_output(agent)
