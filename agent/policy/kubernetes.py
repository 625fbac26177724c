"""Kubernetes NetworkPolicy v1 semantics: Inventory -> IR. Pure: no I/O.

Follows the API reference (networking.k8s.io/v1):
- a pod is isolated for a direction when any policy of that type selects it;
- policies are additive; peers in from/to are OR'd; inside one peer namespaceSelector
  and podSelector are AND'd; podSelector alone means the policy's namespace;
- missing or empty from/to means any peer; missing or empty ports means any port and
  protocol; a port entry without `port` means every port of its protocol;
- named ports resolve against the destination pod: for ingress the selected pod, for
  egress each peer pod (so one egress rule may become one IR rule per port number).
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.inventory import Endpoint, Inventory, IPAddress, Problem, RawPolicy
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
)
from agent.policy.errors import Invalid
from agent.policy.errors import as_list as _list
from agent.policy.errors import as_map as _map
from agent.policy.selectors import Selector, parse_selector

PROTOCOLS = ("TCP", "UDP", "SCTP")
POLICY_TYPES = ("Ingress", "Egress")
# IANA service name, as Kubernetes validates named ports.
_PORT_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")


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


def _network(text: Any, field: str) -> Network:
    if not isinstance(text, str) or "/" not in text:
        raise Invalid(field, f"invalid CIDR {text!r}")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as e:
        raise Invalid(field, f"invalid CIDR {text!r}: {e}") from None


def _parse_ip_block(obj: Any, field: str) -> IPBlock:
    block = _map(obj, field)
    cidr = _network(block.get("cidr"), f"{field}.cidr")
    excepts = []
    for i, e in enumerate(_list(block.get("except"), f"{field}.except")):
        net = _network(e, f"{field}.except[{i}]")
        if net.version != cidr.version or not net.subnet_of(cidr) or net == cidr:  # type: ignore[arg-type]
            raise Invalid(f"{field}.except[{i}]", f"{e} must be a strict subset of {cidr}")
        excepts.append(net)
    return IPBlock(cidr, tuple(excepts))


def _parse_peer(obj: Any, field: str) -> Peer:
    peer = _map(obj, field)
    unknown = set(peer) - {"podSelector", "namespaceSelector", "ipBlock"}
    if unknown:
        raise Invalid(f"{field}.{sorted(unknown)[0]}", "unknown peer field")
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
    proto = entry.get("protocol") or "TCP"
    if proto not in PROTOCOLS:
        raise Invalid(f"{field}.protocol", f"must be one of TCP, UDP, SCTP, got {proto!r}")
    port = entry.get("port")
    end = entry.get("endPort")
    if isinstance(port, bool):
        raise Invalid(f"{field}.port", f"invalid port {port!r}")
    if isinstance(port, str) and port.isdigit():
        port = int(port)  # an IntOrString written as a string of digits
    if isinstance(port, int):
        if not 1 <= port <= 65535:
            raise Invalid(f"{field}.port", f"{port} is out of range 1-65535")
    elif isinstance(port, str):
        if not _PORT_NAME.match(port):
            raise Invalid(f"{field}.port", f"invalid named port {port!r}")
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


def _parse_rule(obj: Any, field: str, peers_key: str) -> PolicyRule:
    rule = _map(obj, field)
    unknown = set(rule) - {peers_key, "ports"}
    if unknown:
        raise Invalid(f"{field}.{sorted(unknown)[0]}", "unknown rule field")
    raw_peers = _list(rule.get(peers_key), f"{field}.{peers_key}")
    peers = tuple(_parse_peer(p, f"{field}.{peers_key}[{i}]") for i, p in enumerate(raw_peers))
    ports = tuple(
        _parse_port(p, f"{field}.ports[{i}]")
        for i, p in enumerate(_list(rule.get("ports"), f"{field}.ports"))
    )
    return PolicyRule(peers or None, ports)


def parse_policy(raw: RawPolicy) -> NetworkPolicy:
    """Validate one NetworkPolicy; raise `Invalid` naming the first bad field."""
    body = raw.body
    spec = _map(body.get("spec"), "spec")
    pod_selector = parse_selector(spec.get("podSelector"), "spec.podSelector")
    ingress = tuple(
        _parse_rule(r, f"spec.ingress[{i}]", "from")
        for i, r in enumerate(_list(spec.get("ingress"), "spec.ingress"))
    )
    egress = tuple(
        _parse_rule(r, f"spec.egress[{i}]", "to")
        for i, r in enumerate(_list(spec.get("egress"), "spec.egress"))
    )
    raw_types = spec.get("policyTypes")
    if raw_types is None or raw_types == []:
        # Defaulting: Ingress always; Egress when the policy has egress rules.
        types = {"Ingress"} | ({"Egress"} if egress else set())
    else:
        types = set()
        for i, t in enumerate(_list(raw_types, "spec.policyTypes")):
            if t not in POLICY_TYPES:
                raise Invalid(f"spec.policyTypes[{i}]", f"must be Ingress or Egress, got {t!r}")
            types.add(t)
    return NetworkPolicy(
        namespace=raw.ref.namespace,
        name=raw.ref.name,
        pod_selector=pod_selector,
        types=frozenset(types),
        ingress=ingress,
        egress=egress,
        source=raw.ref.source,
    )


# ---------------------------------------------------------------- compiling


class _Resolver:
    """Resolves peers to addresses, memoised per selector pair (many policies share them)."""

    def __init__(self, inv: Inventory) -> None:
        self.inv = inv
        self.by_namespace: dict[str, list[Endpoint]] = defaultdict(list)
        for ep in inv.endpoints.values():
            self.by_namespace[ep.namespace].append(ep)
        self._cache: dict[tuple[Any, ...], tuple[Endpoint, ...]] = {}

    def namespaces(self, sel: Selector) -> list[str]:
        names = set(self.by_namespace) | set(self.inv.namespaces)
        return sorted(n for n in names if sel.matches(self.inv.namespace(n).labels))

    def pods(self, peer: Peer, policy_ns: str) -> tuple[Endpoint, ...]:
        key = (peer.pod_selector, peer.namespace_selector, policy_ns)
        hit = self._cache.get(key)
        if hit is None:
            nss = [policy_ns] if peer.namespace_selector is None else self.namespaces(peer.namespace_selector)
            psel = peer.pod_selector or Selector()
            hit = tuple(ep for ns in nss for ep in self.by_namespace.get(ns, ()) if psel.matches(ep.labels))
            self._cache[key] = hit
        return hit

    def peer_set(self, peers: tuple[Peer, ...], policy_ns: str) -> PeerSet:
        nets: list[Network | IPAddress] = []
        for p in peers:
            if p.ip_block is not None:
                nets.extend(p.ip_block.nets())
            else:
                for ep in self.pods(p, policy_ns):
                    nets.extend(ep.ips)
        return PeerSet.of(nets)


def _numeric_ports(ports: Iterable[PortSpec]) -> list[PortMatch]:
    out = []
    for p in ports:
        proto = p.protocol.lower()
        if p.port is None:
            out.append(PortMatch(proto))
        elif isinstance(p.port, int):
            out.append(PortMatch(proto, p.port, p.end_port or p.port))
    return out


def _named(ports: Iterable[PortSpec]) -> list[PortSpec]:
    return [p for p in ports if isinstance(p.port, str)]


class _Compiler:
    def __init__(self, inv: Inventory, policies: list[NetworkPolicy]) -> None:
        self.inv = inv
        self.res = _Resolver(inv)
        self.by_ns: dict[str, list[NetworkPolicy]] = defaultdict(list)
        for p in sorted(policies, key=lambda p: (p.namespace, p.name)):
            self.by_ns[p.namespace].append(p)
        # Peer sets depend only on (policy, direction, rule): compute once, share by key.
        self._peers: dict[str, PeerSet | None] = {}
        self._egress_named: dict[str, list[Rule]] = {}

    def _rule_peers(self, key: str, rule: PolicyRule, ns: str) -> PeerSet | None:
        if key not in self._peers:
            self._peers[key] = None if rule.peers is None else self.res.peer_set(rule.peers, ns)
        return self._peers[key]

    def _ingress_rules(self, pol: NetworkPolicy, ep: Endpoint) -> list[Rule]:
        out = []
        for i, rule in enumerate(pol.ingress):
            key = f"{pol.source}:{pol.key}/ingress/{i}"
            origin = Origin(pol.source, pol.namespace, pol.name, Direction.INGRESS, i)
            ports = _numeric_ports(rule.ports)
            for p in _named(rule.ports):  # resolved against the selected (destination) pod
                num = ep.named_port(str(p.port), p.protocol)
                if num is not None:
                    ports.append(PortMatch(p.protocol.lower(), num, num))
            if rule.ports and not ports:
                continue  # every port was a name this pod lacks: the rule matches nothing
            peers = self._rule_peers(key, rule, pol.namespace)
            out.append(Rule(origin, peers, PortMatch.canonical(ports), key=key))
        return out

    def _candidates(self, rule: PolicyRule, ns: str) -> list[Endpoint]:
        """Pods that may be this rule's destinations: the selected ones, plus any pod whose
        address an ipBlock covers (every pod when the rule has no peers)."""
        if rule.peers is None:
            return list(self.inv.endpoints.values())
        out: dict[str, Endpoint] = {}
        blocks: list[Network] = []
        for p in rule.peers:
            if p.ip_block is not None:
                blocks.extend(p.ip_block.nets())
            else:
                out.update((ep.key, ep) for ep in self.res.pods(p, ns))
        if blocks:
            covered = PeerSet.of(blocks)
            out.update((ep.key, ep) for ep in self.inv.endpoints.values() if any(map(covered.contains, ep.ips)))
        return list(out.values())

    def _egress_rules(self, pol: NetworkPolicy) -> list[Rule]:
        """Egress rules do not depend on the selected pod: compute once per policy."""
        cache_key = f"{pol.source}:{pol.key}"
        if cache_key in self._egress_named:
            return self._egress_named[cache_key]
        out: list[Rule] = []
        for i, rule in enumerate(pol.egress):
            key = f"{pol.source}:{pol.key}/egress/{i}"
            origin = Origin(pol.source, pol.namespace, pol.name, Direction.EGRESS, i)
            peers = self._rule_peers(key, rule, pol.namespace)
            numeric = _numeric_ports(rule.ports)
            if numeric or not rule.ports:
                out.append(Rule(origin, peers, PortMatch.canonical(numeric), key=key))
            named = _named(rule.ports)
            if not named:
                continue
            # Named ports resolve on each destination pod: group peer addresses by number.
            buckets: dict[tuple[str, int], list[IPAddress]] = defaultdict(list)
            for ep in self._candidates(rule, pol.namespace):
                ips = [ip for ip in ep.ips if peers is None or peers.contains(ip)]
                if not ips:
                    continue
                for p in named:
                    num = ep.named_port(str(p.port), p.protocol)
                    if num is not None:
                        buckets[(p.protocol.lower(), num)].extend(ips)
            for (proto, num), ips in sorted(buckets.items()):
                nkey = f"{key}/{proto}/{num}"
                out.append(
                    Rule(origin, PeerSet.of(ips), (PortMatch(proto, num, num),), key=nkey)
                )
        self._egress_named[cache_key] = out
        return out

    def endpoint(self, ep: Endpoint) -> EndpointProgram:
        ing_rules: list[Rule] = []
        eg_rules: list[Rule] = []
        ing_by: list[str] = []
        eg_by: list[str] = []
        for pol in self.by_ns.get(ep.namespace, ()):
            if not pol.pod_selector.matches(ep.labels):
                continue
            if "Ingress" in pol.types:
                ing_by.append(pol.key)
                ing_rules.extend(self._ingress_rules(pol, ep))
            if "Egress" in pol.types:
                eg_by.append(pol.key)
                eg_rules.extend(self._egress_rules(pol))
        return EndpointProgram(
            key=ep.key,
            ips=ep.ips,
            ingress=DirectionProgram(bool(ing_by), tuple(ing_rules), tuple(ing_by)),
            egress=DirectionProgram(bool(eg_by), tuple(eg_rules), tuple(eg_by)),
            interface=ep.interface,
        )


def compile_program(
    inv: Inventory,
    policies: list[NetworkPolicy],
    node: str | None = None,
    source: str = "file",
) -> Program:
    """The IR for the endpoints on `node` (every endpoint when node is None)."""
    comp = _Compiler(inv, policies)
    eps = {
        key: comp.endpoint(ep)
        for key, ep in sorted(inv.endpoints.items())
        if node is None or ep.node == node
    }
    return Program(source=source, endpoints=eps)


def compile_inventory(inv: Inventory, node: str | None = None, source: str = "file") -> Program:
    """Compile the (already admitted) policies of an inventory."""
    policies = []
    for raw in inv.policies.values():
        try:
            policies.append(parse_policy(raw))
        except Invalid as e:  # admission normally filtered these out
            inv.problems.append(Problem(raw.ref, e.field, e.message))
    return compile_program(inv, policies, node=node, source=source)
