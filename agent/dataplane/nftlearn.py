"""Learned addresses (DNS egress `domainNames` rules) in nftables sets with per-element
timeouts: the set names and declarations the renderer uses, and the element updates
`NftablesDataplane.learn` sends.

Each `Rule.learned` rule of an endpoint's chain matches against two sets of its own,
`l4_<hash>` / `l6_<hash>` (128-bit hash of the IR rule key, never user text), declared
`flags timeout`. The renderer declares them when the rule appears and deletes them when it
goes; no diff, reload or restart ever touches their elements (they are not in
`Model.sets`). Only `learn` writes elements: each with `timeout <ms left>`, so the kernel
forgets it at its expiry with no re-render.

On this kernel (6.18) adding an element that is already in the set replaces its timeout
(later or sooner), so a refresh is a plain add. Removing one the kernel may already have
timed out is `add` then `delete` in one transaction: a plain delete of an absent element
fails the whole transaction.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence

from agent.dataplane.base import LearnedEntry
from agent.ir import IPAddress, Rule

LEARNED_TYPES = {4: "ipv4_addr; flags timeout", 6: "ipv6_addr; flags timeout"}
_PREFIX = {4: "l4_", 6: "l6_"}


def set_name(rule_key: str, fam: int) -> str:
    """The learned set of IR rule `rule_key` for one address family. 128 bits, as for
    every other name in the table: rule keys carry attacker-chosen names."""
    digest = hashlib.blake2s(rule_key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return f"{_PREFIX[fam]}{digest}"


def rule_sets(rule: Rule) -> dict[str, str]:
    """Set name -> nft type declaration of a learned rule's two sets."""
    return {set_name(rule.key, fam): LEARNED_TYPES[fam] for fam in (4, 6)}


def peer_matches(rule: Rule, peer_key: str) -> list[str]:
    """The peer clauses of a learned rule: its own sets, one line per family."""
    return [f"{proto} {peer_key} @{set_name(rule.key, fam)} " for fam, proto in ((4, "ip"), (6, "ip6"))]


def timeout_ms(expires: float, now: float) -> int:
    """Milliseconds left until `expires` (both time.monotonic()), rounded up: 0 means gone."""
    left = expires - now
    return 0 if left <= 0 else max(1, int(left * 1000 + 0.999))


def element_commands(table: str, held: Mapping[str, str] | Iterable[str], add: Sequence[LearnedEntry],
                     remove: Sequence[LearnedEntry], now: float) -> str:
    """nft text for one `learn` transaction: removals (add then delete, so an element the
    kernel already timed out is no error), then additions with their timeouts. Entries of
    rules whose sets `held` does not name, and additions already expired, are left out."""
    held = set(held)
    cmds = []
    for e in remove:
        name = set_name(e.rule, e.address.version)
        if name in held:
            elem = f"{table} {name} {{ {e.address} }}"
            cmds += [f"add element {elem}", f"delete element {elem}"]
    for e in add:
        name = set_name(e.rule, e.address.version)
        ms = timeout_ms(e.expires, now)
        if name in held and ms:
            cmds.append(f"add element {table} {name} {{ {e.address} timeout {ms}ms }}")
    return "".join(c + "\n" for c in cmds)


# ---------------------------------------------------------------- raw nfnetlink
#
# libnftables fetches the table's cache (sets, chains) before an `add element`: ~3 ms at
# 10k pods for one element. The same transaction as an NFNL batch on our own
# NETLINK_NETFILTER socket costs what it carries. `element_commands` stays the reference
# (tests/unit/test_nft_learn_netlink.py compares the two in a kernel).

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_TIMEOUT = 1, 4
NFTA_DATA_VALUE = 1
NLA_F_NESTED = 0x8000
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
BATCH_BYTES = 64 * 1024  # one batch (one transaction) at most: a `learn` is far smaller


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def _element(address: IPAddress, ms: int | None) -> bytes:
    body = _attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _attr(NFTA_DATA_VALUE, address.packed))
    if ms is not None:
        body += _attr(NFTA_SET_ELEM_TIMEOUT, struct.pack(">Q", ms))
    return _attr(NFTA_LIST_ELEM | NLA_F_NESTED, body)


class NetlinkSets:
    """Set-element transactions of one nft table over a NETLINK_NETFILTER socket of the
    caller's network namespace (opened on first use). Not thread-safe: the caller serialises."""

    def __init__(self, family: str, table: str) -> None:
        self.family, self.table = NFPROTO[family], table
        self._sock: socket.socket | None = None
        self._seq = 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def learn(self, held: Mapping[str, str] | Iterable[str], add: Sequence[LearnedEntry],
              remove: Sequence[LearnedEntry], now: float) -> None:
        """What `element_commands` says, as nfnetlink batches (one unless very large).
        Raises OSError (errno from the kernel: the batch is not committed)."""
        held = set(held)
        ops: list[tuple[int, str, bytes]] = []  # (message type, set, one element), in order
        gone: list[tuple[str, bytes]] = []
        for e in remove:
            name = set_name(e.rule, e.address.version)
            if name in held:
                gone.append((name, _element(e.address, None)))
        for name, elem in gone:  # each twice: an element the kernel timed out is no error
            ops.append((NFT_MSG_NEWSETELEM, name, elem))
        ops += [(NFT_MSG_DELSETELEM, name, elem) for name, elem in gone]
        for e in add:
            name = set_name(e.rule, e.address.version)
            ms = timeout_ms(e.expires, now)
            if name in held and ms:
                ops.append((NFT_MSG_NEWSETELEM, name, _element(e.address, ms)))
        if gone and sum(len(x[2]) for x in ops) > BATCH_BYTES:
            self._batch(ops)  # removals and adds must share a transaction: one big batch
            return
        part: list[tuple[int, str, bytes]] = []
        size = 0
        for op in ops:
            if part and size + len(op[2]) > BATCH_BYTES:
                self._batch(part)
                part, size = [], 0
            part.append(op)
            size += len(op[2])
        if part:
            self._batch(part)

    def _socket(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without our message echoed
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.settimeout(5.0)
            s.bind((0, 0))
            self._sock = s
        return self._sock

    def _msg(self, kind: int, flags: int, family: int, res_id: int, payload: bytes) -> tuple[int, bytes]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + payload
        return self._seq, struct.pack("=IHHII", 16 + len(body), kind, flags, self._seq, 0) + body

    def _batch(self, ops: list[tuple[int, str, bytes]]) -> None:
        """One transaction: consecutive ops of one kind and set share a message."""
        table = _attr(NFTA_SET_ELEM_LIST_TABLE, self.table.encode() + b"\0")
        msgs = [self._msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, b"")[1]]
        acks: set[int] = set()
        i = 0
        while i < len(ops):
            kind, name, _ = ops[i]
            j = i
            while j < len(ops) and ops[j][:2] == (kind, name):
                j += 1
            elems = _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, b"".join(op[2] for op in ops[i:j]))
            flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
            seq, msg = self._msg((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, self.family, 0,
                                 table + _attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0") + elems)
            msgs.append(msg)
            acks.add(seq)
            i = j
        msgs.append(self._msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, b"")[1])
        sock = self._socket()
        try:
            sock.send(b"".join(msgs))
            self._wait(sock, acks)
        except OSError:
            self.close()  # a socket left mid-conversation would read stale answers next time
            raise

    @staticmethod
    def _wait(sock: socket.socket, acks: set[int]) -> None:
        """Read the kernel's answer to every message; the first error raises."""
        error = 0
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
                    error = error or code
                off += max(16, (n + 3) & ~3)
        if error:
            raise OSError(error, f"nf_tables refused the learned-address update: {os.strerror(error)}")
