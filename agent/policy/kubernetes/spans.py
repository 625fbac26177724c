"""A peer set edited in place: one address in or out costs O(log n) plus a C-speed copy.

`PeerSet.of` collapses a whole address list (O(n log n) in Python): right for a compile,
too slow when one pod of a 10,000-address peer set changes. `Spans` keeps the collapsed
form (disjoint, non-adjacent inclusive ranges per family, each with its prefixes) and
edits it by one address; `peer_set()` yields exactly what `PeerSet.of` would have made of
the same members.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import chain

from agent.inventory import IPAddress
from agent.ir import Network, PeerSet, _prefixes

Span = tuple[int, int, int]  # (family, first, last) as integers, inclusive


def _spans_of(nets: tuple[Network, ...]) -> list[Span]:
    """The ranges of collapsed prefixes (in order), adjacent ones joined."""
    out: list[list[int]] = []
    for n in nets:
        a = int(n.network_address)
        b = a + n.num_addresses - 1
        if out and out[-1][0] == n.version and out[-1][2] + 1 == a:
            out[-1][2] = b
        else:
            out.append([n.version, a, b])
    return [(v, a, b) for v, a, b in out]


class Spans:
    """The members of one rule's peer set, editable by address. `static` are ranges that
    always belong (the rule's ipBlocks): an address inside them never leaves."""

    def __init__(self, current: PeerSet, static: PeerSet) -> None:
        self.spans = _spans_of(current.nets)
        self.prefixes: list[tuple[Network, ...]] = [tuple(_prefixes(v, a, b)) for v, a, b in self.spans]
        self.static = _spans_of(static.nets)
        self.dirty = False
        self.peer_set_was = current  # the PeerSet these spans describe

    @staticmethod
    def _find(spans: list[Span], v: int, x: int) -> int:
        """Index of the span holding (v, x), or -1."""
        i = bisect_right(spans, (v, x, 1 << 129)) - 1
        if i >= 0 and spans[i][0] == v and spans[i][1] <= x <= spans[i][2]:
            return i
        return -1

    def static_holds(self, ip: IPAddress) -> bool:
        return self._find(self.static, ip.version, int(ip)) >= 0

    def holds(self, ip: IPAddress) -> bool:
        return self._find(self.spans, ip.version, int(ip)) >= 0

    def _put(self, i: int, new: list[Span], drop: int) -> None:
        self.spans[i:i + drop] = new
        self.prefixes[i:i + drop] = [tuple(_prefixes(*s)) for s in new]
        self.dirty = True

    def add(self, ip: IPAddress) -> None:
        v, x = ip.version, int(ip)
        if self.holds(ip):
            return
        i = bisect_left(self.spans, (v, x, x))  # the first span after x
        before = i > 0 and self.spans[i - 1][0] == v and self.spans[i - 1][2] + 1 == x
        after = i < len(self.spans) and self.spans[i][0] == v and self.spans[i][1] == x + 1
        first = self.spans[i - 1][1] if before else x
        last = self.spans[i][2] if after else x
        self._put(i - 1 if before else i, [(v, first, last)], int(before) + int(after))

    def remove(self, ip: IPAddress) -> None:
        """`ip` leaves (the caller checked that no member and no static range holds it)."""
        v, x = ip.version, int(ip)
        i = self._find(self.spans, v, x)
        if i < 0:
            return
        _, a, b = self.spans[i]
        self._put(i, [s for s in ((v, a, x - 1), (v, x + 1, b)) if s[1] <= s[2]], 1)

    def peer_set(self) -> PeerSet:
        self.dirty = False
        self.peer_set_was = PeerSet(tuple(chain.from_iterable(self.prefixes)))
        return self.peer_set_was
