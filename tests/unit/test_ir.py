"""IR building blocks (property tests with hypothesis)."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from agent.ir import PeerSet, PortMatch

v4_nets = st.builds(lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
                    st.integers(0, 2**32 - 1), st.integers(0, 32))
v6_nets = st.builds(lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
                    st.integers(0, 2**128 - 1), st.integers(0, 128))
v4_hosts = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))


@given(st.lists(st.one_of(v4_nets, v6_nets, v4_hosts), max_size=30))
def test_peer_set_collapses_like_the_stdlib(items: list) -> None:
    nets = [ipaddress.ip_network(i) for i in items]
    want = [*ipaddress.collapse_addresses([n for n in nets if n.version == 4]),
            *ipaddress.collapse_addresses([n for n in nets if n.version == 6])]
    assert list(PeerSet.of(items).nets) == want


@given(st.lists(st.one_of(v4_nets, v4_hosts), max_size=10), v4_hosts)
def test_peer_set_contains_matches_membership(items: list, probe: ipaddress.IPv4Address) -> None:
    nets = [ipaddress.ip_network(i) for i in items]
    assert PeerSet.of(items).contains(probe) == any(probe in n for n in nets)


def test_port_match_ranges() -> None:
    pm = PortMatch("tcp", 1024, 65535)
    assert pm.matches("tcp", 1024) and pm.matches("tcp", 65535) and not pm.matches("tcp", 1023)
    assert not pm.matches("udp", 2000)
    assert PortMatch("udp").matches("udp", 1) and PortMatch("icmp").matches("icmp", None)
