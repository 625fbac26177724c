"""Rule counters of one nft table read by a raw NFT_MSG_GETRULE dump, streamed: what a
/metrics scrape needs (`NftablesDataplane.counters`) without libnftables.

Why: `list table` through libnftables fetches the table's whole cache first (every set
with its elements: ~27k at 10k pods), renders it all as JSON, and Python parses all of
it, though a scrape needs only the counter and the comment of each rule in an endpoint
chain: the agent peaked ~20 MB above its resting size at its first scrape at 10k pods.
Here the kernel sends rules only (the dump names our table), one datagram (<= 32 KB) is
held at a time, and each rule gives just its chain, its first `counter` expression and
its comment; rules of chains the caller does not own are passed over after their chain.

Attribute numbers: linux/netfilter/nf_tables.h. The comment lives in NFTA_RULE_USERDATA
as libnftnl writes it: TLVs of (type u8, length u8, value), type 0
(NFTNL_UDATA_RULE_COMMENT) a NUL-terminated string.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import TypeVar

from agent.dataplane import netlink, nfnetlink

NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_USERDATA = 1, 2, 4, 7
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NFTNL_UDATA_RULE_COMMENT = 0
NFGENMSG = 4  # bytes of nfgenmsg before a message's attributes
RETRIES = 5  # dumps again while a commit interrupts one (NLM_F_DUMP_INTR)
_U64 = struct.Struct(">Q")

Rule = tuple[str, int, int, str]  # chain, packets, bytes, comment
T = TypeVar("T")


def comment(udata: bytes | memoryview) -> str:
    """The comment in a rule's NFTA_RULE_USERDATA ("" without one)."""
    pos = 0
    while pos + 2 <= len(udata):
        kind, ln = udata[pos], udata[pos + 1]
        value = bytes(udata[pos + 2:pos + 2 + ln])
        if kind == NFTNL_UDATA_RULE_COMMENT:
            return value.split(b"\0", 1)[0].decode("utf-8", "replace")
        pos += 2 + ln
    return ""


def _counter(buf: bytes, start: int, end: int) -> tuple[int, int] | None:
    """(packets, bytes) of the first `counter` expression in NFTA_RULE_EXPRESSIONS."""
    for typ, s, e in netlink.attrs(buf, start, end):
        if typ != NFTA_LIST_ELEM:
            continue
        name = data = None
        for t, s2, e2 in netlink.attrs(buf, s, e):
            if t == NFTA_EXPR_NAME:
                name = buf[s2:e2].rstrip(b"\0")
            elif t == NFTA_EXPR_DATA:
                data = (s2, e2)
        if name != b"counter" or data is None:
            continue
        packets = nbytes = 0
        for t, s2, e2 in netlink.attrs(buf, *data):
            if t == NFTA_COUNTER_PACKETS and e2 - s2 >= 8:
                packets = _U64.unpack_from(buf, s2)[0]
            elif t == NFTA_COUNTER_BYTES and e2 - s2 >= 8:
                nbytes = _U64.unpack_from(buf, s2)[0]
        return packets, nbytes
    return None


def rule(buf: bytes, start: int, end: int, wanted: Callable[[str], bool]) -> Rule | None:
    """One NFT_MSG_NEWRULE message's payload (nfgenmsg first): its chain, counter and
    comment; None without a counter or when `wanted` refuses its chain."""
    chain = ""
    count: tuple[int, int] | None = None
    note = ""
    for typ, s, e in netlink.attrs(buf, start + NFGENMSG, end):
        if typ == NFTA_RULE_CHAIN:
            chain = buf[s:e].rstrip(b"\0").decode("utf-8", "replace")
            if not wanted(chain):
                return None
        elif typ == NFTA_RULE_EXPRESSIONS:
            count = _counter(buf, s, e)
        elif typ == NFTA_RULE_USERDATA:
            note = comment(memoryview(buf)[s:e])
    if count is None or not chain:
        return None
    return chain, count[0], count[1], note


def rules(family: str, table: str, wanted: Callable[[str], bool]) -> Iterator[Rule]:
    """Each counted rule of `table` in chains `wanted` accepts, in the kernel's order, as
    the dump arrives. A table that is not there gives none. Raises OSError (DumpInterrupted
    when the caller's consumption overlapped a commit: see `read`)."""
    body = nfnetlink.header(family) + nfnetlink.attr(NFTA_RULE_TABLE, table.encode() + b"\0")
    kind = (nfnetlink.NFNL_SUBSYS_NFTABLES << 8) | nfnetlink.NFT_MSG_GETRULE
    for buf, typ, start, end in netlink.dump(nfnetlink.NETLINK_NETFILTER, kind, body, f"rules of table {table}",
                                             consistent=True):
        if typ & 0xFF != nfnetlink.NFT_MSG_NEWRULE:
            continue
        got = rule(buf, start, end, wanted)
        if got is not None:
            yield got


def read(family: str, table: str, wanted: Callable[[str], bool], fold: Callable[[], T],
         add: Callable[[T, Rule], None]) -> T:
    """`fold()` fed every counted rule by `add`, as the dump streams; dumped again (a fresh
    fold) when a commit interrupted it, so the result is one consistent view."""
    for attempt in range(RETRIES):
        acc = fold()
        try:
            for r in rules(family, table, wanted):
                add(acc, r)
            return acc
        except netlink.DumpInterrupted:
            if attempt == RETRIES - 1:
                raise
    raise AssertionError("unreachable")
