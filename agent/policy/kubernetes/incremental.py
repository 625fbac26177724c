"""The incremental NetworkPolicy compiler: an event costs what it touches, not what the cluster holds.

`IncrementalCompiler.compile(inv)` returns exactly what `compile_inventory(inv, node)`
returns (the property test tests/unit/test_incremental.py holds it to that), but keeps
the previous inventory and the compiler's memoised results between calls. On each call it
diffs the new inventory against the previous one (admission hands unchanged objects over
as the same objects, so the diff is an identity check per object) and forgets only:
- the resolver entries (pod selector x namespace selector x policy namespace) whose pods a
  changed pod or namespace enters or leaves, and the rule peer sets reading them;
- the rules of changed policies; egress named-port rules whose candidate pods changed
  (selected, covered by an ipBlock, or any pod for a rule without peers);
then recompiles only the local endpoints that changed or whose namespace's policies had
something forgotten. Everything else keeps its object (PeerSet, Rule, EndpointProgram),
so the dataplanes' diffs stay cheap; recomputed objects equal to their predecessors are
swapped back for them.

Kinds it does not understand (ClusterNetworkPolicy, AdminNetworkPolicy, Node, anything
new) make it fall back to a full `compile_inventory`: correct first, fast where it knows
the change. So do large changes (a first sync, a resync after a gap), where starting
afresh is as fast.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.inventory import Endpoint, Inventory, Namespace, Problem
from agent.ir import DirectionProgram, EndpointProgram, Program, Rule
from agent.policy.errors import Invalid
from agent.policy.kubernetes.compile import EntryKey, _Compiler, compile_inventory, entry_holds
from agent.policy.kubernetes.parse import NetworkPolicy, parse_policy

KINDS = ("NetworkPolicy",)  # policy kinds this compiler follows; any other: full compile
# Above this share of changed objects a fresh compile is as cheap as forgetting piecemeal.
FULL_SHARE = 0.2


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


def _policies(inv: Inventory) -> dict[tuple[str, str, str], NetworkPolicy] | None:
    """The admitted NetworkPolicies by key, as compile_inventory reads them; None when the
    inventory holds a kind this compiler does not follow."""
    out = {}
    for key, raw in inv.policies.items():
        if raw.ref.kind not in KINDS:
            return None
        if isinstance(raw.parsed, NetworkPolicy):
            out[key] = raw.parsed
            continue
        issues: list[Invalid] = []
        out[key] = parse_policy(raw, issues)
        inv.problems.extend(Problem(raw.ref, e.field, e.message) for e in issues)
    return out


def _changed(old: Mapping[Any, Any], new: Mapping[Any, Any]) -> list[tuple[Any, Any, Any]]:
    """(key, old value or None, new value or None) for every key whose value differs."""
    out = [(k, old.get(k), v) for k, v in new.items() if old.get(k) is not v and old.get(k) != v]
    out.extend((k, v, None) for k, v in old.items() if k not in new)
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


class IncrementalCompiler:
    """The NetworkPolicy compiler for one node, kept across events (one per pipeline)."""

    def __init__(self, node: str | None, source: str = "file") -> None:
        self.node = node
        self.source = source
        self.stats = Stats()
        self._reset()

    def _reset(self) -> None:
        self._comp: _Compiler | None = None
        self._inv: Inventory | None = None
        self._policies: dict[tuple[str, str, str], NetworkPolicy] = {}
        self._program: Program | None = None

    def _local(self, ep: Endpoint | None) -> bool:
        return ep is not None and (self.node is None or ep.node == self.node)

    def compile(self, inv: Inventory) -> Program:
        """The Program for `inv`, equal to `compile_inventory(inv, node, source)`."""
        policies = _policies(inv)
        if policies is None:
            self._reset()
            self.stats = Stats(full=True, reason="a policy kind only the full compiler reads")
            return compile_inventory(inv, self.node, source=self.source)
        if inv.nodes:
            self._reset()
            self.stats = Stats(full=True, reason="nodes in the inventory")
            return compile_inventory(inv, self.node, source=self.source)
        if self._comp is None or self._inv is None or self._program is None:
            return self._full(inv, policies, "first compile")
        old_inv = self._inv
        pods = _changed(old_inv.endpoints, inv.endpoints)
        pols = _changed(self._policies, policies)
        names = set(old_inv.namespaces) | set(inv.namespaces)
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
        comp = self._comp
        comp.inv = comp.res.inv = inv
        comp.touched = set()
        # 1. Resolver entries a changed pod or namespace enters or leaves.
        for _, o, n in pods:
            comp.res.move(o, n)
        def pod_moves(e: EntryKey) -> bool:
            return any((o is not None and entry_holds(e, o, old_inv)) or (n is not None and entry_holds(e, n, inv))
                       for _, o, n in pods)

        def namespace_moves(e: EntryKey) -> bool:
            sel = e[1]
            return sel is not None and any(
                not ns.labels_invalid and sel.matches(ns.labels) for _, o, v in nss for ns in (o, v))

        stale = [e for e in comp.res.entries() if pod_moves(e) or namespace_moves(e)]
        for e in stale:
            comp.forget_entry(e)
        self.stats.entries = len(stale)
        # 2. Egress named-port rules whose candidates (ipBlock-covered or any pod) changed.
        if pods:
            for cache_key, (ns, blocks, anyone) in list(comp.named_deps.items()):
                if anyone or (blocks is not None and any(
                        ep is not None and any(map(blocks.contains, ep.ips)) for _, o, n in pods for ep in (o, n))):
                    comp.forget_egress(cache_key, ns)
        # 3. Changed policies: their rules are forgotten, their namespaces recompiled.
        for _, o, n in pols:
            for pol in (o, n):
                if pol is not None:
                    comp.forget_policy(pol)
        if pols:
            comp.set_policies(policies.values())
        # 4. Local endpoints: the changed ones and those of namespaces whose rules moved.
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

    def _full(self, inv: Inventory, policies: dict[tuple[str, str, str], NetworkPolicy], why: str) -> Program:
        old = self._program.endpoints if self._program is not None else {}
        comp = _Compiler(inv, list(policies.values()))
        eps = {key: _reuse(comp.endpoint(ep), old.get(key))
               for key, ep in sorted(inv.endpoints.items()) if self._local(ep)}
        self._comp, self._inv, self._policies = comp, inv, policies
        self._program = Program(source=self.source, endpoints=eps)
        self.stats = Stats(full=True, reason=why, endpoints=len(eps))
        return self._program
