"""Strict mode's choice of flows to cut (pure)."""

from __future__ import annotations

import ipaddress

from agent.dataplane.base import Flow
from agent.strict import stale_flows
from tests.kit.builders import BASE, policy, snapshot_of


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


class _Table:
    """A flow table whose first dump misses a flow, as a dump taken while flows come and go can."""

    def __init__(self, flows: list[Flow], missed: Flow) -> None:
        self.flows, self.missed, self.dumps = list(flows), missed, 0

    def apply(self, program: object) -> object:
        return object()

    def established(self) -> list[Flow]:
        self.dumps += 1
        return [f for f in self.flows if self.dumps > 1 or f != self.missed]

    def forget(self, flows: list[Flow]) -> int:
        self.flows = [f for f in self.flows if f not in flows]
        return len(flows)

    def node_addresses(self) -> list:
        return []


def test_enforce_looks_again_after_a_cut() -> None:
    from agent.daemon import enforce

    program = snapshot_of([*BASE, policy("a/deny", {"podSelector": {}, "ingress": []})]).program
    first = Flow.of("udp", "10.0.0.1", "10.0.0.2", 40000, 80)
    second = Flow.of("udp", "10.0.0.1", "10.0.0.2", 40001, 80)
    table = _Table([first, second], missed=second)
    _, cut = enforce(table, program)  # type: ignore[arg-type]
    assert cut == 2 and table.flows == []
