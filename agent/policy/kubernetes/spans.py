"""A peer set edited in place: one address in or out costs O(log n) plus a C-speed copy.

`PeerSet.of` collapses a whole address list (O(n log n) in Python): right for a compile,
too slow when one pod of a 10,000-address peer set changes. `Spans` edits the collapsed
prefixes themselves: it finds the maximal run of adjacent prefixes (one merged range) an
address touches and re-splits only that range, so `peer_set()` yields exactly what
`PeerSet.of` would have made of the same members. Taking a PeerSet over is a list copy.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from agent.inventory import IPAddress
from agent.ir import Network, PeerSet, _prefixes


def _start(n: Network) -> tuple[int, int]:
    return n.version, int(n.network_address)


def _end(n: Network) -> int:
    return int(n.network_address) + (1 << (n.max_prefixlen - n.prefixlen)) - 1


def _adjacent(a: Network, b: Network) -> bool:
    return a.version == b.version and _end(a) + 1 == int(b.network_address)


def _holder(nets: Sequence[Network], v: int, x: int) -> int:
    """Index of the prefix holding address x of family v, or -1."""
    i = bisect_right(nets, (v, x), key=_start) - 1
    return i if i >= 0 and nets[i].version == v and _end(nets[i]) >= x else -1


class Spans:
    """One rule's peer set, editable by address. `static` are prefixes that always belong
    (the rule's ipBlocks): the caller never removes an address they hold."""

    def __init__(self, current: PeerSet, static: PeerSet) -> None:
        self.nets: list[Network] = list(current.nets)
        self.static = static.nets
        self.dirty = False
        self.peer_set_was = current  # the PeerSet these spans describe

    def static_holds(self, ip: IPAddress) -> bool:
        return _holder(self.static, ip.version, int(ip)) >= 0

    def holds(self, ip: IPAddress) -> bool:
        return _holder(self.nets, ip.version, int(ip)) >= 0

    def _run(self, i: int) -> tuple[int, int]:
        """[l, r): the maximal run of adjacent prefixes around index i (one merged range)."""
        nets = self.nets
        lo, hi = i, i + 1
        while lo > 0 and _adjacent(nets[lo - 1], nets[lo]):
            lo -= 1
        while hi < len(nets) and _adjacent(nets[hi - 1], nets[hi]):
            hi += 1
        return lo, hi

    def add(self, ip: IPAddress) -> None:
        v, x = ip.version, int(ip)
        nets = self.nets
        i = bisect_right(nets, (v, x), key=_start) - 1  # the last prefix starting at or before x
        if i >= 0 and nets[i].version == v and _end(nets[i]) >= x:
            return  # already a member
        lo = hi = i + 1
        first = last = x
        if i >= 0 and nets[i].version == v and _end(nets[i]) + 1 == x:
            lo = self._run(i)[0]
            first = int(nets[lo].network_address)
        if i + 1 < len(nets) and nets[i + 1].version == v and int(nets[i + 1].network_address) == x + 1:
            hi = self._run(i + 1)[1]
            last = _end(nets[hi - 1])
        nets[lo:hi] = _prefixes(v, first, last)
        self.dirty = True

    def remove(self, ip: IPAddress) -> None:
        v, x = ip.version, int(ip)
        j = _holder(self.nets, v, x)
        if j < 0:
            return
        lo, hi = self._run(j)
        first, last = int(self.nets[lo].network_address), _end(self.nets[hi - 1])
        self.nets[lo:hi] = [*(_prefixes(v, first, x - 1) if first < x else ()),
                            *(_prefixes(v, x + 1, last) if x < last else ())]
        self.dirty = True

    def peer_set(self) -> PeerSet:
        self.dirty = False
        self.peer_set_was = PeerSet(tuple(self.nets))
        return self.peer_set_was
