"""The eBPF packet tests' lab pods and the IR programs they load (shared by the dataplane and restart tests)."""

from __future__ import annotations

import ipaddress

from agent.ir import (
    Direction,
    DirectionProgram,
    EndpointProgram,
    Origin,
    PeerSet,
    PortMatch,
    Program,
    Rule,
    Verdict,
)
from tests.kit import Lab

A, B, C = "10.30.0.1", "10.30.0.2", "10.30.0.3"
A6, B6 = "fd00:30::1", "fd00:30::2"
NODE4 = "10.30.255.254"
B_PORTS = (80, 81, 1023, 1024, 8000, 8003, 8004, 40000, 65535)


def origin(i: int, d: Direction = Direction.INGRESS, pol: str = "p") -> Origin:
    return Origin("file", "app", pol, d, i)


def net(*xs: str) -> PeerSet:
    return PeerSet.of(ipaddress.ip_network(x) for x in xs)


def program() -> Program:
    eg = Direction.EGRESS
    b_in = DirectionProgram(True, (
        Rule(origin(0), net(C), (PortMatch("tcp", 80, 80),), Verdict.DROP, key="c-drop"),
        Rule(origin(1), net("10.30.0.0/24", "fd00:30::/64"), (PortMatch("tcp", 1024, 65535),), key="wide"),
        Rule(origin(2), net(A, A6), (PortMatch("tcp", 80, 80), PortMatch("udp", 8000, 8003)), key="a-web"),
        Rule(origin(3), None, (PortMatch("icmp"),), key="icmp"),
    ))
    a_eg = DirectionProgram(True, (
        Rule(origin(0, eg, "q"), net(B, B6), (), key="to-b"),
    ))
    return Program("file", {
        "app/a": EndpointProgram("app/a", tuple(map(ipaddress.ip_address, (A, A6))),
                                 ingress=DirectionProgram(True), egress=a_eg),
        "app/b": EndpointProgram("app/b", tuple(map(ipaddress.ip_address, (B, B6))), ingress=b_in,
                                 egress=DirectionProgram(True)),
        "app/c": EndpointProgram("app/c", (ipaddress.ip_address(C),)),
    })


def build(lab: Lab) -> None:
    lab.add_pod("app/a", [A, A6], ports=(80, 81))
    lab.add_pod("app/b", [B, B6], ports=B_PORTS)
    lab.add_pod("app/c", [C], ports=(80, 81))
    lab.node_sh("ip", "addr", "add", f"{NODE4}/32", "dev", "lo")
