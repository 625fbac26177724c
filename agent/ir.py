"""The intermediate representation: what every dataplane programs and the simulator evaluates.

Semantics modules (`agent.policy.*`) produce it; dataplanes render it without
interpreting policy. Per local endpoint and direction it says whether the endpoint
is isolated and gives an ordered rule list; the first matching rule decides, and
when none matches the packet is dropped if the direction is isolated.

Invariants the semantics guarantee and dataplanes rely on:
- `PeerSet.nets` are collapsed: disjoint prefixes, no overlaps (interval sets and
  LPM tries take them as they are).
- Rules with the same `key` have the same `peers` in every endpoint of a Program, so
  a dataplane may keep one kernel set per key and update its elements in place when
  memberships change.
- Drop rules come before accept rules when the policy language says drops win.
- Tiers (ClusterNetworkPolicy): a direction's rules are ordered by tier -- ADMIN, then
  POLICY (NetworkPolicy, NetBird), then BASELINE. A matching ADMIN rule with verdict PASS
  skips the rest of the ADMIN tier; an isolated direction that no ADMIN or POLICY rule
  decides is dropped before BASELINE is reached; a matching BASELINE PASS allows.
  `first_match` is that order, the one copy every dataplane compiler and the simulator use.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

from agent.inventory import IPAddress  # re-exported: dataplanes import only agent.ir

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Transport protocols the IR knows. "icmp" means ICMP for IPv4 and ICMPv6 for IPv6.
PROTOCOLS = ("tcp", "udp", "sctp", "icmp")
PORTED = ("tcp", "udp", "sctp")
# IR rule key of a domainNames rule: <rule key>/domains@<endpoint key> (agent/policy/cluster/domains.py)
LEARNED_MARK = "/domains@"


class Verdict(StrEnum):
    ACCEPT = "accept"
    DROP = "drop"
    PASS = "pass"  # ClusterNetworkPolicy Pass: leave the ADMIN tier (in BASELINE: allow)


class Tier(StrEnum):
    """Where a rule sits in a direction's evaluation order (see the module docstring)."""

    ADMIN = "admin"
    POLICY = "policy"  # NetworkPolicy and NetBird: the namespace owners' tier
    BASELINE = "baseline"

    @property
    def title(self) -> str:
        return {"admin": "Admin", "policy": "NetworkPolicy", "baseline": "Baseline"}[self.value]


class Direction(StrEnum):
    INGRESS = "ingress"  # traffic entering the endpoint
    EGRESS = "egress"  # traffic leaving the endpoint


@dataclass(frozen=True)
class PortMatch:
    """A protocol and an inclusive port range; `first is None` means every port."""

    protocol: str
    first: int | None = None
    last: int | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}")
        if (self.first is None) != (self.last is None):
            raise ValueError("port range needs both ends")
        if self.first is not None and self.last is not None:
            if self.protocol not in PORTED:
                raise ValueError(f"{self.protocol} has no ports")
            if not 0 <= self.first <= self.last <= 65535:
                raise ValueError(f"bad port range {self.first}-{self.last}")

    def sort_key(self) -> tuple[str, int, int]:
        return (self.protocol, -1 if self.first is None else self.first, -1 if self.last is None else self.last)

    @staticmethod
    def canonical(ports: Iterable[PortMatch]) -> tuple[PortMatch, ...]:
        """Deduplicated, in a stable order (rules compare equal when their ports do)."""
        return tuple(sorted(set(ports), key=PortMatch.sort_key))

    def matches(self, protocol: str, port: int | None) -> bool:
        if protocol != self.protocol:
            return False
        if self.first is None:
            return True
        return port is not None and self.first <= port <= (self.last or self.first)

    def __str__(self) -> str:
        if self.first is None:
            return self.protocol
        if self.first == self.last:
            return f"{self.protocol}/{self.first}"
        return f"{self.protocol}/{self.first}-{self.last}"


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive integer ranges merged where they overlap or touch, in order."""
    merged: list[list[int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _prefixes(version: int, first: int, last: int) -> list[Network]:
    """The fewest prefixes covering exactly [first, last]."""
    bits = 32 if version == 4 else 128
    make = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    out: list[Network] = []
    while first <= last:
        align = (first & -first).bit_length() - 1 if first else bits  # alignment of `first`
        # the largest aligned block that fits: 2**size <= last - first + 1
        size = min(align, (last - first + 1).bit_length() - 1)
        out.append(make((first, bits - size)))
        first += 1 << size
    return out


def _runs(hosts: list[int]) -> list[tuple[int, int]]:
    """merge_ranges of single addresses ((a, a) each), without a tuple per address."""
    if not hosts:
        return []
    ordered = sorted(set(hosts))
    out: list[tuple[int, int]] = []
    first = last = ordered[0]
    for a in ordered:
        if a > last + 1:
            out.append((first, last))
            first = a
        last = a
    out.append((first, last))
    return out


# (version, first, last) -> _prefixes: a pod's address is a span of many peer sets, and a
# prefix object costs ~5 us to build. Prefixes are immutable: sharing them is safe.
_SPANS: dict[tuple[int, int, int], tuple[Network, ...]] = {}
_SPANS_MAX = 1 << 17


def _span_prefixes(span: tuple[int, int, int]) -> tuple[Network, ...]:
    nets = _SPANS.get(span)
    if nets is None:
        if len(_SPANS) >= _SPANS_MAX:
            _SPANS.clear()
        nets = _SPANS[span] = tuple(_prefixes(*span))
    return nets


_HOSTS: dict[int, dict[int, Network]] = {4: {}, 6: {}}  # address -> its /32 or /128


def _host_net(version: int, a: int) -> Network:
    """_prefixes(version, a, a)[0], shared (most spans are one pod's address)."""
    hosts = _HOSTS[version]
    net = hosts.get(a)
    if net is None:
        if len(hosts) >= _SPANS_MAX:
            hosts.clear()
        net = hosts[a] = ipaddress.IPv4Network((a, 32)) if version == 4 else ipaddress.IPv6Network((a, 128))
    return net


_TEXT: dict[int, str] = {}  # a prefix's text by (address, length, family) packed in one int
_TEXT_MAX = 1 << 18


def _net_text(n: Network) -> str:
    """str(n), remembered: a peer set one pod changed holds every other address again, and
    str() costs ~1 us (IPv4) to ~10 us (IPv6) where this lookup costs ~0.1 us."""
    # ipaddress's own fields (stable since 3.3): the public properties cost a call each
    key = (n.network_address._ip << 8 | n._prefixlen) << 1 | (n._version == 6)
    text = _TEXT.get(key)
    if text is None:
        if len(_TEXT) >= _TEXT_MAX:
            _TEXT.clear()
        text = _TEXT[key] = str(n)
    return text


_V4, _V6 = ipaddress.IPv4Address, ipaddress.IPv6Address
# (IPv4 spans, IPv6 spans) -> the peer set
_RECENT: dict[tuple[tuple[tuple[int, int], ...], ...], PeerSet] = {}
_RECENT_MAX = 8192  # peer sets remembered across syncs (insertion order: oldest evicted first)


@dataclass(frozen=True)
class PeerSet:
    """A set of addresses as disjoint prefixes (IPv4 and IPv6 together)."""

    nets: tuple[Network, ...] = ()

    @classmethod
    def of(cls, nets: Iterable[Network | IPAddress]) -> PeerSet:
        """Collapse addresses and prefixes into disjoint prefixes. Works on integer ranges:
        ipaddress.collapse_addresses is ~10x slower and this runs for every policy rule."""
        # Addresses (most of any peer set: pods) as bare integers, merged apart from the
        # prefixes (ipBlocks): exact types only, a subclass takes the general path.
        hosts: dict[int, list[int]] = {4: [], 6: []}
        ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        hosts4, hosts6 = hosts[4], hosts[6]
        for n in nets:
            kind = type(n)
            if kind is _V4:
                hosts4.append(n._ip)  # type: ignore[union-attr]  # ipaddress's own field, as int(n)
            elif kind is _V6:
                hosts6.append(n._ip)  # type: ignore[union-attr]
            elif isinstance(n, ipaddress.IPv4Address | ipaddress.IPv6Address):
                a = int(n)
                ranges[n.version].append((a, a))
            else:
                net = n if isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network) else ipaddress.ip_network(n)
                a = int(net.network_address)
                ranges[net.version].append((a, a + net.num_addresses - 1))
        runs: list[list[tuple[int, int]]] = []
        for version in (4, 6):
            merged = _runs(hosts[version])
            if ranges[version]:
                merged = merge_ranges(merged + ranges[version])
            runs.append(merged)
        # Most peer sets are unchanged from one sync to the next: reuse the same object (and
        # whatever was derived from it, e.g. its text form) instead of rebuilding prefixes.
        key = (tuple(runs[0]), tuple(runs[1]))
        hit = _RECENT.get(key)
        if hit is None:
            out: list[Network] = []
            for version, spans in zip((4, 6), runs, strict=True):
                for a, b in spans:
                    if a == b:
                        out.append(_host_net(version, a))
                    else:
                        out.extend(_span_prefixes((version, a, b)))
            hit = cls(tuple(out))
            if len(_RECENT) >= _RECENT_MAX:
                _RECENT.pop(next(iter(_RECENT)))
            _RECENT[key] = hit
        return hit

    def texts(self, version: int) -> frozenset[str]:
        """The prefixes of one family as text (what kernel interfaces take)."""
        return self._texts[version]

    @cached_property
    def _texts(self) -> dict[int, frozenset[str]]:
        out: dict[int, list[str]] = {4: [], 6: []}
        for n in self.nets:
            out[n.version].append(_net_text(n))
        return {v: frozenset(t) for v, t in out.items()}

    @cached_property
    def _index(self) -> tuple[frozenset[IPAddress], tuple[Network, ...]]:
        hosts = frozenset(n.network_address for n in self.nets if n.prefixlen == n.max_prefixlen)
        return hosts, tuple(n for n in self.nets if n.prefixlen != n.max_prefixlen)

    def contains(self, ip: IPAddress) -> bool:
        hosts, wide = self._index
        return ip in hosts or any(ip.version == n.version and ip in n for n in wide)

    def family(self, version: int) -> tuple[Network, ...]:
        return tuple(n for n in self.nets if n.version == version)

    def __len__(self) -> int:
        return len(self.nets)


@dataclass(frozen=True)
class Origin:
    """Which policy rule a kernel rule came from; labels metrics and explains verdicts."""

    source: str  # kubernetes | netbird | file
    namespace: str
    policy: str
    direction: Direction
    index: int  # rule index inside the policy's ingress/egress (or NetBird rules) list
    name: str = ""  # rule name where the language has one (NetBird, ClusterNetworkPolicy)
    tier: Tier = Tier.POLICY
    kind: str = ""  # the policy's kind when it is not the source's usual one (ClusterNetworkPolicy)
    priority: int | None = None  # ClusterNetworkPolicy priority

    def __str__(self) -> str:
        pol = f"{self.namespace}/{self.policy}" if self.namespace else self.policy
        rule = f" ({self.name})" if self.name else ""
        if self.tier is Tier.POLICY and not self.kind:
            return f"{pol} {self.direction.value}[{self.index}]{rule}"
        prio = "" if self.priority is None else f", priority {self.priority}"
        return f"{self.kind or 'policy'} {pol} ({self.tier.title}{prio}) {self.direction.value} rule {self.index}{rule}"


@dataclass(frozen=True)
class Rule:
    """Match peers and ports; the first matching rule of a direction decides."""

    origin: Origin
    peers: PeerSet | None  # None: any address
    ports: tuple[PortMatch, ...] = ()  # (): every protocol and port
    verdict: Verdict = Verdict.ACCEPT
    # Stable identity of this rule's peer set: unchanged when memberships change.
    key: str = ""

    @property
    def tier(self) -> Tier:
        return self.origin.tier

    @property
    def learned(self) -> bool:
        """A domainNames rule: its peers are the addresses its endpoint learned from DNS
        answers, which a dataplane that `learns_in_kernel` keeps in a kernel set/map of its
        own (fed by `Dataplane.learn`), not in `peers`."""
        return LEARNED_MARK in self.key

    @property
    def effect(self) -> Verdict:
        """What a deciding match does to the packet: a BASELINE Pass allows (nothing further
        applies); an ADMIN Pass never decides (see `first_match`)."""
        return Verdict.ACCEPT if self.verdict is Verdict.PASS else self.verdict

    @property
    def id(self) -> str:
        """Short stable id a dataplane can store in the kernel (comment, map value)."""
        # surrogatepass: a name from JSON may hold a lone surrogate; hash it, never crash
        return hashlib.blake2s(self.key.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()

    def matches(self, peer: IPAddress, protocol: str, port: int | None) -> bool:
        if self.peers is not None and not self.peers.contains(peer):
            return False
        return not self.ports or any(p.matches(protocol, port) for p in self.ports)


def first_match(
    rules: Sequence[Rule], isolated: bool, matches: Callable[[int], bool], order: Iterable[int] | None = None
) -> tuple[int | None, list[int]]:
    """The tiered first match: (index of the deciding rule, or None for the default --
    drop when `isolated`, else allow; indices of the ADMIN Pass rules that matched on the
    way). `matches(i)` says whether rule i matches the packet; `order` restricts the walk
    to some rule indices (ascending), e.g. those whose peers hold the packet's peer."""
    passed: list[int] = []
    skipping = False
    for i in range(len(rules)) if order is None else order:
        r = rules[i]
        if r.origin.tier is Tier.ADMIN:
            if skipping or not matches(i):
                continue
            if r.verdict is Verdict.PASS:
                passed.append(i)
                skipping = True
                continue
            return i, passed
        if r.origin.tier is Tier.BASELINE and isolated:
            return None, passed  # NetworkPolicy isolation decides before the Baseline tier
        if matches(i):
            return i, passed
    return None, passed


@dataclass(frozen=True)
class DirectionProgram:
    """One endpoint's program for one direction."""

    isolated: bool = False
    rules: tuple[Rule, ...] = ()
    # Policies whose default deny applies here ("ns/name"), for explain and metrics.
    isolated_by: tuple[str, ...] = ()

    @property
    def enforced(self) -> bool:
        return self.isolated or bool(self.rules)


@dataclass(frozen=True)
class EndpointProgram:
    key: str  # "namespace/name", or a NetBird peer name
    ips: tuple[IPAddress, ...]
    ingress: DirectionProgram = DirectionProgram()
    egress: DirectionProgram = DirectionProgram()
    # Device the endpoint sits behind when the source knows it (NetBird's wt0); None: find
    # the host-side device from the routing table.
    interface: str | None = None

    def direction(self, d: Direction) -> DirectionProgram:
        return self.ingress if d is Direction.INGRESS else self.egress


@dataclass(frozen=True)
class Program:
    """Everything a dataplane must enforce on this node."""

    source: str
    endpoints: dict[str, EndpointProgram] = field(default_factory=dict)
    # Local prefixes (the node's pod CIDRs) whose addresses are denied both ways until a
    # source reports an endpoint there (--unknown-endpoints=deny); () guards nothing.
    guard: tuple[Network, ...] = ()

    def rules(self) -> dict[str, Rule]:
        """Every distinct rule by id (a rule applying to many endpoints appears once)."""
        out: dict[str, Rule] = {}
        for ep in self.endpoints.values():
            for d in (ep.ingress, ep.egress):
                for r in d.rules:
                    out.setdefault(r.id, r)
        return out
