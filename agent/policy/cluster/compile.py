"""Cluster policies and the inventory -> per-endpoint ADMIN and BASELINE rules of the IR."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.inventory import Endpoint, Inventory, IPAddress, Namespace
from agent.ir import Direction, Network, Origin, PeerSet, PortMatch, Rule, Tier, Verdict
from agent.policy.cluster.domains import NO_LEARNED, DomainRule, Learned, learned_rule_key
from agent.policy.cluster.model import ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule
from agent.policy.selectors import Selector


def tri(sel: Selector, labels: object, invalid: bool) -> bool | None:
    """Does `sel` match? None when unknown: the object's labels did not validate and the
    selector is not the empty one (which matches whatever the labels are)."""
    if invalid:
        return True if sel.empty else None
    return sel.matches(labels)  # type: ignore[arg-type]


def _and(a: bool | None, b: bool | None) -> bool | None:
    if a is False or b is False:
        return False
    return True if a is True and b is True else None


@dataclass
class _Peers:
    """A rule's peers split by certainty: pods (for named ports) and plain addresses."""

    pods: list[Endpoint] = field(default_factory=list)
    nets: list[Network | IPAddress] = field(default_factory=list)
    maybe_pods: list[Endpoint] = field(default_factory=list)  # labels unknown: only a drop matches them
    maybe_nets: list[Network | IPAddress] = field(default_factory=list)


@dataclass(frozen=True)
class TierRules:
    """One endpoint's cluster rules, per direction and tier, in evaluation order."""

    ingress_admin: tuple[Rule, ...] = ()
    ingress_baseline: tuple[Rule, ...] = ()
    egress_admin: tuple[Rule, ...] = ()
    egress_baseline: tuple[Rule, ...] = ()


class ClusterCompiler:
    def __init__(self, inv: Inventory, policies: Iterable[ClusterPolicy], learned: Learned = NO_LEARNED) -> None:
        self.inv = inv
        self.learned = learned  # addresses answered to each pod for its domainNames rules
        ordered = sorted(policies, key=lambda p: p.order)
        self.admin = [p for p in ordered if p.tier is Tier.ADMIN]
        self.baseline = [p for p in ordered if p.tier is Tier.BASELINE]
        # namespace -> pod key -> pod (order never matters: peers collapse into PeerSets)
        self.by_namespace: dict[str, dict[str, Endpoint]] = defaultdict(dict)
        for key, ep in inv.endpoints.items():
            self.by_namespace[ep.namespace][key] = ep
        self.namespace_names = sorted(set(self.by_namespace) | set(inv.namespaces))
        self._peers: dict[str, _Peers] = {}
        self._peer_defs: dict[str, tuple[ClusterPeer, ...]] = {}  # what each entry of _peers was read from
        self._ns_match: dict[tuple[Selector, str], bool | None] = {}
        self._subject_ns: dict[tuple[int, str], bool | None] = {}
        self._ingress_rules: dict[tuple[str, tuple[PortMatch, ...]], list[Rule]] = {}
        self._egress: dict[tuple[str, Verdict], list[Rule]] = {}
        self._pieces: dict[tuple[str, Verdict], list[tuple[str, Verdict, _Peers, PeerSet]]] = {}
        # Results forgotten by `update` (or a previous compiler's, see `inherit`): a result
        # computed again and equal is swapped back for its old object, compared once here so
        # that every endpoint holding it compares by identity.
        self._was_pieces: dict[tuple[str, Verdict], list[tuple[str, Verdict, _Peers, PeerSet]]] = {}
        self._was_ingress: dict[tuple[str, tuple[PortMatch, ...]], list[Rule]] = {}
        self._was_egress: dict[tuple[str, Verdict], list[Rule]] = {}
        # Set by `update` after a change of pods only: edits a forgotten piece's addresses by
        # those that may have moved (old set, static nets, pods now in it, moved addresses)
        # instead of collapsing them all again.
        self._edit: Callable[[PeerSet, PeerSet, list[Endpoint], set[IPAddress]], PeerSet] | None = None
        self._moved: set[IPAddress] = set()

    def inherit(self, old: ClusterCompiler) -> None:
        """Reuse `old`'s results where this compiler computes equal ones (same objects)."""
        self._was_pieces, self._was_ingress, self._was_egress = dict(old._pieces), dict(old._ingress_rules), \
            dict(old._egress)

    # ------------------------------------------------------------ selection

    def _namespace_match(self, sel: Selector, name: str) -> bool | None:
        key = (sel, name)
        if key not in self._ns_match:
            ns = self.inv.namespace(name)
            self._ns_match[key] = tri(sel, ns.labels, ns.labels_invalid)
        return self._ns_match[key]

    def selects(self, pol: ClusterPolicy, ep: Endpoint) -> bool | None:
        """Is `ep` a subject of `pol`? None: cannot tell (labels that did not validate)."""
        s = pol.subject
        if s.everything:
            return True
        key = (id(s), ep.namespace)  # policies outlive the compiler: ids are stable
        ns = self._subject_ns.get(key)
        if key not in self._subject_ns:
            ns = self._subject_ns[key] = self._namespace_match(s.namespaces, ep.namespace)
        if ns is False or s.pods is None:
            return ns
        return _and(ns, tri(s.pods, ep.labels, ep.labels_invalid))

    def _resolve(self, key: str, peers: tuple[ClusterPeer, ...]) -> _Peers:
        hit = self._peers.get(key)
        if hit is not None:
            return hit
        out = _Peers()
        for p in peers:
            out.nets.extend(p.networks)
            if p.nodes is not None:
                for node in sorted(self.inv.nodes.values(), key=lambda n: n.name):
                    m = tri(p.nodes, node.labels, node.labels_invalid)
                    if m is not False:
                        (out.nets if m else out.maybe_nets).extend(node.ips)
            if p.namespaces is None:
                continue
            for name in self.namespace_names:
                ns_m = self._namespace_match(p.namespaces, name)
                if ns_m is False:
                    continue
                for ep in self.by_namespace.get(name, {}).values():
                    m = _and(ns_m, True if p.pods is None else tri(p.pods, ep.labels, ep.labels_invalid))
                    if m is not False:
                        (out.pods if m else out.maybe_pods).append(ep)
        self._peers[key] = out
        self._peer_defs[key] = peers
        return out

    # ------------------------------------------------------------ following changes (incremental)

    def holding(self, keys: set[str]) -> list[ClusterPolicy]:
        """The policies some of whose rules have these keys (an endpoint's rules can change
        with those peers only if one of them selects it)."""
        prefixes = {k.rsplit("/", 2)[0] for k in keys}
        return [p for p in self.admin + self.baseline if p.key in prefixes]

    def update(self, inv: Inventory, pods: Iterable[tuple[Endpoint | None, Endpoint | None]],
               namespaces: Iterable[tuple[str, Namespace, Namespace]], nodes: bool,
               edit: Callable[[PeerSet, PeerSet, list[Endpoint], set[IPAddress]], PeerSet] | None = None) -> set[str]:
        """Follow `inv`, which differs from the compiler's inventory by the changed `pods` and
        `namespaces` (old, new) and, when `nodes`, its Nodes: forget the memoised peers (and
        what was built from them) that such a change can alter; returns their rule keys.
        The results of `endpoint` are then those of a fresh compiler over `inv`. `edit`: see
        `_edit` (used only when nothing but pods changed)."""
        old_inv, self.inv = self.inv, inv
        pods, namespaces = list(pods), list(namespaces)
        self._edit = edit if not namespaces and not nodes else None
        self._moved = {ip for o, n in pods for ep in (o, n) if ep is not None for ip in ep.ips}
        for o, n in pods:
            if o is not None:
                here = self.by_namespace.get(o.namespace)
                if here is not None:
                    here.pop(o.key, None)
                    if not here:
                        del self.by_namespace[o.namespace]
            if n is not None:
                self.by_namespace[n.namespace][n.key] = n
        if pods or namespaces:
            self.namespace_names = sorted(set(self.by_namespace) | set(inv.namespaces))
        for name, _, _ in namespaces:
            for k in [k for k in self._ns_match if k[1] == name]:
                del self._ns_match[k]
            for k2 in [k for k in self._subject_ns if k[1] == name]:
                del self._subject_ns[k2]

        def reads(p: ClusterPeer) -> bool:
            if p.nodes is not None:
                return nodes
            if p.namespaces is None:
                return False
            for _, o_ns, n_ns in namespaces:  # a namespace entering or leaving the selector
                if tri(p.namespaces, o_ns.labels, o_ns.labels_invalid) != tri(
                        p.namespaces, n_ns.labels, n_ns.labels_invalid):
                    return True
            for ep, in_inv in [(o, old_inv) for o, _ in pods] + [(n, inv) for _, n in pods]:
                if ep is None:
                    continue  # a pod that was or is a (maybe) peer: its entry holds the old object
                ns = in_inv.namespace(ep.namespace)
                if _and(tri(p.namespaces, ns.labels, ns.labels_invalid),
                        True if p.pods is None else tri(p.pods, ep.labels, ep.labels_invalid)) is not False:
                    return True
            return False

        gone = {key for key, peers in self._peer_defs.items() if any(map(reads, peers))}
        for key in gone:
            del self._peers[key], self._peer_defs[key]
        self._was_pieces, self._was_ingress, self._was_egress = {}, {}, {}
        if gone:
            def base(k: str) -> str:
                return k.removesuffix("/as-deny")
            for k in [k for k in self._pieces if base(k[0]) in gone]:
                self._was_pieces[k] = self._pieces.pop(k)
            for k4 in [k for k in self._ingress_rules if base(k[0]) in gone]:
                self._was_ingress[k4] = self._ingress_rules.pop(k4)
            for k in [k for k in self._egress if base(k[0]) in gone]:
                self._was_egress[k] = self._egress.pop(k)
        return gone

    # ------------------------------------------------------------ rules

    def _groups(self, key: str, rule: ClusterRule, verdict: Verdict) -> list[tuple[str, Verdict, _Peers, PeerSet]]:
        """(key suffix, verdict, peers, their addresses) pieces of a rule, computed once per
        key: an Accept matches only peers it is sure of, a Deny also those it cannot tell; a
        Pass passes the sure ones and drops the others (fail closed: it might skip a Deny)."""
        hit = self._pieces.get((key, verdict))
        if hit is not None:
            return hit
        assert rule.peers is not None
        p = self._resolve(key.removesuffix("/as-deny"), rule.peers)
        if verdict is Verdict.ACCEPT:
            groups = [("", verdict, _Peers(p.pods, p.nets))]
        elif verdict is Verdict.DROP:
            groups = [("", verdict, _Peers(p.pods + p.maybe_pods, p.nets + p.maybe_nets))]
        else:
            groups = [("", verdict, _Peers(p.pods, p.nets))]
            if p.maybe_pods or p.maybe_nets:
                groups.append(("/unknown-labels", Verdict.DROP, _Peers(p.maybe_pods, p.maybe_nets)))
        was = {(s, v): addrs for s, v, _, addrs in self._was_pieces.pop((key, verdict), ())}
        out = []
        for suffix, v, g in groups:
            old = was.get((suffix, v))
            if old is not None and self._edit is not None:
                addrs = self._edit(old, PeerSet.of(g.nets), g.pods, self._moved)
            else:
                addrs = _same(PeerSet.of([*g.nets, *(ip for e in g.pods for ip in e.ips)]), old)
            out.append((suffix, v, g, addrs))
        self._pieces[(key, verdict)] = out
        return out

    @staticmethod
    def _origin(pol: ClusterPolicy, rule: ClusterRule, d: Direction) -> Origin:
        return Origin(pol.source, "", pol.name, d, rule.index, rule.name, tier=pol.tier, kind=pol.kind,
                      priority=pol.shown_priority)

    def _ingress(self, pol: ClusterPolicy, rule: ClusterRule, verdict: Verdict, ep: Endpoint) -> list[Rule]:
        key = f"{pol.key}/ingress/{rule.index}" + ("/as-deny" if verdict is not rule.verdict else "")
        origin = self._origin(pol, rule, Direction.INGRESS)
        ports = _numeric(rule.ports)
        for p in rule.ports:  # a named port resolves on the destination: the subject pod
            if p.named:
                ports.extend(PortMatch(c.protocol.lower(), c.port, c.port) for c in ep.ports if c.name == p.named)
        if rule.ports and not ports:
            return []  # every port was a name this pod lacks: the rule matches nothing here
        canonical = PortMatch.canonical(ports)
        hit = self._ingress_rules.get((key, canonical))  # most subjects resolve the same ports
        if hit is None:
            if rule.peers is None:
                hit = [Rule(origin, None, canonical, verdict, key=key)]
            else:
                hit = [Rule(origin, addrs, canonical, v, key=key + suffix)
                       for suffix, v, _, addrs in self._groups(key, rule, verdict)]
            hit = _same_rules(hit, self._was_ingress.pop((key, canonical), None))
            self._ingress_rules[(key, canonical)] = hit
        return hit

    def _egress_rules(self, pol: ClusterPolicy, rule: ClusterRule, verdict: Verdict) -> list[Rule]:
        """Egress rules do not depend on the subject pod: computed once per policy rule."""
        key = f"{pol.key}/egress/{rule.index}" + ("/as-deny" if verdict is not rule.verdict else "")
        hit = self._egress.get((key, verdict))
        if hit is not None:
            return hit
        origin = self._origin(pol, rule, Direction.EGRESS)
        out: list[Rule] = []
        numeric = _numeric(rule.ports)
        named = [p.named for p in rule.ports if p.named]
        if rule.peers is None:
            out.append(Rule(origin, None, PortMatch.canonical(numeric), verdict, key=key))
        elif all(p.domains for p in rule.peers):
            pass  # only domain names: their addresses are per endpoint (see _learned)
        else:
            for suffix, v, peers, addrs in self._groups(key, rule, verdict):
                if numeric or not rule.ports:
                    out.append(Rule(origin, addrs, PortMatch.canonical(numeric), v, key=key + suffix))
                # Named ports resolve on each destination pod: one rule per port number.
                buckets: dict[tuple[str, int], list[IPAddress]] = defaultdict(list)
                for e in peers.pods:
                    for c in e.ports:
                        if c.name in named:
                            buckets[(c.protocol.lower(), c.port)].extend(e.ips)
                for (proto, num), ips in sorted(buckets.items()):
                    out.append(Rule(origin, PeerSet.of(ips), (PortMatch(proto, num, num),), v,
                                    key=f"{key}{suffix}/{proto}/{num}"))
        out = _same_rules(out, self._was_egress.pop((key, verdict), None))
        self._egress[(key, verdict)] = out
        return out

    def _direction(self, chosen: list[tuple[ClusterPolicy, bool]], ep: Endpoint, d: Direction) -> tuple[Rule, ...]:
        out: list[Rule] = []
        for pol, sure in chosen:
            for rule in pol.ingress if d is Direction.INGRESS else pol.egress:
                # Selection unknown: only what cannot widen applies (Accept: nothing; Pass: drop).
                if not sure and rule.verdict is Verdict.ACCEPT:
                    continue
                verdict = rule.verdict if sure else Verdict.DROP
                if d is Direction.INGRESS:
                    out.extend(self._ingress(pol, rule, verdict, ep))
                else:
                    out.extend(self._egress_rules(pol, rule, verdict))
                    if verdict is Verdict.ACCEPT and _has_domains(rule):
                        out.append(self._learned(pol, rule, ep))
        return tuple(out)

    def _learned(self, pol: ClusterPolicy, rule: ClusterRule, ep: Endpoint) -> Rule:
        """A domainNames rule's peers for one endpoint: the addresses answered to it. The key
        names the endpoint, so rules sharing a key still share their peers (IR invariant)."""
        key = domain_rule_key(pol, rule)
        return Rule(self._origin(pol, rule, Direction.EGRESS), PeerSet.of(self.learned.addresses(ep.key, key)),
                    PortMatch.canonical(_numeric(rule.ports)), Verdict.ACCEPT, key=learned_rule_key(key, ep.key))

    def domain_rules(self, ep: Endpoint) -> list[DomainRule]:
        """The domainNames Accept rules that apply to `ep`, for the learner: what it may learn
        for this pod, and under which rule key. A rule that applies only maybe (labels that
        did not validate) is left out: an Accept applies only when certain."""
        out = []
        for pol, sure in self._chosen(self.admin, ep) + self._chosen(self.baseline, ep):
            for rule in pol.egress if sure else ():
                if rule.verdict is Verdict.ACCEPT and _has_domains(rule):
                    assert rule.peers is not None
                    patterns = tuple(d for p in rule.peers for d in p.domains)
                    out.append(DomainRule(domain_rule_key(pol, rule), patterns))
        return out

    def _chosen(self, policies: list[ClusterPolicy], ep: Endpoint) -> list[tuple[ClusterPolicy, bool]]:
        """The policies selecting `ep`, in order, each with whether that is certain."""
        out = []
        for pol in policies:
            sel = self.selects(pol, ep)
            if sel is not False:
                out.append((pol, sel is True))
        return out

    def endpoint(self, ep: Endpoint) -> TierRules:
        admin, baseline = self._chosen(self.admin, ep), self._chosen(self.baseline, ep)
        return TierRules(
            self._direction(admin, ep, Direction.INGRESS),
            self._direction(baseline, ep, Direction.INGRESS),
            self._direction(admin, ep, Direction.EGRESS),
            self._direction(baseline, ep, Direction.EGRESS),
        )


def domain_rule_key(pol: ClusterPolicy, rule: ClusterRule) -> str:
    """The key `Learned` files a domainNames rule's addresses under (with the endpoint)."""
    return f"{pol.key}/egress/{rule.index}"


def _same(new: PeerSet, old: PeerSet | None) -> PeerSet:
    # PeerSet.of hands equal sets back as one object while it remembers them: an identity
    # test is enough, and comparing 10,000 addresses per rule is not (a miss is only a
    # new object, never a wrong one).
    return old if old is new else new


def same_rule(a: Rule, b: Rule | None) -> bool:
    """`a` equals `b`, compared cheaply: rules whose peers are different objects count as
    different (see _same)."""
    return b is not None and (a is b or (a.peers is b.peers and a == b))


def _same_rules(new: list[Rule], old: list[Rule] | None) -> list[Rule]:
    """`new` with each rule equal to one of `old` (by key and ports) replaced by that object."""
    if not old:
        return new
    by_key = {(r.key, r.ports): r for r in old}
    out = []
    for r in new:
        was = by_key.get((r.key, r.ports))
        out.append(was if was is not None and same_rule(r, was) else r)
    return old if len(old) == len(out) and all(a is b for a, b in zip(old, out, strict=True)) else out


def _has_domains(rule: ClusterRule) -> bool:
    return rule.peers is not None and any(p.domains for p in rule.peers)


def _numeric(ports: Iterable[ClusterPort]) -> list[PortMatch]:
    return [PortMatch(p.protocol, p.first, p.last) for p in ports if not p.named]
