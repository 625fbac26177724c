"""NetworkPolicy semantics: admitted policies and the inventory -> the IR, per local endpoint."""


from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from agent.inventory import Endpoint, Inventory, IPAddress, Problem
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
from agent.policy.cluster import KINDS as CLUSTER_KINDS
from agent.policy.cluster import NO_LEARNED, ClusterCompiler, ClusterPolicy, Learned, TierRules, parse_cluster_policy
from agent.policy.errors import (
    Invalid,
)
from agent.policy.kubernetes.parse import NetworkPolicy, Peer, PolicyRule, PortSpec, parse_policy
from agent.policy.selectors import Selector

EntryKey = tuple[Any, ...]  # (pod selector, namespace selector, policy namespace): one peer's pods


class _Resolver:
    """Resolves peers to addresses, memoised per selector pair (many policies share them).

    Kept across compiles by the incremental compiler: `move` keeps the per-namespace pod
    index current, and it edits the memoised entries (`entries()`: entry -> its pods by
    key) in place as pods and namespaces change."""

    def __init__(self, inv: Inventory) -> None:
        self.inv = inv
        # namespace -> pod key -> pod: a dict, so one pod moves in O(1) (order never matters:
        # every consumer collapses addresses into a PeerSet)
        self.by_namespace: dict[str, dict[str, Endpoint]] = defaultdict(dict)
        for key, ep in inv.endpoints.items():
            self.by_namespace[ep.namespace][key] = ep
        self._cache: dict[EntryKey, dict[str, Endpoint]] = {}

    def move(self, old: Endpoint | None, new: Endpoint | None) -> None:
        """One pod removed, added or replaced."""
        if old is not None:
            pods = self.by_namespace.get(old.namespace)
            if pods is not None:
                pods.pop(old.key, None)
                if not pods:
                    del self.by_namespace[old.namespace]
        if new is not None:
            self.by_namespace[new.namespace][new.key] = new

    def entries(self) -> dict[EntryKey, dict[str, Endpoint]]:
        return self._cache

    def forget(self, key: EntryKey) -> None:
        self._cache.pop(key, None)

    def namespaces(self, sel: Selector) -> list[str]:
        """Namespaces a namespaceSelector matches; never one whose labels did not validate
        (its real labels are unknown: not even NotIn or DoesNotExist may match it)."""
        names = set(self.by_namespace) | set(self.inv.namespaces)
        out = []
        for n in names:
            ns = self.inv.namespace(n)
            if not ns.labels_invalid and sel.matches(ns.labels):
                out.append(n)
        return sorted(out)

    @staticmethod
    def entry_key(peer: Peer, policy_ns: str) -> EntryKey:
        return (peer.pod_selector, peer.namespace_selector, policy_ns)

    def pods(self, peer: Peer, policy_ns: str) -> Iterable[Endpoint]:
        key = self.entry_key(peer, policy_ns)
        hit = self._cache.get(key)
        if hit is None:
            nss = [policy_ns] if peer.namespace_selector is None else self.namespaces(peer.namespace_selector)
            psel = peer.pod_selector or Selector()
            # A pod whose labels did not validate is matched by no peer (fail closed).
            # keyed by the index's own key strings: Endpoint.key makes a new one per call
            hit = {
                key: ep for ns in nss for key, ep in self.by_namespace.get(ns, {}).items()
                if not ep.labels_invalid and psel.matches(ep.labels)
            }
            self._cache[key] = hit
        return hit.values()

    def peer_set(self, peers: tuple[Peer, ...], policy_ns: str) -> PeerSet:
        nets: list[Network | IPAddress] = []
        for p in peers:
            if p.ip_block is not None:
                nets.extend(p.ip_block.nets())
            else:
                for ep in self.pods(p, policy_ns):
                    nets.extend(ep.ips)
        return PeerSet.of(nets)


def entry_holds(key: EntryKey, ep: Endpoint, inv: Inventory) -> bool:
    """Whether memoised entry `key` holds pod `ep` in inventory `inv` (what `_Resolver.pods`
    would select): the incremental compiler's test of which entries a pod change touches."""
    psel, nssel, policy_ns = key
    if ep.labels_invalid or not (psel or Selector()).matches(ep.labels):
        return False
    if nssel is None:
        return ep.namespace == policy_ns
    ns = inv.namespace(ep.namespace)
    return not ns.labels_invalid and nssel.matches(ns.labels)


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
    """Compiles endpoints, memoising what policies share: peer sets by rule key, egress
    rules by policy. It records what each memoised result was read from (which resolver
    entries, which ipBlocks) so the incremental compiler can forget exactly what a change
    touches and keep every other object."""

    def __init__(self, inv: Inventory, policies: list[NetworkPolicy]) -> None:
        self.inv = inv
        self.res = _Resolver(inv)
        self.by_ns: dict[str, list[NetworkPolicy]] = {}
        self.set_policies(policies)
        # Peer sets depend only on (policy, direction, rule): compute once, share by key.
        self._peers: dict[str, PeerSet | None] = {}
        self._egress_named: dict[str, list[Rule]] = {}
        # Dependencies of the memoised results above.
        self.entry_rules: dict[EntryKey, set[str]] = defaultdict(set)  # entry -> rule keys reading it
        self.rule_entries: dict[str, tuple[EntryKey, ...]] = {}
        self.rule_owner: dict[str, tuple[str, str]] = {}  # rule key -> (policy cache key, namespace)
        # policy cache key -> (its namespace, ipBlocks whose pods' named ports were read,
        # whether every pod's were)
        self.named_deps: dict[str, tuple[str, PeerSet | None, bool]] = {}
        self.touched: set[str] = set()  # namespaces whose policies' memoised results were forgotten
        self.rule_defs: dict[str, PolicyRule] = {}  # rule key -> the rule its peer set is of

    def set_policies(self, policies: Iterable[NetworkPolicy]) -> None:
        by_ns: dict[str, list[NetworkPolicy]] = defaultdict(list)
        for p in sorted(policies, key=lambda p: (p.namespace, p.name)):
            by_ns[p.namespace].append(p)
        self.by_ns = dict(by_ns)

    def _rule_peers(self, pol: NetworkPolicy, key: str, rule: PolicyRule) -> PeerSet | None:
        if key not in self._peers:
            self._peers[key] = None if rule.peers is None else self.res.peer_set(rule.peers, pol.namespace)
            entries = tuple({self.res.entry_key(p, pol.namespace): None
                             for p in rule.peers or () if p.ip_block is None})
            self.rule_entries[key] = entries
            self.rule_owner[key] = (f"{pol.source}:{pol.key}", pol.namespace)
            self.rule_defs[key] = rule
            for e in entries:
                self.entry_rules[e].add(key)
        return self._peers[key]

    # ------------------------------------------------------------ forgetting (incremental)

    def forget_rule(self, key: str) -> None:
        """Drop a rule's peer set (and its policy's egress rules); resolver entries no rule
        reads any more are dropped too."""
        self._peers.pop(key, None)
        self.rule_defs.pop(key, None)
        owner = self.rule_owner.pop(key, None)
        if owner is not None:
            self.forget_egress(*owner)
        for e in self.rule_entries.pop(key, ()):
            users = self.entry_rules.get(e)
            if users is not None:
                users.discard(key)
                if not users:
                    del self.entry_rules[e]
                    self.res.forget(e)

    def peers(self, key: str) -> PeerSet | None:
        return self._peers.get(key)

    def set_peers(self, key: str, peers: PeerSet) -> None:
        """A rule's peer set edited in place (its members changed): its policy's egress
        rules and its namespace's endpoints are rebuilt from it."""
        self._peers[key] = peers
        owner = self.rule_owner.get(key)
        if owner is not None:
            self.forget_egress(*owner)

    def forget_egress(self, cache_key: str, namespace: str) -> None:
        self._egress_named.pop(cache_key, None)
        self.named_deps.pop(cache_key, None)
        self.touched.add(namespace)

    def forget_policy(self, pol: NetworkPolicy) -> None:
        prefix = f"{pol.source}:{pol.key}/"
        for i in range(len(pol.ingress)):
            self.forget_rule(f"{prefix}ingress/{i}")
        for i in range(len(pol.egress)):
            self.forget_rule(f"{prefix}egress/{i}")
        self.forget_egress(f"{pol.source}:{pol.key}", pol.namespace)

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
            peers = self._rule_peers(pol, key, rule)
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
            peers = self._rule_peers(pol, key, rule)
            numeric = _numeric_ports(rule.ports)
            if numeric or not rule.ports:
                out.append(Rule(origin, peers, PortMatch.canonical(numeric), key=key))
            named = _named(rule.ports)
            if not named:
                continue
            blocks = [n for p in rule.peers or () if p.ip_block is not None for n in p.ip_block.nets()]
            _, seen, anyone = self.named_deps.get(cache_key, ("", None, False))
            if blocks:
                seen = PeerSet.of([*(seen.nets if seen else ()), *blocks])
            self.named_deps[cache_key] = (pol.namespace, seen, anyone or rule.peers is None)
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
            # Fail closed on either side: an invalid podSelector, or a pod whose labels did
            # not validate, means selected for isolation; the policy's rules apply only when
            # the selection is certain (a pod with bad labels: only an empty podSelector).
            if pol.pod_selector.invalid or ep.labels_invalid:
                isolates, rules = True, pol.pod_selector.empty
            else:
                isolates = rules = pol.pod_selector.matches(ep.labels)
            if not isolates:
                continue
            if "Ingress" in pol.types:
                ing_by.append(pol.key)
                if rules:
                    ing_rules.extend(self._ingress_rules(pol, ep))
            if "Egress" in pol.types:
                eg_by.append(pol.key)
                if rules:
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


def _with_tiers(prog: Program, inv: Inventory, cluster: list[ClusterPolicy], learned: Learned) -> Program:
    """Put each endpoint's ClusterNetworkPolicy rules around its NetworkPolicy rules: ADMIN
    first, BASELINE last (ir.first_match's order). `isolated` stays NetworkPolicy's own: a
    direction with only cluster rules is enforced but lets unmatched traffic through."""
    if not cluster:
        return prog
    comp = ClusterCompiler(inv, cluster, learned)
    eps = {key: with_tier_rules(ep, comp.endpoint(inv.endpoints[key])) for key, ep in prog.endpoints.items()}
    return replace(prog, endpoints=eps)


def with_tier_rules(ep: EndpointProgram, t: TierRules) -> EndpointProgram:
    """One endpoint's NetworkPolicy program with its cluster rules around its own rules."""
    return replace(
        ep,
        ingress=replace(ep.ingress, rules=(*t.ingress_admin, *ep.ingress.rules, *t.ingress_baseline)),
        egress=replace(ep.egress, rules=(*t.egress_admin, *ep.egress.rules, *t.egress_baseline)),
    )


def compile_inventory(
    inv: Inventory, node: str | None = None, source: str = "file", learned: Learned = NO_LEARNED
) -> Program:
    """Compile the admitted policies of an inventory (as admission read them, fail-closed):
    NetworkPolicies, and the cluster tiers around them. `learned`: addresses DNS answered
    each pod for its domainNames rules (none: those rules match nothing)."""
    policies = []
    cluster: list[ClusterPolicy] = []
    for raw in inv.policies.values():
        if isinstance(raw.parsed, ClusterPolicy):
            cluster.append(raw.parsed)
            continue
        if isinstance(raw.parsed, NetworkPolicy):
            policies.append(raw.parsed)
            continue
        issues: list[Invalid] = []
        if raw.ref.kind in CLUSTER_KINDS:
            cluster.append(parse_cluster_policy(raw, issues))
        else:
            policies.append(parse_policy(raw, issues))
        inv.problems.extend(Problem(raw.ref, e.field, e.message) for e in issues)
    return _with_tiers(compile_program(inv, policies, node=node, source=source), inv, cluster, learned)
