"""Strict mode's choice of flows to cut (pure)."""

from __future__ import annotations

import ipaddress

from agent.strict import Flow, stale_flows
from tests.helpers import policy, snapshot_of
from tests.unit.test_semantics import BASE


def test_only_flows_the_program_denies_are_stale() -> None:
    docs = [*BASE, policy("a/api", {"podSelector": {"matchLabels": {"app": "api"}}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 9090}]}]})]
    program = snapshot_of(docs).program
    allowed = Flow.of("tcp", "10.0.0.1", "10.0.0.2", 40000, 9090)
    denied_port = Flow.of("tcp", "10.0.0.1", "10.0.0.2", 40001, 22)
    denied_peer = Flow.of("udp", "10.0.1.1", "10.0.0.2", 5000, 9090)
    unjudged = Flow.of("tcp", "192.0.2.1", "198.51.100.1", 1, 2)
    from_node = Flow.of("tcp", "192.168.0.10", "10.0.0.2", 50000, 8080)  # kubelet probe
    stale = stale_flows(program, [allowed, denied_port, denied_peer, unjudged, from_node],
                        [ipaddress.ip_address("192.168.0.10")])
    assert stale == [denied_port, denied_peer]
