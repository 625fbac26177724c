"""This network namespace's own addresses, by one raw rtnetlink dump.

Strict mode asks for them before the agent is ready (node -> pod flows are never cut);
through pyroute2 that cost its import, ~0.12 s of a 10k cold start or restart on the
nftables dataplane, which needs pyroute2 for nothing else on that path. Constants from
linux/rtnetlink.h and linux/if_addr.h; the dump itself: agent/dataplane/netlink.py.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from agent.dataplane.netlink import NLMSG_DONE, attrs, dump, messages
from agent.ir import IPAddress

_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_IFA_ADDRESS = 1
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index


def parse(buf: bytes, out: list[IPAddress]) -> bool:
    """Append each RTM_NEWADDR's IFA_ADDRESS in `buf` to `out`; True at the dump's end."""
    for typ, start, end in messages(buf, "address dump"):
        if typ == NLMSG_DONE:
            return True
        if typ == _RTM_NEWADDR:
            _address(buf, start, end, out)
    return False


def _address(buf: bytes, start: int, end: int, out: list[IPAddress]) -> None:
    family = buf[start]
    for typ, s, e in attrs(buf, start + _IFADDRMSG.size, end):
        if typ == _IFA_ADDRESS:
            raw = buf[s:e]
            if (family, len(raw)) in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
                out.append(ipaddress.ip_address(raw))
            return  # the first IFA_ADDRESS, as pyroute2's get_attr


def addresses() -> list[IPAddress]:
    """Every interface address (IPv4 and IPv6) in the current network namespace, in the
    kernel's order; raises OSError."""
    out: list[IPAddress] = []
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for buf, typ, start, end in dump(socket.NETLINK_ROUTE, _RTM_GETADDR, body, "address dump"):
        if typ == _RTM_NEWADDR:
            _address(buf, start, end, out)
    return out
