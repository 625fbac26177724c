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

Invalid input fails closed (read_policy): every invalid part of a rule is reported (policy,
rule id and name, field path) and resolved to the stricter side. In a drop rule it matches
everything: unknown protocol = every protocol, bad ports or ranges = every port,
bidirectional invalid or missing = both ways, enabled invalid or missing = enabled, a bad
group reference or resource = every peer, no sources/destinations at all = every peer. In
an accept rule it matches nothing (bad entries drop out; nothing valid left = the rule is
void, never "every port"). An unknown action counts as drop; an unreadable rule is a drop
of everything; a policy whose `enabled` is invalid keeps its drops and loses its accepts.
The source keeps an invalid policy's last good version in force and adds the drops of the
invalid one (agent/admission/netbird.py).

Posture checks are evaluated per source peer with three outcomes. `nb_version_check` and
`geo_location_check` are evaluated from /api/peers data. Checks the REST data cannot
evaluate (os_version_check, peer_network_range_check, process_check, unknown kinds, or a
referenced check whose definition is invalid) are UNKNOWN, and UNKNOWN always resolves to
the stricter side: the peer is left out of accept rules (the check counts as failing) and
kept in drop rules (the check counts as passing). A referenced check id that does not
exist at all is skipped (passes), as NetBird does.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
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
    merge_ranges,
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
    # Fail-closed resolution of invalid parts (see read_policy): "sources"/"destinations"
    # that mean every peer (a drop) or nobody (an accept); `void`: the rule matches nothing.
    any_sides: frozenset[str] = frozenset()
    void_sides: frozenset[str] = frozenset()
    void: bool = False
    invalid: bool = False  # some part was invalid (already reported)


@dataclass(frozen=True)
class Policy:
    ref: ObjectRef
    id: str
    name: str
    enabled: bool
    posture_checks: tuple[str, ...]
    rules: tuple[NbRule, ...]
    # An invalid posture-check reference: its outcome is unknown (stricter side).
    posture_unknown: bool = False
    # Every invalid part found, in order; the rules above are already resolved fail-closed.
    problems: tuple[Invalid, ...] = ()
    # Appended to rule keys: the drops of an invalid version enforced next to the last good
    # version of the same policy need peer-set keys of their own.
    variant: str = ""

    def drops_only(self, variant: str) -> Policy:
        """This policy reduced to its drop rules (the stricter half of an invalid version)."""
        return dataclasses.replace(self, rules=tuple(r for r in self.rules if r.action is Verdict.DROP),
                                   variant=variant)


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


_DIGITS = re.compile(r"[0-9]{1,5}", re.ASCII)  # not str.isdigit(): "²" is a digit int() refuses


def _port(v: Any, field: str) -> int:
    """Ports come as strings ("80") in responses; plain ints are accepted too."""
    if isinstance(v, str) and _DIGITS.fullmatch(v.strip()):
        v = int(v.strip())
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise Invalid(field, f"invalid port {v!r} (1-65535)")
    return v


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


class _RuleReader:
    """Reads one rule, collecting every invalid part and resolving it fail-closed.

    The action decides the side: in a drop (and in a rule whose action is unknown, which
    counts as a drop) an invalid part matches everything; in an accept it matches nothing.
    """

    def __init__(self, policy: str, index: int, rid: str, name: str, drop: bool) -> None:
        self.where = f"rules[{index}]"
        self.who = f"policy {policy!r}, rule {name!r} (id {rid!r})" if rid or name else f"policy {policy!r}"
        self.drop = drop
        self.problems: list[Invalid] = []

    def bad(self, field: str, message: str, drop_means: str, accept_means: str = "matches nothing") -> None:
        outcome = f"drop rule {drop_means}" if self.drop else f"accept rule {accept_means}"
        self.problems.append(Invalid(f"{self.where}.{field}", f"{self.who}: {message}; {outcome}"))

    def flag(self, r: Mapping[str, Any], key: str, drop_means: str, accept_means: str) -> bool:
        v = r.get(key)
        if isinstance(v, bool):
            return v
        self.bad(key, f"must be true or false, got {v!r}", drop_means, accept_means)
        return self.drop

    def ports(self, r: Mapping[str, Any]) -> tuple[list[int], list[tuple[int, int]], bool, bool]:
        """(valid ports, valid ranges, any given, all valid)."""
        ports: list[int] = []
        ranges: list[tuple[int, int]] = []
        given, ok = False, True
        for key in ("ports", "port_ranges"):
            raw = r.get(key)
            if raw is None:
                continue
            if not isinstance(raw, list):
                given, ok = True, False
                self.bad(key, f"must be a list, got {type(raw).__name__}", "applies to every port")
                continue
            given = given or bool(raw)
            for i, item in enumerate(raw):
                field = f"{key}[{i}]"
                try:
                    if key == "ports":
                        ports.append(_port(item, field))
                        continue
                    m = _map(item, field)
                    start = _port(m.get("start"), f"{field}.start")
                    end = _port(m.get("end"), f"{field}.end")
                    if start > end:
                        raise Invalid(field, f"start {start} is after end {end}")
                    ranges.append((start, end))
                except Invalid as e:
                    ok = False
                    self.bad(e.field, e.message, "applies to every port", "matches nothing on it")
        return ports, ranges, given, ok

    def side(self, raw: Any, key: str) -> tuple[tuple[str, ...] | None, bool, bool]:
        """Group references (`{id, name, ...}` in responses, id strings in requests), whether
        the whole side is unreadable and whether any entry is."""
        if raw is None:
            return None, False, False
        if not isinstance(raw, list):
            self.bad(key, f"must be a list of groups, got {type(raw).__name__}", "applies to every peer")
            return (), True, True
        out: list[str] = []
        bad = False
        for i, g in enumerate(raw):
            gid = g.get("id") if isinstance(g, Mapping) else g
            if isinstance(gid, str) and gid:
                out.append(gid)
            else:
                bad = True
                self.bad(f"{key}[{i}]", f"must be a group id or group object with an id, got {g!r}",
                         "applies to every peer", "matches nobody from it")
        return tuple(out), False, bad


def _read_rule(obj: Any, index: int, policy: str) -> tuple[NbRule, list[Invalid]]:
    if not isinstance(obj, Mapping):
        rd = _RuleReader(policy, index, "", "", drop=True)
        rd.problems.append(Invalid(rd.where, f"policy {policy!r}: must be an object, got {type(obj).__name__};"
                                             " its action is unknown: treated as a drop of everything"))
        return _drop_everything(index), rd.problems
    r = obj
    rid = r.get("id") if isinstance(r.get("id"), str) else ""
    name = r.get("name") if isinstance(r.get("name"), str) else ""
    action = r.get("action")
    rd = _RuleReader(policy, index, rid, name, drop=action not in ("accept",))
    if action not in ACTIONS:
        rd.bad("action", f"must be accept or drop, got {action!r}", "(the action is unknown) applies")
    enabled = rd.flag(r, "enabled", "is enabled", "is disabled")
    bidirectional = rd.flag(r, "bidirectional", "applies both ways", "applies one way")
    protocol = r.get("protocol")
    proto: str | None = protocol.lower() if isinstance(protocol, str) else None
    if proto not in PROTOCOLS:
        rd.bad("protocol", f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}", "applies to every protocol")
        proto = None
    ports, ranges, given, ports_ok = rd.ports(r)
    void = False
    if proto in ("all", "icmp") and given:
        # The API refuses this; guessing which half was meant could widen a drop or an accept.
        rd.bad("ports", f"protocol {proto} takes no ports", "applies to every protocol")
        proto = None
    if proto is None:
        proto, ports, ranges, void = "all", [], [], not rd.drop
    elif not ports_ok:
        if rd.drop:
            ports, ranges = [], []
        else:  # the valid entries stay; nothing valid left must not mean "every port"
            void = not (ports if r.get("ports") else ranges)
    sources, src_unreadable, src_bad = rd.side(r.get("sources"), "sources")
    destinations, dst_unreadable, dst_bad = rd.side(r.get("destinations"), "destinations")
    # A drop with any bad group entry applies to every peer on that side; an accept keeps
    # its valid entries (bad ones match nobody) and is empty on an unreadable side.
    bad_sides = {k for k, bad in (("sources", src_bad), ("destinations", dst_bad)) if bad} if rd.drop else \
        {k for k, bad in (("sources", src_unreadable), ("destinations", dst_unreadable)) if bad}
    resources: list[ResourceRef | None] = []
    for key, which in (("sourceResource", "sources"), ("destinationResource", "destinations")):
        try:
            resources.append(_resource(r.get(key), key))
        except Invalid as e:
            rd.bad(e.field, e.message, "applies to every peer", "matches nobody there")
            resources.append(None)
            bad_sides.add(which)
    rule = NbRule(
        index=index, id=rid, name=name, enabled=enabled,
        action=Verdict.DROP if rd.drop else Verdict.ACCEPT,
        bidirectional=bidirectional, protocol=proto, ports=tuple(ports), port_ranges=tuple(ranges),
        sources=sources, destinations=destinations,
        source_resource=resources[0], destination_resource=resources[1],
        any_sides=frozenset(bad_sides) if rd.drop else frozenset(),
        void_sides=frozenset() if rd.drop else frozenset(bad_sides),
        void=void, invalid=bool(rd.problems),
    )
    return rule, rd.problems


def _drop_everything(index: int) -> NbRule:
    """A rule nothing can be read from: its action is unknown, so it counts as a drop of
    every protocol between every peer, both ways."""
    return NbRule(index=index, id="", name="", enabled=True, action=Verdict.DROP, bidirectional=True,
                  protocol="all", ports=(), port_ranges=(), sources=None, destinations=None,
                  any_sides=frozenset({"sources", "destinations"}), invalid=True)


def read_policy(raw: RawPolicy) -> Policy:
    """Read one policy (response or request shape) without raising: every invalid part is
    in `problems` (field path, policy and rule named) and resolved fail-closed — in a drop
    rule it matches everything (unknown protocol: every protocol; bad ports: every port;
    bidirectional invalid: both ways; enabled invalid or missing: enabled; bad groups:
    every peer), in an accept rule it matches nothing. An unknown action counts as drop.
    """
    problems: list[Invalid] = []
    if not isinstance(raw.body, Mapping):
        problems.append(Invalid("(policy)", f"must be an object, got {type(raw.body).__name__}"))
        return Policy(raw.ref, raw.ref.name, raw.ref.name, True, (), (), problems=tuple(problems))
    body = raw.body
    pid = body.get("id")
    if not isinstance(pid, str) or not pid:
        problems.append(Invalid("id", f"must be a non-empty string, got {pid!r}"))
        pid = raw.ref.name
    name = body.get("name")
    name = name if isinstance(name, str) and name else pid
    checks: list[str] = []
    posture_unknown = False
    raw_checks = body.get("source_posture_checks")
    if raw_checks is not None and not isinstance(raw_checks, list):
        problems.append(Invalid("source_posture_checks", f"policy {name!r}: must be a list, got "
                                f"{type(raw_checks).__name__}; counts as failing for accepts, passing for drops"))
        posture_unknown = True
    for i, c in enumerate(raw_checks if isinstance(raw_checks, list) else []):
        if isinstance(c, Mapping):  # tolerate expanded objects
            c = c.get("id")
        if not isinstance(c, str) or not c:
            problems.append(Invalid(f"source_posture_checks[{i}]", f"policy {name!r}: must be a posture-check id, "
                                    f"got {c!r}; counts as failing for accepts, passing for drops"))
            posture_unknown = True
            continue
        checks.append(c)
    raw_rules = body.get("rules")
    rules: list[NbRule] = []
    if raw_rules is not None and not isinstance(raw_rules, list):
        problems.append(Invalid("rules", f"policy {name!r}: must be a list, got {type(raw_rules).__name__}; "
                                "the rules are unknown: treated as a drop of everything"))
        rules.append(_drop_everything(0))
    for i, r in enumerate(raw_rules if isinstance(raw_rules, list) else []):
        rule, errs = _read_rule(r, i, name)
        rules.append(rule)
        problems.extend(errs)
    enabled = body.get("enabled")
    if not isinstance(enabled, bool):
        problems.append(Invalid("enabled", f"policy {name!r}: must be true or false, got {enabled!r}; "
                                "its drop rules are enabled, its accept rules disabled"))
        rules = [r if r.action is Verdict.DROP else dataclasses.replace(r, enabled=False) for r in rules]
        enabled = True
    return Policy(ref=raw.ref, id=pid, name=name, enabled=enabled, posture_checks=tuple(checks),
                  rules=tuple(rules), posture_unknown=posture_unknown, problems=tuple(problems))


def parse_policy(raw: RawPolicy) -> Policy:
    """Validate one policy strictly: raise `Invalid` for its first invalid part."""
    policy = read_policy(raw)
    if policy.problems:
        raise policy.problems[0]
    return policy


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
        if which in rule.void_sides:  # invalid in an accept: already reported, matches nobody
            return [], False
        if which in rule.any_sides:  # invalid in a drop: already reported, every peer
            ids = list(self.account.peers)
        elif res is not None and res.type == "peer" and res.id:
            ids = [res.id]
        else:
            if res is not None:
                self.warn(policy, f"rules[{rule.index}].{'sourceResource' if is_src else 'destinationResource'}",
                          f"resource type {res.type!r} is not supported here; using the groups")
            if not groups:
                key = "sourceResource" if is_src else "destinationResource"
                if rule.action is Verdict.DROP:
                    # NetBird issue #3583 loses sides of later rules: a drop that lost one
                    # must not let the accepts it was meant to override win.
                    self.warn(policy, field, f"rule {rule.name!r} has neither {which} nor {key}: "
                                             "drop rule applied to every peer there")
                    ids = list(self.account.peers)
                else:
                    self.warn(policy, field, f"rule {rule.name!r} has neither {which} nor {key}: matches nothing")
                    return [], False
            for gid in groups or ():
                ids.extend(self._group_peers(policy, rule, field, gid))
        peers: list[Peer] = []
        seen: set[str] = set()
        for pid in ids:
            if pid in seen or pid not in self.account.peers:
                continue
            seen.add(pid)
            peer = self.account.peers[pid]
            if is_src and (policy.posture_checks or policy.posture_unknown):
                p = posture(self.account, policy.posture_checks, peer)
                if policy.posture_unknown and p is Posture.PASS:
                    p = Posture.UNKNOWN  # an unreadable check reference
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
            # Merged: overlapping or adjacent ranges are one match (and PortMatch has no order
            # of its own: a plain sort of two or more of them raised TypeError).
            return PortMatch.canonical(PortMatch(proto, a, b) for a, b in merge_ranges(rule.port_ranges))
        return (PortMatch(proto),)

    def rules(self, policy: Policy) -> tuple[list[Rule], list[Rule]]:
        """(ingress, egress) rules of one enabled policy, in rule order."""
        ingress: list[Rule] = []
        egress: list[Rule] = []
        for rule in policy.rules:
            if not rule.enabled or rule.void:
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
                    # The id quoted: no id can spell another's key (or a variant's), which
                    # would give one key two peer sets and fail the whole apply.
                    key=f"{SOURCE}:{json.dumps(policy.id)}{policy.variant}/{rule.index}/{side}",
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
