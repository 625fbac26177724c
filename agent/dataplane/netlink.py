"""Raw netlink dumps: one request, then every reply message until NLMSG_DONE, and the
attributes inside a message. Shared by the conntrack dump (agent/dataplane/conntrack.py)
and the address dump (agent/dataplane/netaddr.py), which read a few fields each where a
netlink library's import and decoder would cost more than the read. Constants from
linux/netlink.h.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3
HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
NLA = struct.Struct("=HH")  # nlattr: length, type


class DumpInterrupted(OSError):
    """The dumped state changed while the dump ran (NLM_F_DUMP_INTR): what came is not one
    consistent view; the caller may dump again."""


def messages(buf: bytes, what: str, consistent: bool = False) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, end) of each message in one datagram, NLMSG_DONE included (the
    dump's end); a malformed message or an error reply raises OSError naming `what`. With
    `consistent`, a message the kernel marked NLM_F_DUMP_INTR raises DumpInterrupted."""
    pos = 0
    while pos + HDR.size <= len(buf):
        ln, typ, flags, _, _ = HDR.unpack_from(buf, pos)
        if ln < HDR.size or pos + ln > len(buf):
            raise OSError(f"{what}: malformed message of {ln} bytes")
        if consistent and flags & NLM_F_DUMP_INTR:
            raise DumpInterrupted(errno.EINTR, f"{what}: changed while dumped")
        if typ == NLMSG_ERROR:
            code = -struct.unpack_from("=i", buf, pos + HDR.size)[0]
            if code:
                raise OSError(code, f"{what}: {os.strerror(code)}")
        else:
            yield typ, pos + HDR.size, pos + ln
        pos += (ln + 3) & ~3


def attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in buf[start:end]."""
    while start + 4 <= end:
        ln, typ = NLA.unpack_from(buf, start)
        if ln < 4:
            return
        yield typ & 0x3FFF, start + 4, start + ln
        start += (ln + 3) & ~3


def dump(protocol: int, msg_type: int, body: bytes, what: str, rcvbuf: int = 0,
         bufsize: int = 1 << 16, consistent: bool = False) -> Iterator[tuple[bytes, int, int, int]]:
    """(datagram, type, payload start, end) of every reply message to one dump request,
    one datagram held at a time (see `messages` for `consistent`)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol) as sk:
        sk.bind((0, 0))
        if rcvbuf:
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sk.send(HDR.pack(HDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        while True:
            buf = sk.recv(bufsize)
            for typ, start, end in messages(buf, what, consistent):
                if typ == NLMSG_DONE:
                    return
                yield buf, typ, start, end
