"""The incremental NetworkPolicy compiler: an event costs what it touches, not what the cluster holds.

`IncrementalCompiler.compile(inv)` returns exactly what `compile_inventory(inv, node)`
returns (the property test tests/unit/test_incremental.py holds it to that), but keeps
the previous inventory and the compiler's memoised results between calls. On each call it
diffs the new inventory against the previous one (admission hands unchanged objects over
as the same objects, so the diff is mostly an identity check per object), then:
- edits in place the resolver entries (pod selector x namespace selector x policy
  namespace -> pods) that a changed pod or namespace enters or leaves;
- edits the peer sets of the rules reading those entries by the addresses that moved
  (`Spans`: an address is in a rule's peer set when an ipBlock of the rule covers it or a
  pod holding it is in one of the rule's entries), without re-collapsing the set;
- forgets the rules of changed policies, and egress named-port rules whose candidate
  pods changed (selected, covered by an ipBlock, or any pod for a rule without peers);
- recompiles only the local endpoints that changed or whose namespace's policies had a
  rule edited or forgotten.
Everything else keeps its object (PeerSet, Rule, EndpointProgram), so the dataplanes'
diffs stay cheap; recomputed objects equal to their predecessors are swapped back for them.

Cluster policies (ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy)
keep the NetworkPolicy part incremental; their ADMIN and BASELINE rules are merged around
it as `_with_tiers` does, by one `ClusterCompiler` kept while the cluster policies stay the
same: a NetworkPolicy-only event reuses every endpoint's cluster rules; a pod, namespace
or Node change makes it forget only the peer sets that change can alter (`update`), edited
by the addresses that moved when only pods changed; recomputed rules equal to their
predecessors are the same objects, so only endpoints whose NetworkPolicy part or cluster
rules changed are merged again. A changed cluster policy makes a fresh ClusterCompiler
(it still hands back equal rules as their old objects).
Kinds it does not know fall back to a full `compile_inventory`: correct first, fast where
it knows the change. So do large changes (a first sync, a resync after a gap), where starting
afresh is as fast, and one compile every `FULL_EVERY` seconds, a bound on how long any
mistake of the incremental path could last. A full compile still hands unchanged
endpoint programs back as their previous objects.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.inventory import Endpoint, Inventory, IPAddress, Namespace, Problem
from agent.ir import DirectionProgram, EndpointProgram, PeerSet, Program, Rule
from agent.policy.cluster import KINDS as CLUSTER_KINDS
from agent.policy.cluster import ClusterCompiler, ClusterPolicy, TierRules, parse_cluster_policy
from agent.policy.cluster.compile import same_rule
from agent.policy.errors import Invalid
from agent.policy.kubernetes.compile import EntryKey, _Compiler, compile_inventory, entry_holds, with_tier_rules
from agent.policy.kubernetes.parse import NetworkPolicy, parse_policy
from agent.policy.kubernetes.spans import Spans
from agent.policy.selectors import Selector

KINDS = ("NetworkPolicy",)  # policy kinds this compiler follows (and CLUSTER_KINDS); any other: full compile
# A full compile this often (seconds) all the same: whatever the incremental path might ever
# get wrong is corrected within this bound (~1 s of CPU at 10k pods, every 10 minutes).
FULL_EVERY = 600.0
# Above this share of changed objects a fresh compile is as cheap as forgetting piecemeal.
FULL_SHARE = 0.2


@dataclass(frozen=True)
class Touched:
    """The Inventory keys that may differ from the previous call's inventory (admission
    knows them: agent.admission.KubernetesAdmission.touched), so that the diff looks at
    those only instead of comparing every entry. Any key not named must be unchanged."""

    endpoints: frozenset[str] = frozenset()
    namespaces: frozenset[str] = frozenset()
    policies: frozenset[tuple[str, str, str]] = frozenset()
    nodes: frozenset[str] = frozenset()


@dataclass
class Stats:
    """What the last compile did, for the bench and for tests (never for decisions)."""

    full: bool = False
    reason: str = ""
    pods: int = 0  # changed objects seen
    namespaces: int = 0
    policies: int = 0
    entries: int = 0  # resolver entries forgotten
    endpoints: int = 0  # local endpoint programs recompiled
    tiers: str = ""  # cluster tiers: "" (none), "fresh" (recomputed), "kept" or "edited"
    tier_rules: int = 0  # cluster rules whose peers were forgotten
    tier_endpoints: int = 0  # local endpoints whose cluster rules were recomputed


def _policies(inv: Inventory) -> tuple[dict[Any, NetworkPolicy], dict[Any, ClusterPolicy]] | None:
    """The admitted NetworkPolicies and cluster policies by key, as compile_inventory reads
    them; None when the inventory holds a kind this compiler does not follow."""
    out: dict[Any, NetworkPolicy] = {}
    cluster: dict[Any, ClusterPolicy] = {}
    for key, raw in inv.policies.items():
        if isinstance(raw.parsed, ClusterPolicy):
            cluster[key] = raw.parsed
            continue
        if isinstance(raw.parsed, NetworkPolicy):
            out[key] = raw.parsed
            continue
        if raw.ref.kind not in KINDS and raw.ref.kind not in CLUSTER_KINDS:
            return None
        issues: list[Invalid] = []
        if raw.ref.kind in CLUSTER_KINDS:
            cluster[key] = parse_cluster_policy(raw, issues)
        else:
            out[key] = parse_policy(raw, issues)
        inv.problems.extend(Problem(raw.ref, e.field, e.message) for e in issues)
    return out, cluster


def _changed(old: Mapping[Any, Any], new: Mapping[Any, Any]) -> list[tuple[Any, Any, Any]]:
    """(key, old value or None, new value or None) for every key whose value differs."""
    out = [(k, old.get(k), v) for k, v in new.items() if old.get(k) is not v and old.get(k) != v]
    out.extend((k, v, None) for k, v in old.items() if k not in new)
    return out


def _changed_keys(old: Mapping[Any, Any], new: Mapping[Any, Any], keys: Iterable[Any]) -> list[tuple[Any, Any, Any]]:
    """`_changed` looking at `keys` only (the others are known to be unchanged)."""
    out = []
    for k in keys:
        o, v = old.get(k), new.get(k)
        if o is not v and o != v:
            out.append((k, o, v))
    return out


def _reuse_rules(rules: tuple[Rule, ...], old: Iterable[Rule]) -> tuple[Rule, ...]:
    """`rules` with each rule equal to one of `old` replaced by that object."""
    by_key: dict[tuple[str, Any], Rule] = {(r.key, r.ports): r for r in old}
    out = []
    for r in rules:
        was = by_key.get((r.key, r.ports))
        out.append(was if was is not None and was == r else r)
    return tuple(out)


def _reuse(new: EndpointProgram, old: EndpointProgram | None) -> EndpointProgram:
    """`new`, or `old` when equal; else `new` built from old's unchanged parts."""
    if old is None:
        return new
    if new == old:
        return old
    dirs = []
    for d_new, d_old in ((new.ingress, old.ingress), (new.egress, old.egress)):
        if d_new == d_old:
            dirs.append(d_old)
        else:
            dirs.append(DirectionProgram(d_new.isolated, _reuse_rules(d_new.rules, d_old.rules), d_new.isolated_by))
    return EndpointProgram(new.key, old.ips if old.ips == new.ips else new.ips, dirs[0], dirs[1], new.interface)


def _edit_pieces(old: PeerSet, static: PeerSet, pods: list[Endpoint], moved: set[IPAddress]) -> PeerSet:
    """A cluster rule's addresses after pods changed: an address that may have moved is in
    it when a network (static) covers it or one of the rule's pods now holds it."""
    spans = Spans(old, static)
    for ip in moved:
        if spans.static_holds(ip) or any(ip in e.ips for e in pods):
            spans.add(ip)
        else:
            spans.remove(ip)
    return spans.peer_set() if spans.dirty else old


def _same_tiers(a: TierRules, b: TierRules) -> bool:
    pairs = ((a.ingress_admin, b.ingress_admin), (a.ingress_baseline, b.ingress_baseline),
             (a.egress_admin, b.egress_admin), (a.egress_baseline, b.egress_baseline))
    return all(len(x) == len(y) and all(same_rule(r, w) for r, w in zip(x, y, strict=True)) for x, y in pairs)


class IncrementalCompiler:
    """The NetworkPolicy compiler for one node, kept across events (one per pipeline)."""

    def __init__(self, node: str | None, source: str = "file", full_every: float = FULL_EVERY) -> None:
        self.node = node
        self.source = source
        self.full_every = full_every
        self.stats = Stats()
        self._reset()

    def _reset(self) -> None:
        self._comp: _Compiler | None = None
        self._inv: Inventory | None = None
        self._policies: dict[tuple[str, str, str], NetworkPolicy] = {}
        self._program: Program | None = None
        self._full_at = 0.0  # time.monotonic() of the last full compile
        self._by_ip: dict[IPAddress, tuple[str, ...]] = {}  # address -> the pods holding it (keys)
        self._spans: dict[str, Spans] = {}  # rule key -> its peer set, editable (made on first edit)
        self._diff: tuple[list[tuple[Any, Any]], list[tuple[str, Namespace, Namespace]]] | None = None
        # The cluster tiers: the compiler kept while the cluster policies stay the same (it
        # holds their objects, so ids it keys on stay valid), each local endpoint's rules,
        # and the NetworkPolicy program and merged program they were last merged into.
        self._ccomp: ClusterCompiler | None = None
        self._cluster: dict[Any, ClusterPolicy] = {}
        self._tier_rules: dict[str, TierRules] = {}
        self._np_merged: Program | None = None
        self._merged: Program | None = None

    def _local(self, ep: Endpoint | None) -> bool:
        return ep is not None and (self.node is None or ep.node == self.node)

    def compile(self, inv: Inventory, touched: Touched | None = None) -> Program:
        """The Program for `inv`, equal to `compile_inventory(inv, node, source)`.

        `touched`, when given, names every key in which `inv` may differ from the inventory
        of the previous call (None: compare everything)."""
        try:
            return self._compile(inv, touched)
        except BaseException:
            self._reset()  # state half-edited: the next call starts afresh
            raise

    def _compile(self, inv: Inventory, touched: Touched | None) -> Program:
        read = _policies(inv)
        if read is None:
            self._reset()
            self.stats = Stats(full=True, reason="a policy kind only the full compiler reads")
            return compile_inventory(inv, self.node, source=self.source)
        policies, cluster = read
        old_inv = self._inv
        self._diff = None
        np_prog = self._np(inv, policies, touched)
        return self._tiers(inv, old_inv, cluster, np_prog)

    def _np(self, inv: Inventory, policies: dict[Any, NetworkPolicy], touched: Touched | None) -> Program:
        """The NetworkPolicy part of the program (no cluster tiers), edited in place."""
        if self._comp is None or self._inv is None or self._program is None:
            return self._full(inv, policies, "first compile")
        if time.monotonic() - self._full_at >= self.full_every:
            return self._full(inv, policies, "periodic")
        old_inv = self._inv
        if touched is None:
            pods = _changed(old_inv.endpoints, inv.endpoints)
            pols = _changed(self._policies, policies)
            names = set(old_inv.namespaces) | set(inv.namespaces)
        else:  # only what admission says it touched
            pods = _changed_keys(old_inv.endpoints, inv.endpoints, touched.endpoints)
            pols = _changed_keys(self._policies, policies, touched.policies)
            names = set(touched.namespaces)
        names.update(ep.namespace for _, o, n in pods for ep in (o, n) if ep is not None)
        nss: list[tuple[str, Namespace, Namespace]] = []
        for n in names:
            o, v = old_inv.namespace(n), inv.namespace(n)
            if o is not v and o != v:
                nss.append((n, o, v))
        total = len(inv.endpoints) + len(inv.namespaces) + len(policies)
        if len(pods) + len(pols) + len(nss) > FULL_SHARE * max(total, 1):
            return self._full(inv, policies, "many changes")
        self.stats = Stats(pods=len(pods), namespaces=len(nss), policies=len(pols))
        self._diff = ([(o, n) for _, o, n in pods], nss)
        comp = self._comp
        comp.inv = comp.res.inv = inv
        comp.touched = set()
        # 1. Resolver entries a changed pod or namespace enters or leaves, edited in place.
        for _, o, n in pods:
            comp.res.move(o, n)
            self._index_ips(o, n)
        moved = self._move_pods(pods, inv)
        self._move_namespaces(nss, moved)
        self.stats.entries = len(moved)
        # 2. The peer sets reading those entries, edited by the addresses that moved.
        self._edit_peer_sets(moved)
        # 3. Egress named-port rules whose candidates (ipBlock-covered or any pod) changed.
        if pods:
            for cache_key, (ns, blocks, anyone) in list(comp.named_deps.items()):
                if anyone or (blocks is not None and any(
                        ep is not None and any(map(blocks.contains, ep.ips)) for _, o, n in pods for ep in (o, n))):
                    comp.forget_egress(cache_key, ns)
        # 4. Changed policies: their rules are forgotten, their namespaces recompiled.
        for _, o, n in pols:
            for pol in (o, n):
                if pol is not None:
                    comp.forget_policy(pol)
        if pols:
            comp.set_policies(policies.values())
            for key in [k for k in self._spans if comp.peers(k) is None]:
                del self._spans[key]  # rules gone
        # 5. Local endpoints: the changed ones and those of namespaces whose rules moved.
        old_eps = self._program.endpoints
        eps = dict(old_eps)
        redo: dict[str, Endpoint] = {}
        for key, o, n in pods:
            if self._local(n):
                redo[key] = n
            elif self._local(o):
                eps.pop(key, None)
        for ns in comp.touched:
            for ep in comp.res.by_namespace.get(ns, {}).values():
                if self._local(ep):
                    redo[ep.key] = ep
        for key, ep in redo.items():
            eps[key] = _reuse(comp.endpoint(ep), old_eps.get(key))
        self.stats.endpoints = len(redo)
        if eps.keys() != old_eps.keys() or any(eps[k] is not old_eps[k] for k in redo):
            self._program = Program(source=self.source, endpoints=dict(sorted(eps.items())))
        self._inv, self._policies = inv, policies
        return self._program

    # ------------------------------------------------------------ cluster tiers

    def _tiers(self, inv: Inventory, old_inv: Inventory | None, cluster: dict[Any, ClusterPolicy],
               np_prog: Program) -> Program:
        """`np_prog` with each endpoint's cluster rules around its own (as `_with_tiers`),
        recomputing only the cluster rules an event can change: none after a NetworkPolicy
        only event; after pod, namespace or Node changes, the peers of the cluster rules
        that read them, and the rules of the endpoints that changed or read those peers."""
        if not cluster:
            self._ccomp, self._cluster, self._tier_rules = None, {}, {}
            self._np_merged = self._merged = np_prog
            return np_prog
        diff = self._diff
        if (self._ccomp is None or diff is None or old_inv is None or self._merged is None
                or _changed(self._cluster, cluster)):
            fresh = ClusterCompiler(inv, list(cluster.values()))
            if self._ccomp is not None:
                fresh.inherit(self._ccomp)  # unchanged rules keep their objects
            self._ccomp, self._cluster = fresh, cluster
            redo: set[str] | None = None  # every local endpoint
            self.stats.tiers = "fresh"
        else:
            pods, nss = diff
            gone = self._ccomp.update(inv, pods, nss, inv.nodes != old_inv.nodes, edit=_edit_pieces)
            self.stats.tiers, self.stats.tier_rules = ("edited" if pods or nss or gone else "kept"), len(gone)
            redo = {n.key for _, n in pods if self._local(n)}
            for name, _, _ in nss:  # subject selection reads namespace labels
                redo.update(k for k, ep in inv.endpoints.items() if ep.namespace == name and self._local(ep))
            readers = self._ccomp.holding(gone)
            if readers:  # the subjects of the policies whose peers were forgotten
                redo.update(k for k in np_prog.endpoints if k not in redo and any(
                    self._ccomp.selects(pol, inv.endpoints[k]) is not False for pol in readers))
        comp = self._ccomp
        old_np = self._np_merged.endpoints if self._np_merged is not None else {}
        old = self._merged.endpoints if self._merged is not None else {}
        eps: dict[str, EndpointProgram] = {}
        tier_rules: dict[str, TierRules] = {}
        done = 0
        for key, np_ep in np_prog.endpoints.items():
            was = self._tier_rules.get(key)
            t = was
            if t is None or redo is None or key in redo:
                done += 1
                t = comp.endpoint(inv.endpoints[key])
                if was is not None and _same_tiers(t, was):
                    t = was
            assert t is not None
            tier_rules[key] = t
            prev = old.get(key)
            if prev is not None and t is was and old_np.get(key) is np_ep:
                eps[key] = prev
            else:  # changed (both parts keep their objects where equal): no deep comparison
                eps[key] = with_tier_rules(np_ep, t)
        self.stats.tier_endpoints = done
        self._tier_rules, self._np_merged = tier_rules, np_prog
        if self._merged is None or eps.keys() != old.keys() or any(eps[k] is not old[k] for k in eps):
            self._merged = Program(source=self.source, endpoints=eps)
        return self._merged

    # ------------------------------------------------------------ editing peer sets

    def _index_ips(self, old: Endpoint | None, new: Endpoint | None) -> None:
        if old is not None:
            for ip in old.ips:
                rest = tuple(k for k in self._by_ip.get(ip, ()) if k != old.key)
                if rest:
                    self._by_ip[ip] = rest
                else:
                    self._by_ip.pop(ip, None)
        if new is not None:
            for ip in new.ips:
                self._by_ip[ip] = (*self._by_ip.get(ip, ()), new.key)

    def _move_pods(self, pods: list[tuple[Any, Any, Any]], inv: Inventory) -> dict[EntryKey, set[IPAddress]]:
        """Each changed pod leaves the entries that held it and joins those that now hold
        it; returns entry -> addresses that may have come or gone."""
        moved: dict[EntryKey, set[IPAddress]] = defaultdict(set)
        keyed = [(o.key if o is not None else "", o, n.key if n is not None else "", n) for _, o, n in pods]
        for e, members in self._comp_entries().items():
            for okey, o, nkey, n in keyed:
                if o is not None and members.pop(okey, None) is not None:
                    moved[e].update(o.ips)
                if n is not None and entry_holds(e, n, inv):
                    members[nkey] = n
                    moved[e].update(n.ips)
        return moved

    def _move_namespaces(self, nss: list[tuple[str, Namespace, Namespace]],
                         moved: dict[EntryKey, set[IPAddress]]) -> None:
        """A namespace entering or leaving a namespaceSelector brings or takes its pods."""
        assert self._comp is not None
        res = self._comp.res
        for e, members in res.entries().items():
            psel, sel = e[0] or Selector(), e[1]
            if sel is None:
                continue
            for name, o, v in nss:
                was = not o.labels_invalid and sel.matches(o.labels)
                now = not v.labels_invalid and sel.matches(v.labels)
                if was and not now:
                    for key in [k for k, ep in members.items() if ep.namespace == name]:
                        moved[e].update(members.pop(key).ips)
                elif now and not was:
                    for key, ep in res.by_namespace.get(name, {}).items():
                        if not ep.labels_invalid and psel.matches(ep.labels):
                            members[key] = ep
                            moved[e].update(ep.ips)

    def _edit_peer_sets(self, moved: dict[EntryKey, set[IPAddress]]) -> None:
        """Each address that moved in an entry is in a rule's peer set exactly when an ipBlock
        of the rule covers it or a pod holding it is in one of the rule's entries."""
        comp = self._comp
        assert comp is not None
        entries = comp.res.entries()
        todo: dict[str, set[IPAddress]] = defaultdict(set)
        for e, addrs in moved.items():
            for key in comp.entry_rules.get(e, ()):
                todo[key] |= addrs
                owner = comp.rule_owner.get(key)
                if owner is not None and owner[0] in comp.named_deps:  # named ports read these pods
                    comp.forget_egress(*owner)
        for key, addrs in todo.items():
            current, rule = comp.peers(key), comp.rule_defs.get(key)
            if current is None or rule is None:
                continue
            spans = self._spans.get(key)
            if spans is None or spans.peer_set_was is not current:
                static = PeerSet.of([n for p in rule.peers or () if p.ip_block is not None for n in p.ip_block.nets()])
                spans = self._spans[key] = Spans(current, static)
            readers = [entries[e] for e in comp.rule_entries.get(key, ()) if e in entries]
            for ip in addrs:
                if spans.static_holds(ip) or any(
                        holder in members for holder in self._by_ip.get(ip, {}) for members in readers):
                    spans.add(ip)
                else:
                    spans.remove(ip)
            if spans.dirty:
                comp.set_peers(key, spans.peer_set())

    def _comp_entries(self) -> dict[EntryKey, dict[str, Endpoint]]:
        assert self._comp is not None
        return self._comp.res.entries()

    def _full(self, inv: Inventory, policies: dict[tuple[str, str, str], NetworkPolicy], why: str) -> Program:
        old = self._program.endpoints if self._program is not None else {}
        comp = _Compiler(inv, list(policies.values()))
        eps = {key: _reuse(comp.endpoint(ep), old.get(key))
               for key, ep in sorted(inv.endpoints.items()) if self._local(ep)}
        self._comp, self._inv, self._policies = comp, inv, policies
        self._by_ip = {}
        for key, ep in inv.endpoints.items():
            for ip in ep.ips:
                self._by_ip[ip] = (*self._by_ip.get(ip, ()), key)
        self._spans = {}
        self._full_at = time.monotonic()
        self._program = Program(source=self.source, endpoints=eps)
        self.stats = Stats(full=True, reason=why, endpoints=len(eps))
        return self._program
