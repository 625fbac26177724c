"""The kernel's connection-tracking table, through pyroute2's netlink Conntrack API."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterable, Iterator

from agent.dataplane.base import Flow

log = logging.getLogger(__name__)
REJUDGED = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", 132: "sctp"}  # what strict mode re-judges
NUMBERS = {v: k for k, v in REJUDGED.items()}


# ctnetlink, read directly: pyroute2 decodes each entry into objects at ~0.5 ms apiece
# (0.44 s for the 816 entries of a restart under probes, on the way to ready); unpacking
# only the original tuple costs a few microseconds. Constants from linux/netfilter/nfnetlink*.h.
NETLINK_NETFILTER = 12
_CT_GET = (1 << 8) | 1  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_CTA_TUPLE_ORIG, _CTA_TUPLE_IP, _CTA_TUPLE_PROTO = 1, 1, 2
_CTA_IP = {1: "src", 2: "dst", 3: "src", 4: "dst"}  # CTA_IP_V4_SRC/DST, CTA_IP_V6_SRC/DST
_CTA_PROTO_NUM, _CTA_PROTO_SRC_PORT, _CTA_PROTO_DST_PORT = 1, 2, 3
_HDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")


def _attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each netlink attribute in buf[start:end]."""
    while start + 4 <= end:
        ln, typ = _NLA.unpack_from(buf, start)
        if ln < 4:
            return
        yield typ & 0x3FFF, start + 4, start + ln
        start += (ln + 3) & ~3


def _flow(buf: bytes, start: int, end: int) -> Flow | None:
    """The original tuple of one conntrack entry (its attributes in buf[start:end])."""
    for typ, s, e in _attrs(buf, start, end):
        if typ != _CTA_TUPLE_ORIG:
            continue
        ips: dict[str, bytes] = {}
        proto = sport = dport = None
        for t2, s2, e2 in _attrs(buf, s, e):
            if t2 == _CTA_TUPLE_IP:
                for t3, s3, e3 in _attrs(buf, s2, e2):
                    if t3 in _CTA_IP:
                        ips[_CTA_IP[t3]] = buf[s3:e3]
            elif t2 == _CTA_TUPLE_PROTO:
                for t3, s3, _ in _attrs(buf, s2, e2):
                    if t3 == _CTA_PROTO_NUM:
                        proto = buf[s3]
                    elif t3 == _CTA_PROTO_SRC_PORT:
                        sport = int.from_bytes(buf[s3:s3 + 2], "big")
                    elif t3 == _CTA_PROTO_DST_PORT:
                        dport = int.from_bytes(buf[s3:s3 + 2], "big")
        name = REJUDGED.get(proto) if proto is not None else None
        if name is None or sport is None or dport is None or len(ips) != 2:
            return None
        return Flow(name, ipaddress.ip_address(ips["src"]), ipaddress.ip_address(ips["dst"]), sport, dport)
    return None


def _dump() -> list[Flow]:
    """Every entry's original tuple, by one ctnetlink dump of all families."""
    out: list[Flow] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sk:
        sk.bind((0, 0))
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)  # nfgenmsg: all families, NFNETLINK_V0
        sk.send(_HDR.pack(_HDR.size + len(body), _CT_GET, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body)
        while True:
            buf = sk.recv(1 << 18)
            pos = 0
            while pos + _HDR.size <= len(buf):
                ln, typ, _, _, _ = _HDR.unpack_from(buf, pos)
                if ln < _HDR.size:
                    raise OSError(f"conntrack dump: malformed message of {ln} bytes")
                if typ == _NLMSG_DONE:
                    return out
                if typ == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", buf, pos + _HDR.size)[0]
                    if code:
                        raise OSError(code, f"conntrack dump: {os.strerror(code)}")
                else:
                    f = _flow(buf, pos + _HDR.size + 4, pos + ln)  # after the 4-byte nfgenmsg
                    if f is not None:
                        out.append(f)
                pos += (ln + 3) & ~3


def established() -> list[Flow]:
    """TCP/UDP/SCTP flows in the current network namespace's conntrack table."""
    try:
        return _dump()
    except OSError as e:  # read through pyroute2 then, as before
        log.debug("conntrack dump through ctnetlink failed (%s); reading it through pyroute2", e)
    from pyroute2 import Conntrack

    out = []
    with Conntrack() as ct:
        for e in ct.dump_entries():
            t = e.tuple_orig
            proto = REJUDGED.get(t.proto)
            if proto is None or t.sport is None or t.dport is None:
                continue
            out.append(Flow.of(proto, t.saddr, t.daddr, t.sport, t.dport))
    return out


def forget(flows: Iterable[Flow]) -> int:
    """Delete the entries of these flows; returns how many went."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    n = 0
    with Conntrack() as ct:
        for f in flows:
            fam = socket.AF_INET if f.src.version == 4 else socket.AF_INET6
            tup = NFCTAttrTuple(family=fam, saddr=str(f.src), daddr=str(f.dst), proto=NUMBERS[f.protocol],
                                sport=f.sport, dport=f.dport)
            try:
                ct.delete(tup)
                n += 1
            except OSError as e:  # already gone (closed meanwhile)
                log.debug("conntrack delete %s: %s", f, e)
    return n
