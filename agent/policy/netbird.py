"""NetBird management-API policy semantics: Inventory -> IR for the local peer. Pure: no I/O.

Follows what NetBird's management server computes for one peer L (see
shared/notes/netbird.md; management `networkmap_components.go`, `account.go`):

- disabled policies and disabled rules are skipped entirely;
- sources = the `sourceResource` peer (type `peer`) or the union of the source groups'
  peers, filtered by the policy's `source_posture_checks`; destinations likewise, without
  posture filtering; the built-in group `All` is every peer; unknown or empty groups give
  nothing; a rule with neither sources nor `sourceResource` (NetBird issue #3583) matches
  nothing and is reported as a warning, never treated as "any";
- L never gets a rule about itself;
- L in sources -> OUT to each destination; L in destinations -> IN from each source;
  `bidirectional` adds the mirror image; ports are always the destination port;
- `ports` (strings) win over `port_ranges` (ints); neither means every port;
  protocols all | tcp | udp | icmp | netbird-ssh (as tcp);
- any matching drop beats any matching accept: every drop rule comes first in IR order;
- default deny inbound. Outbound (stricter than NetBird's own client, which ignores OUT
  rules) is enforced only towards the NetBird network: a final accept rule covers every
  address outside it, so dataplanes need no special case. `inbound_only` leaves egress
  unenforced, like NetBird's client.

Posture checks are evaluated per source peer with three outcomes. `nb_version_check` and
`geo_location_check` are evaluated from /api/peers data. Checks the REST data cannot
evaluate (os_version_check, peer_network_range_check, process_check, unknown kinds, or a
referenced check whose definition is invalid) are UNKNOWN, and UNKNOWN always resolves to
the stricter side: the peer is left out of accept rules (the check counts as failing) and
kept in drop rules (the check counts as passing). A referenced check id that does not
exist at all is skipped (passes), as NetBird does.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.inventory import Endpoint, Inventory, IPAddress, ObjectRef, Problem, RawPolicy
from agent.ir import (
    Direction,
    DirectionProgram,
    EndpointProgram,
    Network,
    Origin,
    PeerSet,
    PortMatch,
    Program,
    Rule,
    Verdict,
)
from agent.policy.errors import Invalid, as_map
from agent.policy.errors import as_list as _list

SOURCE = "netbird"
DEFAULT_INTERFACE = "wt0"
DEFAULT_RANGES: tuple[Network, ...] = (ipaddress.ip_network("100.64.0.0/10"),)
ALL_GROUP = "All"
PROTOCOLS = ("all", "tcp", "udp", "icmp", "netbird-ssh")
ACTIONS = ("accept", "drop")
# Inventory.context keys the source fills in and compile_inventory reads.
CTX_ACCOUNT = "netbird.account"
CTX_LOCAL_PEER = "netbird.local_peer"
# A peer address outside the configured ranges still counts as inside the NetBird
# network, with this prefix length (the network around it, for IPv6).
_INSIDE_PREFIX = {4: 32, 6: 64}
_VERSION = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?$")


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class ResourceRef:
    id: str
    type: str


@dataclass(frozen=True)
class NbRule:
    index: int
    id: str
    name: str
    enabled: bool
    action: Verdict
    bidirectional: bool
    protocol: str  # one of PROTOCOLS
    ports: tuple[int, ...]
    port_ranges: tuple[tuple[int, int], ...]
    sources: tuple[str, ...] | None  # group ids; None when the API sent null / nothing
    destinations: tuple[str, ...] | None
    source_resource: ResourceRef | None = None
    destination_resource: ResourceRef | None = None


@dataclass(frozen=True)
class Policy:
    ref: ObjectRef
    id: str
    name: str
    enabled: bool
    posture_checks: tuple[str, ...]
    rules: tuple[NbRule, ...]


@dataclass(frozen=True)
class Group:
    id: str
    name: str
    peers: tuple[str, ...]  # peer ids
    peers_count: int | None = None


@dataclass(frozen=True)
class Peer:
    id: str
    name: str
    ip: IPAddress
    ipv6: IPAddress | None = None
    version: str = ""
    country_code: str = ""
    city_name: str = ""

    @property
    def ips(self) -> tuple[IPAddress, ...]:
        return (self.ip,) if self.ipv6 is None else (self.ip, self.ipv6)


@dataclass(frozen=True)
class VersionCheck:
    min_version: tuple[int, int, int]


@dataclass(frozen=True)
class GeoCheck:
    locations: tuple[tuple[str, str], ...]  # (country_code, city_name or "")
    action: str  # allow | deny


@dataclass(frozen=True)
class UnevaluableCheck:
    kind: str  # needs data the REST API does not expose


Check = VersionCheck | GeoCheck | UnevaluableCheck


@dataclass(frozen=True)
class PostureCheck:
    id: str
    name: str
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Account:
    """Everything the semantics need, already validated (and last-good substituted)."""

    policies: tuple[Policy, ...] = ()
    groups: Mapping[str, Group] = field(default_factory=dict)
    peers: Mapping[str, Peer] = field(default_factory=dict)
    posture_checks: Mapping[str, PostureCheck] = field(default_factory=dict)
    # Referenced objects that exist but are invalid with no last good version: their
    # content is unknown, so they resolve to the stricter side (see module doc).
    unknown_groups: frozenset[str] = frozenset()
    unknown_posture_checks: frozenset[str] = frozenset()


# ---------------------------------------------------------------- parsing


def _map(obj: Any, field: str) -> Mapping[str, Any]:
    return as_map(obj, field, required=True)


def _str(obj: Mapping[str, Any], key: str, field: str, required: bool = True) -> str:
    v = obj.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v):
        raise Invalid(f"{field}{key}", f"must be a non-empty string, got {v!r}")
    return v


def _bool(obj: Mapping[str, Any], key: str, field: str, default: bool | None = None) -> bool:
    v = obj.get(key, default)
    if not isinstance(v, bool):
        raise Invalid(f"{field}{key}", f"must be true or false, got {v!r}")
    return v


def _port(v: Any, field: str) -> int:
    """Ports come as strings ("80") in responses; plain ints are accepted too."""
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise Invalid(field, f"invalid port {v!r} (1-65535)")
    return v


def _group_ids(obj: Any, field: str) -> tuple[str, ...] | None:
    """Group references: objects `{id, name, ...}` in responses, id strings in requests."""
    if obj is None:
        return None
    out = []
    for i, g in enumerate(_list(obj, field)):
        if isinstance(g, str) and g:
            out.append(g)
        elif isinstance(g, Mapping):
            out.append(_str(g, "id", f"{field}[{i}]."))
        else:
            raise Invalid(f"{field}[{i}]", f"must be a group id or group object, got {g!r}")
    return tuple(out)


def _resource(obj: Any, field: str) -> ResourceRef | None:
    if obj is None:
        return None
    res = _map(obj, field)
    rid = res.get("id")
    rtype = res.get("type")
    if rid in (None, "") and rtype in (None, ""):
        return None  # an empty resource object is how the API says "none"
    if not isinstance(rid, str) or not isinstance(rtype, str):
        raise Invalid(field, f"needs string id and type, got {dict(res)!r}")
    return ResourceRef(rid, rtype)


def _parse_rule(obj: Any, index: int, field: str) -> NbRule:
    r = _map(obj, field)
    f = f"{field}."
    action = r.get("action")
    if action not in ACTIONS:
        raise Invalid(f"{f}action", f"must be accept or drop, got {action!r}")
    protocol = r.get("protocol")
    if not isinstance(protocol, str) or protocol.lower() not in PROTOCOLS:
        raise Invalid(f"{f}protocol", f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    protocol = protocol.lower()
    ports = tuple(_port(p, f"{f}ports[{i}]") for i, p in enumerate(_list(r.get("ports"), f"{f}ports")))
    ranges = []
    for i, pr in enumerate(_list(r.get("port_ranges"), f"{f}port_ranges")):
        m = _map(pr, f"{f}port_ranges[{i}]")
        start = _port(m.get("start"), f"{f}port_ranges[{i}].start")
        end = _port(m.get("end"), f"{f}port_ranges[{i}].end")
        if start > end:
            raise Invalid(f"{f}port_ranges[{i}]", f"start {start} is after end {end}")
        ranges.append((start, end))
    if protocol in ("all", "icmp") and (ports or ranges):
        # The API refuses this; guessing which half was meant could widen a drop or an accept.
        raise Invalid(f"{f}ports", f"protocol {protocol} takes no ports")
    name = r.get("name")
    rid = r.get("id")
    return NbRule(
        index=index,
        id=rid if isinstance(rid, str) else "",
        name=name if isinstance(name, str) else "",
        enabled=_bool(r, "enabled", f),
        action=Verdict(action),
        bidirectional=_bool(r, "bidirectional", f, default=False),
        protocol=protocol,
        ports=ports,
        port_ranges=tuple(ranges),
        sources=_group_ids(r.get("sources"), f"{f}sources"),
        destinations=_group_ids(r.get("destinations"), f"{f}destinations"),
        source_resource=_resource(r.get("sourceResource"), f"{f}sourceResource"),
        destination_resource=_resource(r.get("destinationResource"), f"{f}destinationResource"),
    )


def parse_policy(raw: RawPolicy) -> Policy:
    """Validate one policy (response or request shape); raise `Invalid` naming the field."""
    body = _map(raw.body, "(policy)")
    pid = _str(body, "id", "")
    name = body.get("name")
    checks = []
    for i, c in enumerate(_list(body.get("source_posture_checks"), "source_posture_checks")):
        if isinstance(c, Mapping):  # tolerate expanded objects
            c = c.get("id")
        if not isinstance(c, str) or not c:
            raise Invalid(f"source_posture_checks[{i}]", f"must be a posture-check id, got {c!r}")
        checks.append(c)
    rules = tuple(
        _parse_rule(r, i, f"rules[{i}]") for i, r in enumerate(_list(body.get("rules"), "rules"))
    )
    return Policy(
        ref=raw.ref,
        id=pid,
        name=name if isinstance(name, str) and name else pid,
        enabled=_bool(body, "enabled", ""),
        posture_checks=tuple(checks),
        rules=rules,
    )


def parse_group(body: Any) -> Group:
    g = _map(body, "(group)")
    peers = []
    for i, p in enumerate(_list(g.get("peers"), "peers")):
        if isinstance(p, str) and p:
            peers.append(p)
        elif isinstance(p, Mapping):
            peers.append(_str(p, "id", f"peers[{i}]."))
        else:
            raise Invalid(f"peers[{i}]", f"must be a peer object, got {p!r}")
    count = g.get("peers_count")
    return Group(
        id=_str(g, "id", ""),
        name=_str(g, "name", "", required=False),
        peers=tuple(peers),
        peers_count=count if isinstance(count, int) and not isinstance(count, bool) else None,
    )


def _ip(v: Any, field: str) -> IPAddress:
    if not isinstance(v, str):
        raise Invalid(field, f"must be an IP address, got {v!r}")
    try:
        return ipaddress.ip_address(v.split("/", 1)[0])
    except ValueError:
        raise Invalid(field, f"invalid IP address {v!r}") from None


def parse_peer(body: Any) -> Peer:
    p = _map(body, "(peer)")
    ipv6 = p.get("ipv6")
    return Peer(
        id=_str(p, "id", ""),
        name=_str(p, "name", ""),
        ip=_ip(p.get("ip"), "ip"),
        ipv6=None if ipv6 in (None, "") else _ip(ipv6, "ipv6"),
        version=_str(p, "version", "", required=False),
        country_code=_str(p, "country_code", "", required=False),
        city_name=_str(p, "city_name", "", required=False),
    )


def parse_version(text: str) -> tuple[int, int, int] | None:
    """NetBird versions cut at the first '-' and compared as semver; None if unparsable."""
    m = _VERSION.match(text.split("-", 1)[0].strip())
    if not m:
        return None
    return (int(m[1]), int(m[2] or 0), int(m[3] or 0))


def parse_posture_check(body: Any) -> PostureCheck:
    pc = _map(body, "(posture check)")
    raw_checks = pc.get("checks")
    checks: list[Check] = []
    for kind, spec in sorted(_map(raw_checks if raw_checks is not None else {}, "checks").items()):
        if spec is None:
            continue
        f = f"checks.{kind}"
        if kind == "nb_version_check":
            text = _str(_map(spec, f), "min_version", f"{f}.")
            version = parse_version(text)
            if version is None:
                raise Invalid(f"{f}.min_version", f"unparsable version {text!r}")
            checks.append(VersionCheck(version))
        elif kind == "geo_location_check":
            geo = _map(spec, f)
            action = geo.get("action")
            if action not in ("allow", "deny"):
                raise Invalid(f"{f}.action", f"must be allow or deny, got {action!r}")
            locs = []
            for i, loc in enumerate(_list(geo.get("locations"), f"{f}.locations")):
                m = _map(loc, f"{f}.locations[{i}]")
                locs.append((
                    _str(m, "country_code", f"{f}.locations[{i}]."),
                    _str(m, "city_name", f"{f}.locations[{i}].", required=False),
                ))
            checks.append(GeoCheck(tuple(locs), action))
        else:  # os_version_check, peer_network_range_check, process_check, future kinds
            checks.append(UnevaluableCheck(kind))
    return PostureCheck(id=_str(pc, "id", ""), name=_str(pc, "name", "", required=False),
                        checks=tuple(checks))


def partial_view(groups: Any, peers: Any) -> str | None:
    """Why this /api/groups + /api/peers pair is not the whole account, or None if it is.

    A token whose user may see only some peers gets a partial /api/peers; the `All`
    group still names (or at least counts) every peer. Tolerates any shape: what cannot
    be verified counts as partial.
    """
    if not isinstance(groups, list) or not isinstance(peers, list):
        return "groups or peers is not a list"
    visible = {p.get("id") for p in peers if isinstance(p, Mapping)}
    alls = [g for g in groups if isinstance(g, Mapping) and g.get("name") == ALL_GROUP]
    if len(alls) != 1:
        return f"expected exactly one '{ALL_GROUP}' group, found {len(alls)}"
    all_group = alls[0]
    members = all_group.get("peers")
    ids = {m.get("id") if isinstance(m, Mapping) else m for m in members or []}
    missing = ids - visible
    if missing:
        return f"{len(missing)} of the {len(ids)} peers in group '{ALL_GROUP}' are not in /api/peers"
    count = all_group.get("peers_count")
    if isinstance(count, int) and count > len(visible):
        return f"group '{ALL_GROUP}' counts {count} peers but /api/peers lists {len(visible)}"
    return None


# ---------------------------------------------------------------- posture


class Posture(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    UNKNOWN = "unknown"


def _check(check: Check, peer: Peer) -> Posture:
    if isinstance(check, VersionCheck):
        v = parse_version(peer.version)
        return Posture.PASS if v is not None and v >= check.min_version else Posture.FAIL
    if isinstance(check, GeoCheck):
        if not peer.country_code and not peer.city_name:
            return Posture.FAIL
        match = any(
            country == peer.country_code and (not city or city == peer.city_name)
            for country, city in check.locations
        )
        if check.action == "allow":
            return Posture.PASS if match else Posture.FAIL
        return Posture.FAIL if match else Posture.PASS
    return Posture.UNKNOWN


def posture(account: Account, check_ids: Iterable[str], peer: Peer) -> Posture:
    """All referenced checks must pass; unknown ids are skipped (pass), as NetBird does."""
    result = Posture.PASS
    for cid in check_ids:
        if cid in account.unknown_posture_checks:
            result = Posture.UNKNOWN
            continue
        pc = account.posture_checks.get(cid)
        if pc is None:
            continue
        for c in pc.checks:
            r = _check(c, peer)
            if r is Posture.FAIL:
                return Posture.FAIL
            if r is Posture.UNKNOWN:
                result = Posture.UNKNOWN
    return result


# ---------------------------------------------------------------- compiling


@dataclass
class Compiled:
    program: Program
    warnings: list[Problem]


def bootstrap_program(interface: str = DEFAULT_INTERFACE) -> Program:
    """What to enforce before the first successful sync: inbound on `interface` denied
    except replies; outbound untouched. The local peer is not known yet, so the endpoint
    has no addresses: dataplanes match on the interface alone."""
    ep = EndpointProgram(
        key=f"netbird-bootstrap:{interface}",
        ips=(),
        ingress=DirectionProgram(isolated=True, isolated_by=("netbird (bootstrap: no sync yet)",)),
        egress=DirectionProgram(),
        interface=interface,
    )
    return Program(source=SOURCE, endpoints={ep.key: ep})


def _complement(inside: Sequence[Network]) -> list[Network]:
    """Every address (both families) not in `inside`, as prefixes."""
    out: list[Network] = []
    for universe in (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")):
        nets: list[Network] = [universe]
        for ex in inside:
            if ex.version != universe.version:
                continue
            nxt: list[Network] = []
            for n in nets:
                if not n.overlaps(ex):
                    nxt.append(n)
                elif not ex.supernet_of(n):  # type: ignore[arg-type]
                    nxt.extend(n.address_exclude(ex))  # type: ignore[arg-type]
            nets = nxt
        out.extend(nets)
    return out


def inside_network(account: Account, ranges: Sequence[Network]) -> PeerSet:
    """The configured NetBird ranges plus the network of any peer address outside them."""
    nets: list[Network] = list(ranges)
    for peer in account.peers.values():
        for ip in peer.ips:
            if not any(ip.version == r.version and ip in r for r in ranges):
                nets.append(ipaddress.ip_network(f"{ip}/{_INSIDE_PREFIX[ip.version]}", strict=False))
    return PeerSet.of(nets)


class _Compiler:
    def __init__(self, account: Account, local: Peer) -> None:
        self.account = account
        self.local = local
        self.warnings: list[Problem] = []
        self._all = next((g for g in account.groups.values() if g.name == ALL_GROUP), None)

    def warn(self, policy: Policy, field: str, message: str) -> None:
        self.warnings.append(Problem(policy.ref, field, f"{message} (policy {policy.name!r})"))

    def _group_peers(self, policy: Policy, rule: NbRule, field: str, gid: str) -> list[str]:
        if gid in self.account.unknown_groups:
            if rule.action is Verdict.DROP:  # unknown members: drop from everyone
                self.warn(policy, field, f"group {gid} is invalid; drop rule applied to every peer")
                return list(self.account.peers)
            self.warn(policy, field, f"group {gid} is invalid; accept rule matches nobody from it")
            return []
        g = self.account.groups.get(gid)
        if g is None:
            return []  # unknown groups produce nothing
        if g is self._all:
            return list(self.account.peers)  # All means every peer, whatever it lists
        return list(g.peers)

    def side(self, policy: Policy, rule: NbRule, which: str) -> tuple[list[Peer], bool]:
        """The peers of one side (minus L) and whether L is on it."""
        is_src = which == "sources"
        res = rule.source_resource if is_src else rule.destination_resource
        groups = rule.sources if is_src else rule.destinations
        field = f"rules[{rule.index}].{which}"
        ids: list[str] = []
        if res is not None and res.type == "peer" and res.id:
            ids = [res.id]
        else:
            if res is not None:
                self.warn(policy, f"rules[{rule.index}].{'sourceResource' if is_src else 'destinationResource'}",
                          f"resource type {res.type!r} is not supported here; using the groups")
            if not groups:
                key = "sourceResource" if is_src else "destinationResource"
                self.warn(policy, field, f"rule {rule.name!r} has neither {which} nor {key}: matches nothing")
                return [], False
            for gid in groups:
                ids.extend(self._group_peers(policy, rule, field, gid))
        peers: list[Peer] = []
        seen: set[str] = set()
        for pid in ids:
            if pid in seen or pid not in self.account.peers:
                continue
            seen.add(pid)
            peer = self.account.peers[pid]
            if is_src and policy.posture_checks:
                p = posture(self.account, policy.posture_checks, peer)
                # UNKNOWN takes the stricter side: out of accepts, kept in drops.
                keep = p is Posture.PASS or (p is Posture.UNKNOWN and rule.action is Verdict.DROP)
                if not keep:
                    continue
            peers.append(peer)
        local_in = any(p.id == self.local.id for p in peers)
        return [p for p in peers if p.id != self.local.id], local_in

    @staticmethod
    def ports(rule: NbRule) -> tuple[PortMatch, ...]:
        proto = "tcp" if rule.protocol == "netbird-ssh" else rule.protocol
        if proto == "all":
            return ()
        if proto == "icmp":
            return (PortMatch("icmp"),)
        if rule.ports:  # ports win; the API refuses both, but old data may carry both
            return PortMatch.canonical(PortMatch(proto, p, p) for p in rule.ports)
        if rule.port_ranges:
            return tuple(sorted({PortMatch(proto, a, b) for a, b in rule.port_ranges}))
        return (PortMatch(proto),)

    def rules(self, policy: Policy) -> tuple[list[Rule], list[Rule]]:
        """(ingress, egress) rules of one enabled policy, in rule order."""
        ingress: list[Rule] = []
        egress: list[Rule] = []
        for rule in policy.rules:
            if not rule.enabled:
                continue
            if rule.ports and rule.port_ranges:
                self.warn(policy, f"rules[{rule.index}].port_ranges",
                          "both ports and port_ranges given: port_ranges ignored, as NetBird does")
            srcs, local_in_src = self.side(policy, rule, "sources")
            dsts, local_in_dst = self.side(policy, rule, "destinations")
            ports = self.ports(rule)

            def make(d: Direction, side: str, peers: list[Peer], rule: NbRule = rule,
                     ports: tuple[PortMatch, ...] = ports) -> Rule:
                origin = Origin(SOURCE, "", policy.name, d, rule.index, rule.name)
                return Rule(
                    origin,
                    PeerSet.of(ip for p in peers for ip in p.ips),
                    ports,
                    rule.action,
                    # The peer set is "this rule's sources" or "... destinations", whichever
                    # direction uses it: one key per side, stable across IP changes.
                    key=f"{SOURCE}:{policy.id}/{rule.index}/{side}",
                )

            if local_in_dst:
                ingress.append(make(Direction.INGRESS, "src", srcs))
            if local_in_src:
                egress.append(make(Direction.EGRESS, "dst", dsts))
            if rule.bidirectional:
                if local_in_src:
                    ingress.append(make(Direction.INGRESS, "dst", dsts))
                if local_in_dst:
                    egress.append(make(Direction.EGRESS, "src", srcs))
        return ingress, egress


def _drops_first(rules: list[Rule]) -> tuple[Rule, ...]:
    return tuple(r for r in rules if r.verdict is Verdict.DROP) + tuple(
        r for r in rules if r.verdict is not Verdict.DROP
    )


def compile_account(
    account: Account,
    local_peer: str,
    *,
    interface: str = DEFAULT_INTERFACE,
    ranges: Sequence[Network] = DEFAULT_RANGES,
    inbound_only: bool = False,
) -> Compiled:
    """The IR for the local peer (by id). Raises KeyError if the peer is unknown."""
    local = account.peers[local_peer]
    comp = _Compiler(account, local)
    ingress: list[Rule] = []
    egress: list[Rule] = []
    for policy in account.policies:
        if not policy.enabled:
            continue
        i, e = comp.rules(policy)
        ingress.extend(i)
        egress.extend(e)
    by = (f"{SOURCE} default deny inbound on {interface}",)
    if inbound_only:
        eg = DirectionProgram()
    else:
        outside = Rule(
            Origin(SOURCE, "", "(outside the NetBird network)", Direction.EGRESS, 0),
            PeerSet.of(_complement(inside_network(account, ranges).nets)),
            (),
            Verdict.ACCEPT,
            key=f"{SOURCE}:outside-network",
        )
        eg = DirectionProgram(
            isolated=True,
            rules=(*_drops_first(egress), outside),
            isolated_by=(f"{SOURCE} default deny outbound to the NetBird network",),
        )
    ep = EndpointProgram(
        key=local.name,
        ips=local.ips,
        ingress=DirectionProgram(isolated=True, rules=_drops_first(ingress), isolated_by=by),
        egress=eg,
        interface=interface,
    )
    return Compiled(Program(source=SOURCE, endpoints={ep.key: ep}), comp.warnings)


# ---------------------------------------------------------------- inventory glue


def account_inventory(account: Account, local_peer: str, interface: str = DEFAULT_INTERFACE,
                      problems: Iterable[Problem] = ()) -> Inventory:
    """An Inventory for explain/matrix: every peer as an endpoint, policies as raw refs."""
    inv = Inventory(problems=list(problems))
    names: dict[str, int] = {}
    for p in account.peers.values():
        names[p.name] = names.get(p.name, 0) + 1
    for p in sorted(account.peers.values(), key=lambda p: (p.id != local_peer, p.name, p.id)):
        # Peer names are not unique in NetBird; the local peer keeps its plain name.
        name = p.name if names[p.name] == 1 or p.id == local_peer else f"{p.name}~{p.id}"
        inv.endpoints[name] = Endpoint("", name, p.ips, {"netbird.id": p.id}, interface=interface)
    inv.context[CTX_ACCOUNT] = account
    inv.context[CTX_LOCAL_PEER] = local_peer
    return inv


def compile_inventory(inv: Inventory, *, interface: str = DEFAULT_INTERFACE,
                      ranges: Sequence[Network] = DEFAULT_RANGES, inbound_only: bool = False) -> Compiled:
    return compile_account(inv.context[CTX_ACCOUNT], inv.context[CTX_LOCAL_PEER], interface=interface,
                           ranges=ranges, inbound_only=inbound_only)
