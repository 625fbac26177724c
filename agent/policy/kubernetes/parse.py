"""NetworkPolicy v1 read as the API server validates it, fail-closed (see the package docstring)."""


from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.inventory import IPAddress, RawPolicy
from agent.ir import (
    Network,
)
from agent.policy.errors import (
    Invalid,
    is_dns_label,
    is_dns_subdomain,
    safe_name,
    unknown_field,
    valid_port_name,
)
from agent.policy.errors import as_list as _list
from agent.policy.errors import as_map as _map
from agent.policy.selectors import INVALID, Selector, parse_selector

API_PROTOCOLS = ("TCP", "UDP", "SCTP")
POLICY_TYPES = ("Ingress", "Egress")


@dataclass(frozen=True)
class IPBlock:
    cidr: Network
    excepts: tuple[Network, ...]

    def nets(self) -> list[Network]:
        """The block minus its exceptions, as prefixes."""
        out: list[Network] = [self.cidr]
        for ex in self.excepts:
            nxt: list[Network] = []
            for n in out:
                if ex.version != n.version or not n.overlaps(ex):
                    nxt.append(n)
                elif ex.supernet_of(n):  # type: ignore[arg-type]
                    continue
                else:
                    nxt.extend(n.address_exclude(ex))  # type: ignore[arg-type]
            out = nxt
        return out


@dataclass(frozen=True)
class Peer:
    pod_selector: Selector | None = None
    namespace_selector: Selector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True)
class PortSpec:
    protocol: str  # TCP | UDP | SCTP
    port: int | str | None = None  # number, name, or None for every port
    end_port: int | None = None


@dataclass(frozen=True)
class PolicyRule:
    peers: tuple[Peer, ...] | None  # None: any peer (from/to missing or empty)
    ports: tuple[PortSpec, ...]  # (): any port and protocol


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: Selector
    types: frozenset[str]
    ingress: tuple[PolicyRule, ...]
    egress: tuple[PolicyRule, ...]
    source: str = "file"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# ---------------------------------------------------------------- parsing


_DIGITS = re.compile(r"[0-9]+")
_SLOPPY_V4 = re.compile(r"([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)")
_V6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")


def _sloppy_v4(text: str) -> str:
    m = _SLOPPY_V4.fullmatch(text)
    if m is None or any(int(o) > 255 for o in m.groups()):
        raise ValueError(f"invalid IPv4 address {text!r}")
    return ".".join(str(int(o)) for o in m.groups())


def parse_cidr_sloppy(text: Any) -> Network:
    """A CIDR as the API server reads it (k8s.io/utils netutils.ParseCIDRSloppy, Go 1.16's
    parser): IPv4 octets and the prefix length may have leading zeros, read as DECIMAL
    (010.0.2.0/24 is 10.0.2.0/24); host bits may be set. Raises ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string, got {type(text).__name__}")
    addr, slash, prefix = text.partition("/")
    if not slash or not _DIGITS.fullmatch(prefix):
        raise ValueError("needs /<prefix length>")
    if ":" in addr:
        if not _V6_CHARS.fullmatch(addr):  # no zone ("%eth0"), no spaces
            raise ValueError(f"invalid IPv6 address {addr!r}")
        if "." in addr:  # an embedded IPv4 tail: same sloppy octets
            cut = addr.rindex(":") + 1
            addr = addr[:cut] + _sloppy_v4(addr[cut:])
        ip: IPAddress = ipaddress.IPv6Address(addr)
    else:
        ip = ipaddress.IPv4Address(_sloppy_v4(addr))
    length = int(prefix)
    if length > ip.max_prefixlen:
        raise ValueError(f"prefix length {length} out of range")
    return ipaddress.ip_network((ip, length), strict=False)


def _network(text: Any, field: str) -> Network:
    try:
        return parse_cidr_sloppy(text)
    except ValueError as e:
        raise Invalid(field, f"invalid CIDR {text!r}: {e}") from None


def _parse_ip_block(obj: Any, field: str) -> IPBlock:
    """Raises Invalid for any bad part, except entries included: dropping a bad except
    would widen the block, so the whole peer must match nothing instead."""
    block = _map(obj, field)
    unknown = set(block) - {"cidr", "except"}
    if unknown:
        raise Invalid(unknown_field(field, unknown), "unknown ipBlock field")
    cidr = _network(block.get("cidr"), f"{field}.cidr")
    excepts = []
    for i, e in enumerate(_list(block.get("except"), f"{field}.except")):
        net = _network(e, f"{field}.except[{i}]")
        if net.version != cidr.version or not net.subnet_of(cidr) or net.prefixlen <= cidr.prefixlen:  # type: ignore[arg-type]
            raise Invalid(f"{field}.except[{i}]", f"{e!r} must be a strict subset of {cidr}")
        excepts.append(net)
    return IPBlock(cidr, tuple(excepts))


def _parse_peer(obj: Any, field: str) -> Peer:
    peer = _map(obj, field)
    unknown = set(peer) - {"podSelector", "namespaceSelector", "ipBlock"}
    if unknown:
        raise Invalid(unknown_field(field, unknown), "unknown peer field")
    if "ipBlock" in peer and peer["ipBlock"] is not None:
        if peer.get("podSelector") is not None or peer.get("namespaceSelector") is not None:
            raise Invalid(field, "ipBlock cannot be combined with podSelector/namespaceSelector")
        return Peer(ip_block=_parse_ip_block(peer["ipBlock"], f"{field}.ipBlock"))
    pod = peer.get("podSelector")
    ns = peer.get("namespaceSelector")
    if pod is None and ns is None:
        raise Invalid(field, "a peer needs podSelector, namespaceSelector or ipBlock")
    return Peer(
        pod_selector=None if pod is None else parse_selector(pod, f"{field}.podSelector"),
        namespace_selector=None if ns is None else parse_selector(ns, f"{field}.namespaceSelector"),
    )


def _parse_port(obj: Any, field: str) -> PortSpec:
    entry = _map(obj, field)
    unknown = set(entry) - {"protocol", "port", "endPort"}
    if unknown:
        raise Invalid(unknown_field(field, unknown), "unknown port field")
    proto = entry.get("protocol")
    if proto is None:
        proto = "TCP"
    if not isinstance(proto, str) or proto not in API_PROTOCOLS:
        raise Invalid(f"{field}.protocol", f"must be one of TCP, UDP, SCTP, got {proto!r}")
    port = entry.get("port")
    end = entry.get("endPort")
    if isinstance(port, bool):
        raise Invalid(f"{field}.port", f"invalid port {port!r}")
    if isinstance(port, int):
        if not 1 <= port <= 65535:
            raise Invalid(f"{field}.port", f"{port} is out of range 1-65535")
    elif isinstance(port, str):
        # An IntOrString given as a string is a name: "80" has no letter, so it is invalid.
        if not valid_port_name(port):
            raise Invalid(f"{field}.port", f"invalid named port {port!r} (IANA_SVC_NAME)")
    elif port is not None:
        raise Invalid(f"{field}.port", f"must be a number or a name, got {port!r}")
    if end is not None:
        if isinstance(end, bool) or not isinstance(end, int):
            raise Invalid(f"{field}.endPort", f"must be a number, got {end!r}")
        if not isinstance(port, int):
            raise Invalid(f"{field}.endPort", "requires a numeric port")
        if not port <= end <= 65535:
            raise Invalid(f"{field}.endPort", f"{end} must be between port {port} and 65535")
    return PortSpec(proto, port, end)


def _parse_rule(obj: Any, field: str, peers_key: str, issues: list[Invalid]) -> PolicyRule | None:
    """One rule, fail-closed: invalid peers and ports are left out and reported; None when
    the rule as a whole is invalid or every peer (or every port) was, so that it matches
    nothing rather than any peer (or any port)."""
    try:
        rule = _map(obj, field)
        unknown = set(rule) - {peers_key, "ports"}
        if unknown:
            raise Invalid(unknown_field(field, unknown), "unknown rule field")
    except Invalid as e:
        issues.append(e)
        return None
    ok = True
    peers: list[Peer] = []
    ports: list[PortSpec] = []
    for key, parse, out in ((peers_key, _parse_peer, peers), ("ports", _parse_port, ports)):
        try:
            items = _list(rule.get(key), f"{field}.{key}")
        except Invalid as e:
            issues.append(e)
            ok = False
            continue
        for i, item in enumerate(items):
            try:
                out.append(parse(item, f"{field}.{key}[{i}]"))  # type: ignore[operator]
            except Invalid as e:
                issues.append(e)
        if items and not out:
            ok = False  # every entry was invalid: "none" must not become "any"
    return PolicyRule(tuple(peers) or None, tuple(ports)) if ok else None


def _parse_rules(spec: Mapping[str, Any], key: str, peers_key: str, issues: list[Invalid]) -> tuple[PolicyRule, ...]:
    try:
        raw = _list(spec.get(key), f"spec.{key}")
    except Invalid as e:
        issues.append(e)
        return ()
    rules = (_parse_rule(r, f"spec.{key}[{i}]", peers_key, issues) for i, r in enumerate(raw))
    return tuple(r for r in rules if r is not None)


def _parse_types(spec: Mapping[str, Any], issues: list[Invalid]) -> tuple[frozenset[str], bool]:
    """(policy types, whether they parsed). Unparsable types read as both directions."""
    raw = spec.get("policyTypes")
    if raw is None or raw == []:
        # Defaulting: Ingress always; Egress when the policy has egress rules (judged on the
        # raw field, so an unparsable egress list still counts).
        return frozenset({"Ingress"} | ({"Egress"} if spec.get("egress") not in (None, []) else set())), True
    if not isinstance(raw, list):
        issues.append(Invalid("spec.policyTypes", f"must be a list, got {type(raw).__name__}"))
        return frozenset(POLICY_TYPES), False
    ok = len(raw) <= len(POLICY_TYPES)
    if not ok:
        issues.append(Invalid("spec.policyTypes", f"may not have more than {len(POLICY_TYPES)} entries"))
    for i, t in enumerate(raw):
        if not isinstance(t, str) or t not in POLICY_TYPES:
            issues.append(Invalid(f"spec.policyTypes[{i}]", f"must be Ingress or Egress, got {t!r}"))
            ok = False
    return (frozenset(raw), True) if ok else (frozenset(POLICY_TYPES), False)


def isolation_only(namespace: str, name: str, source: str = "file") -> NetworkPolicy:
    """The most a policy of which nothing parses can mean: every pod of its namespace
    isolated both ways, nothing allowed."""
    return NetworkPolicy(namespace, name, INVALID, frozenset(POLICY_TYPES), (), (), source)


def parse_policy(raw: RawPolicy, issues: list[Invalid] | None = None) -> NetworkPolicy:
    """One NetworkPolicy, validated like the API server, read fail-closed.

    Every bad field is appended to `issues` (with `issues=None`, the first one is raised
    as `Invalid` instead, for callers that want all-or-nothing). What is returned never
    allows more than any valid reading of the object:
    - an invalid peer or port is left out; a rule whose peers (or ports) were all invalid,
      or that is itself malformed, is left out (it matches nothing);
    - an invalid podSelector selects every pod of the namespace, an invalid policyTypes
      means both directions, and in either case no rule of the policy applies (it only
      isolates); valid sibling rules of a valid policy still apply;
    - an invalid name or namespace is reported and replaced by a stand-in (`safe_name`).
    """
    collect: list[Invalid] = [] if issues is None else issues
    start = len(collect)
    ref = raw.ref
    meta = raw.body.get("metadata")
    for key in ("name", "namespace"):  # ref_of made strings of them; the API has only strings
        if isinstance(meta, Mapping) and meta.get(key) is not None and not isinstance(meta[key], str):
            collect.append(Invalid(f"metadata.{key}", f"must be a string, got {type(meta[key]).__name__}"))
    if not ref.name:
        collect.append(Invalid("metadata.name", "missing"))
    elif not is_dns_subdomain(ref.name):
        collect.append(Invalid("metadata.name", f"{ref.name!r} is not a DNS-1123 subdomain"))
    if not is_dns_label(ref.namespace):
        collect.append(Invalid("metadata.namespace", f"{ref.namespace!r} is not a DNS-1123 label"))
    namespace = safe_name(ref.namespace, is_dns_label(ref.namespace))
    name = safe_name(ref.name, is_dns_subdomain(ref.name))
    try:
        spec = _map(raw.body.get("spec"), "spec")
    except Invalid as e:
        collect.append(e)
        pol = isolation_only(namespace, name, ref.source)
    else:
        try:
            pod_selector = parse_selector(spec.get("podSelector"), "spec.podSelector")
        except Invalid as e:
            collect.append(e)
            pod_selector = INVALID
        ingress = _parse_rules(spec, "ingress", "from", collect)
        egress = _parse_rules(spec, "egress", "to", collect)
        types, types_ok = _parse_types(spec, collect)
        if pod_selector.invalid or not types_ok:
            ingress, egress = (), ()  # selection or direction unknown: isolate only
        pol = NetworkPolicy(namespace, name, pod_selector, types, ingress, egress, ref.source)
    if issues is None and len(collect) > start:
        raise collect[start]
    return pol


# ---------------------------------------------------------------- compiling
