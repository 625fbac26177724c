"""The raw rtnetlink address dump (agent.dataplane.netaddr) reads what pyroute2 read."""

from __future__ import annotations

import ipaddress
import socket
import struct

from agent.dataplane import netaddr
from agent.ir import IPAddress


def nlmsg(typ: int, body: bytes) -> bytes:
    msg = struct.pack("=IHHII", 16 + len(body), typ, 2, 1, 0) + body
    return msg + b"\0" * (-len(msg) % 4)


def nla(typ: int, payload: bytes) -> bytes:
    a = struct.pack("=HH", 4 + len(payload), typ) + payload
    return a + b"\0" * (-len(a) % 4)


def newaddr(family: int, *attrs: bytes) -> bytes:
    return nlmsg(20, struct.pack("=BBBBI", family, 24, 0, 0, 3) + b"".join(attrs))


def test_parse_takes_each_messages_first_ifa_address() -> None:
    v4, peer, v6 = ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("10.9.9.9"), ipaddress.ip_address("fd00::7")
    # IFA_LABEL, IFA_LOCAL, then IFA_ADDRESS (a point-to-point peer)
    buf = (newaddr(socket.AF_INET, nla(3, b"lo\0"), nla(2, v4.packed), nla(1, peer.packed))
           + newaddr(socket.AF_INET6, nla(1, v6.packed), nla(1, v4.packed))
           + newaddr(socket.AF_INET, nla(3, b"eth0\0"))  # no address: skipped
           + nlmsg(3, b"\0\0\0\0"))
    out: list[IPAddress] = []
    assert netaddr.parse(buf, out)
    assert out == [peer, v6]


def test_parse_without_done_asks_for_more() -> None:
    out: list[IPAddress] = []
    assert not netaddr.parse(newaddr(socket.AF_INET, nla(1, bytes([192, 0, 2, 1]))), out)
    assert out == [ipaddress.ip_address("192.0.2.1")]


def test_the_dump_equals_pyroute2s_in_this_namespace() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        want = [ipaddress.ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()]
    assert netaddr.addresses() == want
