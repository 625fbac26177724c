"""Destinations learned from DNS answers (domainNames rules) in the `learned` map: what the
agent remembers (`Memory`: endpoint -> address -> learned rule key -> expiry), and what
one endpoint generation holds for them (`LearnGen`: a `learned` entry per destination and
the `ports` entries of the classes only learned destinations have). Written by
`EbpfDataplane.learn` without a generation flip; rewritten for every new generation before
its flip.

Times are time.monotonic() seconds here and bpf_ktime_get_ns() nanoseconds in the map:
both CLOCK_MONOTONIC.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from agent.dataplane.ebpf.layout import DIR_EGRESS, k_learn, k_port, v_learn, v_port
from agent.dataplane.ebpf.tables import DirTables, Entry, learned_class_ports, learned_stages
from agent.ir import LEARNED_MARK, IPAddress, Rule

Items = list[tuple[bytes, bytes]]
MASK_BITS = 32  # learned rule keys per endpoint a `learned` value names (more: not restored after a restart)


def endpoint_of(rule_key: str) -> str:
    """The endpoint key a learned rule key names (`learned_rule_key`)."""
    return rule_key.rpartition(LEARNED_MARK)[2]


def learned_index(rules: tuple[Rule, ...]) -> dict[str, tuple[int, ...]]:
    """Learned rule key -> the indices of the rules with that key."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(rules):
        if r.learned:
            out.setdefault(r.key, []).append(i)
    return {k: tuple(v) for k, v in out.items()}


@dataclass
class Memory:
    """Every learned (endpoint, address, rule) with its expiry, and a heap of expiries so
    the lazy sweep costs what expired, not what is held. A refresh to a later expiry
    pushes nothing: its item, popped at the earlier time, is pushed again at the later
    one, so pods resolving the same names do not grow the heap (an item each time was
    ~130 bytes per entry and refresh until the next compaction)."""

    held: dict[str, dict[IPAddress, dict[str, float]]] = field(default_factory=dict)
    _heap: list[tuple[float, int, str, IPAddress, str]] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)  # type: ignore[type-arg]
    n: int = 0  # (endpoint, address) pairs held: one `learned` entry each

    def put(self, ep: str, ip: IPAddress, rule: str, expires: float) -> None:
        by_ip = self.held.setdefault(ep, {})
        if ip not in by_ip:
            by_ip[ip] = {}
            self.n += 1
        rules = by_ip[ip]
        was = rules.get(rule)
        rules[rule] = expires
        if was is None or expires < was:  # a later expiry: the earlier item moves on when popped
            heapq.heappush(self._heap, (expires, next(self._seq), ep, ip, rule))

    def drop(self, ep: str, ip: IPAddress, rule: str) -> bool:
        by_ip = self.held.get(ep)
        rules = by_ip.get(ip) if by_ip else None
        if rules is None or rules.pop(rule, None) is None:
            return False
        if not rules:
            del by_ip[ip]  # type: ignore[union-attr]
            self.n -= 1
            if not by_ip:
                del self.held[ep]
        return True

    def expire(self, now: float) -> dict[str, set[IPAddress]]:
        """Forget what expired by `now`; the (endpoint, addresses) it touched."""
        touched: dict[str, set[IPAddress]] = {}
        while self._heap and self._heap[0][0] <= now:
            t, _, ep, ip, rule = heapq.heappop(self._heap)
            cur = self.held.get(ep, {}).get(ip, {}).get(rule)
            if cur is None:
                continue
            if cur <= now:  # not refreshed since
                if self.drop(ep, ip, rule):
                    touched.setdefault(ep, set()).add(ip)
            elif cur > t:  # refreshed to a later expiry: its item moves there
                heapq.heappush(self._heap, (cur, next(self._seq), ep, ip, rule))
        if len(self._heap) > 4 * max(16, self.n):  # drops and earlier expiries leave stale heap items
            self._heap = [(t, s, ep, ip, r) for ep, by_ip in self.held.items() for ip, rs in by_ip.items()
                          for r, t in rs.items() for s in (next(self._seq),)]
            heapq.heapify(self._heap)
        return touched

    def forget(self, ep: str, keep: dict[str, tuple[int, ...]] | None = None) -> None:
        """Forget an endpoint's entries (all, or those of rules not in `keep`)."""
        by_ip = self.held.get(ep)
        if by_ip is None:
            return
        if keep is None:
            self.n -= len(self.held.pop(ep))
            return
        for ip in list(by_ip):
            for rule in [r for r in by_ip[ip] if r not in keep]:
                self.drop(ep, ip, rule)

    def count(self) -> int:
        return self.n


@dataclass
class LearnGen:
    """What `learned` and `ports` hold for one endpoint's learned destinations at one
    generation: classes beyond the tables' own (numbered on from them), their `ports`
    keys, and the destinations with an entry."""

    gen: int
    next_cls: int
    classes: dict[tuple[int, ...], int] = field(default_factory=dict)
    ports: list[bytes] = field(default_factory=list)
    written: set[IPAddress] = field(default_factory=set)
    known: dict[tuple[int, ...], int] = field(default_factory=dict)  # the tables' own classes by members

    @classmethod
    def of(cls, gen: int, tables: DirTables) -> LearnGen:
        return cls(gen, len(tables.members) + 1, known={m: i + 1 for i, m in enumerate(tables.members)})

    def keys(self, ep_id: int) -> list[Entry]:
        return [("learned", k_learn(ep_id, self.gen, ip)) for ip in self.written] + [("ports", k) for k in self.ports]


def compute(ep_id: int, lg: LearnGen, tables: DirTables, rules: tuple[Rule, ...], isolated: bool,
            counters: dict[tuple[int, str], int], index: dict[str, tuple[int, ...]],
            dests: dict[IPAddress, dict[str, float]], now: float) -> tuple[Items, Items, list[IPAddress]]:
    """(new `ports` items, `learned` items, destinations to delete) for these destinations
    at `lg`'s generation; new classes are entered in `lg` (the caller writes the `ports`
    items first: no entry points to a class before it exists)."""
    known = lg.known
    bits = {k: i for i, k in enumerate(index)}  # a stage's rules as a mask (read back by `restore`)
    ports: Items = []
    items: Items = []
    gone: list[IPAddress] = []
    for ip, held in dests.items():
        by_idx = {index[k]: t for k, t in held.items() if k in index}
        stages = learned_stages(rules, ip, by_idx, now)
        if not stages:
            gone.append(ip)
            continue
        value = []
        for t, members in stages:
            cls = known.get(members) or lg.classes.get(members)
            if cls is None:
                cls = lg.classes[members] = lg.next_cls
                lg.next_cls += 1
                for (proto, has_port, port, plen), (verdict, idx) in learned_class_ports(
                        rules, members, isolated).items():
                    k = k_port(ep_id, lg.gen, cls, DIR_EGRESS, proto, has_port, port, plen)
                    ports.append((k, v_port(counters[(DIR_EGRESS, tables.rule_ids[idx])], verdict)))
                    lg.ports.append(k)
            mask = sum(1 << bits[k] for k, e in held.items()
                       if k in bits and bits[k] < MASK_BITS and e > now and e >= t)
            value.append((int(t * 1e9), cls, mask))
        items.append((k_learn(ep_id, lg.gen, ip), v_learn(value)))
    return ports, items, gone


def restore(lg: LearnGen, index: dict[str, tuple[int, ...]], pinned: list[tuple[IPAddress, list[tuple[int, int, int]]]],
            memory: Memory, ep: str) -> None:
    """After a restart, for an endpoint whose tables were kept: what the previous agent
    learned, back into `memory` and `lg` from its `learned` entries (the rule of each
    bit of a stage's mask learned until that stage's expiry or a later one's)."""
    keys = list(index)
    for ip, stages in pinned:
        until: dict[str, int] = {}
        for t, cls, mask in stages:
            lg.next_cls = max(lg.next_cls, cls + 1)
            for b in range(min(len(keys), MASK_BITS)):
                if mask >> b & 1:
                    until[keys[b]] = max(until.get(keys[b], 0), t)
        for rule, t in until.items():
            memory.put(ep, ip, rule, t / 1e9)
        lg.written.add(ip)
