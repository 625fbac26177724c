"""Set-element transactions on nf_tables over a raw NETLINK_NETFILTER socket: the one
encoder of NFT_MSG_NEWSETELEM / DELSETELEM batches (learned addresses, nftlearn.py; the
element-only diffs of peer sets, nftables.py). Its constants and `attr` also serve the
rule-counter dump (nftcounters.py).

Why not libnftables: before any command it fetches the table's sets (nft 1.0.6 has no
flag to narrow that cache), ~3-4 ms at 10k pods and much more at 50k, whatever the
command changes. A batch here costs what it carries. One batch is one kernel
transaction: the kernel commits all of it or, on any error, none of it.

Not parsing nft text: callers hand element keys (address bytes) and set names, built
from their models.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Sequence

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWRULE, NFT_MSG_GETRULE, NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 6, 7, 12, 14
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_TIMEOUT = 1, 4
NFTA_DATA_VALUE = 1
NLA_F_NESTED = 0x8000
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
SO_SNDBUFFORCE = 32
# An attribute's length is 16 bits: one message's element list stays well below it (a
# set's elements simply go in several messages of the same batch).
MESSAGE_BYTES = 32 * 1024
SNDBUF = 4 << 20  # asked for; a batch must fit the socket's send buffer in one send

class TooLarge(OSError):
    """A batch longer than one send can carry: nothing was sent."""


Op = tuple[int, str, bytes]  # (NFT_MSG_NEWSETELEM or _DELSETELEM, set name, one encoded element)


def attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def header(family: str) -> bytes:
    """nfgenmsg: the family, version 0, resource id 0."""
    return struct.pack("=BBH", NFPROTO[family], 0, 0)


def element(key: bytes, timeout_ms: int | None = None) -> bytes:
    """One set element: its key (an address's packed bytes) and, for a `flags timeout` set,
    its timeout in milliseconds."""
    body = attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, attr(NFTA_DATA_VALUE, key))
    if timeout_ms is not None:
        body += attr(NFTA_SET_ELEM_TIMEOUT, struct.pack(">Q", timeout_ms))
    return attr(NFTA_LIST_ELEM | NLA_F_NESTED, body)


class SetElements:
    """Set-element transactions of one nft table over a NETLINK_NETFILTER socket of the
    caller's network namespace (opened on first use). Not thread-safe: the caller serialises."""

    def __init__(self, family: str, table: str) -> None:
        self.family, self.table = NFPROTO[family], table
        self._sock: socket.socket | None = None
        self._seq = 0
        self._room = 0  # bytes one send may carry (the socket's send buffer, less overhead)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def transaction(self, ops: Sequence[Op]) -> None:
        """`ops` in order as ONE batch (one transaction): consecutive ops of one kind and set
        share a message. Raises OSError (errno from the kernel, the set named): nothing of
        the batch is committed; TooLarge when it exceeds one send: nothing was sent."""
        if not ops:
            return
        table = attr(NFTA_SET_ELEM_LIST_TABLE, self.table.encode() + b"\0")
        msgs = [self._msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, b"")[1]]
        sets: dict[int, str] = {}  # sequence number -> set its message names (for errors)
        i = 0
        while i < len(ops):
            kind, name, _ = ops[i]
            j, size = i, 0
            while j < len(ops) and ops[j][:2] == (kind, name) and (j == i or size + len(ops[j][2]) <= MESSAGE_BYTES):
                size += len(ops[j][2])
                j += 1
            elems = attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, b"".join(op[2] for op in ops[i:j]))
            flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
            seq, msg = self._msg((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, self.family, 0,
                                 table + attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0") + elems)
            msgs.append(msg)
            sets[seq] = name
            i = j
        msgs.append(self._msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, b"")[1])
        data = b"".join(msgs)
        sock = self._socket()
        if len(data) > self._room:
            raise TooLarge(errno.EMSGSIZE, f"a set-element batch of {len(data)} bytes: one send carries {self._room}")
        try:
            sock.send(data)
            self._wait(sock, sets)
        except OSError:
            self.close()  # a socket left mid-conversation would read stale answers next time
            raise

    def _socket(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without our message echoed
            try:  # past net.core.wmem_max (we hold CAP_NET_ADMIN); else what it allows
                s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.settimeout(5.0)
            s.bind((0, 0))
            # The kernel refuses a send longer than the send buffer less 32 bytes.
            self._room = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 64
            self._sock = s
        return self._sock

    def _msg(self, kind: int, flags: int, family: int, res_id: int, payload: bytes) -> tuple[int, bytes]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + payload
        return self._seq, struct.pack("=IHHII", 16 + len(body), kind, flags, self._seq, 0) + body

    @staticmethod
    def _wait(sock: socket.socket, sets: dict[int, str]) -> None:
        """Read the kernel's answer to every message; the first error raises."""
        acks = set(sets)
        error, where = 0, ""
        while acks:
            data = sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                n, kind, _, seq, _ = struct.unpack_from("=IHHII", data, off)
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, off + 16)[0]
                    if seq not in acks and code:  # the batch itself refused: no acks follow
                        acks.clear()
                    acks.discard(seq)
                    if code and not error:
                        error, where = code, sets.get(seq, "")
                off += max(16, (n + 3) & ~3)
        if error:
            what = f" (set {where})" if where else ""
            raise OSError(error, f"nf_tables refused the set-element update{what}: {os.strerror(error)}")
