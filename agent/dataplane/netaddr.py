"""This network namespace's own addresses, by one raw rtnetlink dump.

Strict mode asks for them before the agent is ready (node -> pod flows are never cut);
through pyroute2 that cost its import, ~0.12 s of a 10k cold start or restart on the
nftables dataplane, which needs pyroute2 for nothing else on that path. Constants from
linux/rtnetlink.h and linux/if_addr.h.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from agent.ir import IPAddress

_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_IFA_ADDRESS = 1
_HDR = struct.Struct("=IHHII")  # nlmsghdr
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_NLA = struct.Struct("=HH")


def parse(buf: bytes, out: list[IPAddress]) -> bool:
    """Append each RTM_NEWADDR's IFA_ADDRESS in `buf` to `out`; True at the dump's end."""
    pos = 0
    while pos + _HDR.size <= len(buf):
        ln, typ, _, _, _ = _HDR.unpack_from(buf, pos)
        if ln < _HDR.size or pos + ln > len(buf):
            raise OSError(f"address dump: malformed message of {ln} bytes")
        if typ == _NLMSG_DONE:
            return True
        if typ == _NLMSG_ERROR:
            code = -struct.unpack_from("=i", buf, pos + _HDR.size)[0]
            if code:
                raise OSError(code, f"address dump: {os.strerror(code)}")
        elif typ == _RTM_NEWADDR:
            family = buf[pos + _HDR.size]
            a, end = pos + _HDR.size + _IFADDRMSG.size, pos + ln
            while a + 4 <= end:
                alen, atyp = _NLA.unpack_from(buf, a)
                if alen < 4:
                    break
                if atyp & 0x3FFF == _IFA_ADDRESS:
                    raw = buf[a + 4:a + alen]
                    if (family, len(raw)) in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
                        out.append(ipaddress.ip_address(raw))
                    break  # the first IFA_ADDRESS, as pyroute2's get_attr
                a += (alen + 3) & ~3
        pos += (ln + 3) & ~3
    return False


def addresses() -> list[IPAddress]:
    """Every interface address (IPv4 and IPv6) in the current network namespace, in the
    kernel's order; raises OSError."""
    out: list[IPAddress] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sk:
        sk.bind((0, 0))
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sk.send(_HDR.pack(_HDR.size + len(body), _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body)
        while not parse(sk.recv(1 << 16), out):
            pass
    return out
