"""ClusterNetworkPolicy (v1alpha2) and AdminNetworkPolicy / BaselineAdminNetworkPolicy
(v1alpha1) read as their CRDs validate them, fail-closed (see the package docstring)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from agent.inventory import RawObject
from agent.ir import Network, Tier, Verdict
from agent.policy.cluster.model import (
    ANP,
    BANP,
    BANP_PRIORITY,
    CNP,
    ClusterPeer,
    ClusterPolicy,
    ClusterPort,
    ClusterRule,
    Subject,
)
from agent.policy.errors import Invalid, as_list, as_map, is_dns_subdomain, safe_name, unknown_field, valid_port_name
from agent.policy.selectors import Selector, parse_selector

PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}  # v1alpha1 protocol names -> IR


@dataclass(frozen=True)
class _Dialect:
    """What differs between the three kinds."""

    actions: Mapping[str, Verdict]
    ports_key: str  # "protocols" (v1alpha2) | "ports" (v1alpha1)
    max_items: int  # rules per direction, peers per rule, ports per rule
    has_tier: bool
    has_priority: bool


_CNP = _Dialect({"Accept": Verdict.ACCEPT, "Deny": Verdict.DROP, "Pass": Verdict.PASS}, "protocols", 25, True, True)
_ANP = _Dialect({"Allow": Verdict.ACCEPT, "Deny": Verdict.DROP, "Pass": Verdict.PASS}, "ports", 100, False, True)
_BANP = _Dialect({"Allow": Verdict.ACCEPT, "Deny": Verdict.DROP}, "ports", 100, False, False)
DIALECTS = {CNP: _CNP, ANP: _ANP, BANP: _BANP}
MAX_NETWORKS = 25
MAX_RULE_NAME = 100


def _one_of(obj: Any, field: str, allowed: tuple[str, ...], what: str) -> tuple[str, Any]:
    """The single set field of a one-of object (MinProperties=MaxProperties=1)."""
    m = as_map(obj, field, required=True)
    unknown = set(m) - set(allowed)
    if unknown:
        raise Invalid(unknown_field(field, unknown), f"unknown {what} field (a newer API version?)")
    present = [k for k in allowed if m.get(k) is not None]
    if len(present) != 1:
        raise Invalid(field, f"exactly one of {', '.join(allowed)} must be set, got {len(present)}")
    return present[0], m[present[0]]


def _namespaced_pod(obj: Any, field: str) -> tuple[Selector, Selector]:
    m = as_map(obj, field, required=True)
    unknown = set(m) - {"namespaceSelector", "podSelector"}
    if unknown:
        raise Invalid(unknown_field(field, unknown), "unknown field")
    if m.get("podSelector") is None:
        raise Invalid(f"{field}.podSelector", "required")
    return (parse_selector(m.get("namespaceSelector"), f"{field}.namespaceSelector"),
            parse_selector(m["podSelector"], f"{field}.podSelector"))


def _cidr(text: Any, field: str) -> Network:
    """A CIDR as CEL's isCIDR reads it: strict addresses, host bits allowed."""
    if not isinstance(text, str) or "/" not in text or len(text) > 43:
        raise Invalid(field, f"invalid CIDR {text!r}")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise Invalid(field, f"invalid CIDR {text!r}") from None


def parse_subject(obj: Any, field: str) -> Subject:
    kind, value = _one_of(obj, field, ("namespaces", "pods"), "subject")
    if kind == "namespaces":
        return Subject(parse_selector(value, f"{field}.namespaces"))
    nss, pods = _namespaced_pod(value, f"{field}.pods")
    return Subject(nss, pods)


def _parse_peer(obj: Any, field: str, egress: bool, verdict: Verdict) -> ClusterPeer:
    allowed = ("namespaces", "pods", "nodes", "networks", "domainNames") if egress else ("namespaces", "pods")
    kind, value = _one_of(obj, field, allowed, "peer")
    f = f"{field}.{kind}"
    if kind == "namespaces":
        return ClusterPeer(namespaces=parse_selector(value, f))
    if kind == "pods":
        nss, pods = _namespaced_pod(value, f)
        return ClusterPeer(namespaces=nss, pods=pods)
    if kind == "nodes":
        return ClusterPeer(nodes=parse_selector(value, f))
    if kind == "networks":
        nets = as_list(value, f)
        if not 1 <= len(nets) <= MAX_NETWORKS:
            raise Invalid(f, f"must have 1 to {MAX_NETWORKS} entries, got {len(nets)}")
        return ClusterPeer(networks=tuple(_cidr(n, f"{f}[{i}]") for i, n in enumerate(nets)))
    # domainNames need DNS interception Stockade does not do; the API allows them only in
    # Accept rules, so reading the peer as invalid (matching nothing) is the strict side.
    raise Invalid(f, "domainNames peers are not supported (the rule matches nothing)" if verdict is Verdict.ACCEPT
                  else "domainNames peers are only allowed in Accept rules")


def _port_number(obj: Any, field: str) -> int:
    if isinstance(obj, bool) or not isinstance(obj, int) or not 1 <= obj <= 65535:
        raise Invalid(field, f"must be a port number 1-65535, got {obj!r}")
    return obj


def _range(obj: Any, field: str, strict: bool, extra: tuple[str, ...] = ()) -> tuple[int, int]:
    m = as_map(obj, field, required=True)
    unknown = set(m) - {"start", "end", *extra}
    if unknown:
        raise Invalid(unknown_field(field, unknown), "unknown field")
    start = _port_number(m.get("start"), f"{field}.start")
    end = _port_number(m.get("end"), f"{field}.end")
    if end < start or (strict and end == start):
        raise Invalid(field, f"start ({start}) must be less than end ({end})")
    return start, end


def _named_port(obj: Any, field: str) -> ClusterPort:
    if not valid_port_name(obj):
        raise Invalid(field, f"invalid port name {obj!r} (IANA_SVC_NAME)")
    return ClusterPort(named=obj)


def _parse_protocol_v1alpha2(obj: Any, field: str) -> ClusterPort:
    kind, value = _one_of(obj, field, ("tcp", "udp", "sctp", "destinationNamedPort"), "protocol")
    if kind == "destinationNamedPort":
        return _named_port(value, f"{field}.destinationNamedPort")
    f = f"{field}.{kind}"
    m = as_map(value, f, required=True)
    unknown = set(m) - {"destinationPort"}
    if unknown:
        raise Invalid(unknown_field(f, unknown), "unknown field")
    if m.get("destinationPort") is None:  # MinProperties=1: no "every port of tcp" form
        raise Invalid(f"{f}.destinationPort", "required")
    pkind, pval = _one_of(m["destinationPort"], f"{f}.destinationPort", ("number", "range"), "port")
    pf = f"{f}.destinationPort.{pkind}"
    first, last = (_port_number(pval, pf),) * 2 if pkind == "number" else _range(pval, pf, strict=True)
    return ClusterPort(kind, first, last)


def _protocol_v1alpha1(m: Mapping[str, Any], field: str) -> str:
    proto = m.get("protocol")
    if proto is None:
        return "tcp"  # the CRD's default
    if not isinstance(proto, str) or proto not in PROTOCOLS:
        raise Invalid(f"{field}.protocol", f"must be one of TCP, UDP, SCTP, got {proto!r}")
    return PROTOCOLS[proto]


def _parse_port_v1alpha1(obj: Any, field: str) -> ClusterPort:
    kind, value = _one_of(obj, field, ("portNumber", "namedPort", "portRange"), "port")
    f = f"{field}.{kind}"
    if kind == "namedPort":
        return _named_port(value, f)
    m = as_map(value, f, required=True)
    proto = _protocol_v1alpha1(m, f)
    if kind == "portRange":
        first, last = _range(m, f, strict=False, extra=("protocol",))
        return ClusterPort(proto, first, last)
    unknown = set(m) - {"protocol", "port"}
    if unknown:
        raise Invalid(unknown_field(f, unknown), "unknown field")
    port = _port_number(m.get("port"), f"{f}.port")
    return ClusterPort(proto, port, port)


def deny_all(index: int, name: str) -> ClusterRule:
    """The fail-closed reading of a Deny or Pass rule that does not parse: drop everything."""
    return ClusterRule(index, name, Verdict.DROP, None, ())


def _parse_rule(
    obj: Any, field: str, index: int, egress: bool, d: _Dialect, issues: list[Invalid]
) -> ClusterRule | None:
    """One rule. An invalid Accept matches nothing (None); an invalid Deny or Pass, or a rule
    whose action is unknown, drops everything (the API's own reading of a peer it cannot
    understand, applied to every invalid part of a rule)."""
    peers_key = "to" if egress else "from"
    try:
        rule = as_map(obj, field, required=True)
    except Invalid as e:
        issues.append(e)
        return deny_all(index, "")
    name = rule.get("name")
    if name is None:
        name = ""
    if not isinstance(name, str) or len(name) > MAX_RULE_NAME or not name.isprintable():
        issues.append(Invalid(f"{field}.name", f"must be a printable string of at most {MAX_RULE_NAME} characters"))
        name = safe_name(name, False)
    action = rule.get("action")
    verdict = d.actions.get(action) if isinstance(action, str) else None
    if verdict is None:
        issues.append(Invalid(f"{field}.action", f"must be one of {', '.join(d.actions)}, got {action!r}"))
        return deny_all(index, name)
    try:
        unknown = set(rule) - {"name", "action", peers_key, d.ports_key}
        if unknown:
            raise Invalid(unknown_field(field, unknown), "unknown rule field (a newer API version?)")
        raw_peers = as_list(rule.get(peers_key), f"{field}.{peers_key}")
        if not 1 <= len(raw_peers) <= d.max_items:
            raise Invalid(f"{field}.{peers_key}", f"must have 1 to {d.max_items} entries, got {len(raw_peers)}")
        peers = tuple(_parse_peer(p, f"{field}.{peers_key}[{i}]", egress, verdict) for i, p in enumerate(raw_peers))
        ports: tuple[ClusterPort, ...] = ()
        if rule.get(d.ports_key) is not None:
            raw_ports = as_list(rule[d.ports_key], f"{field}.{d.ports_key}")
            if not 1 <= len(raw_ports) <= d.max_items:
                raise Invalid(f"{field}.{d.ports_key}", f"must have 1 to {d.max_items} entries, got {len(raw_ports)}")
            parse: Callable[[Any, str], ClusterPort] = (
                _parse_protocol_v1alpha2 if d.ports_key == "protocols" else _parse_port_v1alpha1)
            ports = tuple(parse(p, f"{field}.{d.ports_key}[{i}]") for i, p in enumerate(raw_ports))
        if any(p.named for p in ports) and any(p.nodes is not None or p.networks for p in peers):
            raise Invalid(f"{field}.{d.ports_key}", "named ports cannot be used with networks or nodes peers")
    except Invalid as e:
        issues.append(e)
        return None if verdict is Verdict.ACCEPT else deny_all(index, name)
    return ClusterRule(index, name, verdict, peers, ports)


def _parse_rules(spec: Mapping[str, Any], egress: bool, d: _Dialect, issues: list[Invalid]) -> tuple[ClusterRule, ...]:
    key = "egress" if egress else "ingress"
    try:
        raw = as_list(spec.get(key), f"spec.{key}")
    except Invalid as e:
        issues.append(e)
        return (deny_all(0, ""),)  # rules exist but cannot be read: drop everything that way
    if len(raw) > d.max_items:
        # The API server would refuse the object; every rule is read, the surplus fail-closed.
        issues.append(Invalid(f"spec.{key}", f"may have at most {d.max_items} rules, got {len(raw)}"))
    out = []
    for i, r in enumerate(raw):
        rule = _parse_rule(r, f"spec.{key}[{i}]", i, egress, d, issues)
        if rule is not None and i >= d.max_items:
            rule = None if rule.verdict is Verdict.ACCEPT else deny_all(i, rule.name)
        if rule is not None:
            out.append(rule)
    return tuple(out)


def deny_only(rule: ClusterRule) -> ClusterRule | None:
    """A rule as it applies when its policy's precedence or selection is uncertain: an
    Accept matches nothing, a Pass drops (it could skip a Deny), a Deny stays."""
    if rule.verdict is Verdict.ACCEPT:
        return None
    return replace(rule, verdict=Verdict.DROP)


def _deny_only(rules: tuple[ClusterRule, ...]) -> tuple[ClusterRule, ...]:
    return tuple(r for r in map(deny_only, rules) if r is not None)


def _tier(spec: Mapping[str, Any], kind: str, issues: list[Invalid]) -> Tier | None:
    if kind != CNP:
        return Tier.ADMIN if kind == ANP else Tier.BASELINE
    tier = spec.get("tier")
    if tier == "Admin":
        return Tier.ADMIN
    if tier == "Baseline":
        return Tier.BASELINE
    issues.append(Invalid("spec.tier", f"must be Admin or Baseline, got {tier!r}"))
    return None


def _priority(spec: Mapping[str, Any], d: _Dialect, issues: list[Invalid]) -> int | None:
    if not d.has_priority:
        return BANP_PRIORITY
    p = spec.get("priority")
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 1000:
        issues.append(Invalid("spec.priority", f"must be an integer 0-1000, got {p!r}"))
        return None
    return p


def parse_cluster_policy(raw: RawObject, issues: list[Invalid] | None = None) -> ClusterPolicy:
    """One ClusterNetworkPolicy, AdminNetworkPolicy or BaselineAdminNetworkPolicy, read fail-closed.

    Every bad field is appended to `issues` (with `issues=None` the first is raised). What
    is returned never allows more than a valid reading of the object could:
    - an invalid Accept rule matches nothing; an invalid Deny or Pass rule drops everything
      in its direction (the API's "fail closed" for a peer it cannot read);
    - when the policy's tier, priority or spec cannot be read it counts as Admin priority 0;
      when its subject cannot be read it selects every pod. Either way only its Deny rules
      apply, with its Pass rules turned into Deny (a Pass could skip a Deny): it can only
      drop more than a valid reading.
    """
    collect: list[Invalid] = [] if issues is None else issues
    start = len(collect)
    ref = raw.ref
    kind = ref.kind if ref.kind in DIALECTS else CNP
    d = DIALECTS[kind]
    meta = raw.body.get("metadata")
    if isinstance(meta, Mapping) and meta.get("name") is not None and not isinstance(meta["name"], str):
        collect.append(Invalid("metadata.name", f"must be a string, got {type(meta['name']).__name__}"))
    name_ok = is_dns_subdomain(ref.name)
    if not ref.name:
        collect.append(Invalid("metadata.name", "missing"))
    elif not name_ok:
        collect.append(Invalid("metadata.name", f"{ref.name!r} is not a DNS-1123 subdomain"))
    elif kind == BANP and ref.name != "default":
        # The API admits one BaselineAdminNetworkPolicy, named "default"; another one
        # cannot exist, so its Allow rules must not apply.
        collect.append(Invalid("metadata.name", f"a {BANP} must be named 'default', got {ref.name!r}"))
        name_ok = False
    name = safe_name(ref.name, is_dns_subdomain(ref.name))
    certain = name_ok
    try:
        spec = as_map(raw.body.get("spec"), "spec", required=True)
    except Invalid as e:
        collect.append(e)
        return ClusterPolicy(kind, name, Tier.ADMIN, 0, Subject(everything=True), (), (), ref.source)
    allowed = {"subject", "ingress", "egress"} | ({"tier"} if d.has_tier else set()) \
        | ({"priority"} if d.has_priority else set())
    unknown = set(spec) - allowed
    if unknown:
        collect.append(Invalid(unknown_field("spec", unknown), "unknown field (a newer API version?)"))
        certain = False
    tier = _tier(spec, kind, collect)
    priority = _priority(spec, d, collect)
    try:
        subject = parse_subject(spec.get("subject"), "spec.subject")
    except Invalid as e:
        collect.append(e)
        subject = Subject(everything=True)
    ingress = _parse_rules(spec, False, d, collect)
    egress = _parse_rules(spec, True, d, collect)
    if certain and tier is not None and priority is not None:
        if subject.everything:  # only the selection is unknown: deny-only at its own precedence
            ingress, egress = _deny_only(ingress), _deny_only(egress)
        pol = ClusterPolicy(kind, name, tier, priority, subject, ingress, egress, ref.source)
    else:
        # Precedence unknown: the highest (Admin, 0), where deny-only rules can only drop more.
        pol = ClusterPolicy(kind, name, Tier.ADMIN, 0, subject, _deny_only(ingress), _deny_only(egress), ref.source)
    if issues is None and len(collect) > start:
        raise collect[start]
    return pol


def unreadable(kind: str, name: str, source: str) -> ClusterPolicy:
    """What a policy of which nothing can be read means: nothing is allowed or passed by it."""
    return ClusterPolicy(kind if kind in DIALECTS else CNP, name, Tier.ADMIN, 0, Subject(everything=True),
                         (), (), source)
