"""NetBird API objects -> the model, read fail-closed (see the package docstring). Pure."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from agent.inventory import IPAddress, RawPolicy
from agent.ir import (
    Verdict,
)
from agent.policy.errors import Invalid, as_map
from agent.policy.errors import as_list as _list
from agent.policy.netbird.model import (
    _VERSION,
    ACTIONS,
    NETBIRD_PROTOCOLS,
    Check,
    GeoCheck,
    Group,
    NbRule,
    Peer,
    Policy,
    PostureCheck,
    ResourceRef,
    UnevaluableCheck,
    VersionCheck,
)

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
    if proto not in NETBIRD_PROTOCOLS:
        rd.bad("protocol", f"must be one of {', '.join(NETBIRD_PROTOCOLS)}, got {protocol!r}",
               "applies to every protocol")
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
