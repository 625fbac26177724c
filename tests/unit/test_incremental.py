"""The incremental compiler equals the full compile after every event, on both dataplanes' renderings.

Hypothesis drives random event sequences over a small cluster (pods added, removed,
relabelled, re-addressed, moved between nodes; namespaces relabelled, added, removed;
policies added, changed, removed; invalid objects of every kind among them) through
admission, then compiles each state twice: with one `IncrementalCompiler` kept across the
whole sequence, and afresh with `compile_inventory`, the reference.
"""

from __future__ import annotations

import ipaddress
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.admission import KubernetesAdmission, LastGood, kubernetes_inventory
from agent.dataplane.ebpf import tables
from agent.dataplane.nftables import build_model, render_full
from agent.inventory import Inventory
from agent.ir import PeerSet, Program, Verdict
from agent.policy.kubernetes import compile_inventory, incremental
from agent.policy.kubernetes.incremental import IncrementalCompiler, Touched
from agent.policy.kubernetes.spans import Spans
from agent.sources.kubeobjects import RawObject, ref_of
from tests.kit.builders import ns, pod, policy

NAMESPACES = ("a", "b", "c")
PODS = tuple(f"{n}/p{i}" for n in NAMESPACES for i in range(3))
POLICIES = tuple(f"{n}/np{i}" for n in NAMESPACES[:2] for i in range(3))
BAD_LABELS = {"bad key!": "x"}

good_labels = st.fixed_dictionaries({"app": st.sampled_from(["web", "api", "db"])},
                                    optional={"tier": st.sampled_from(["front", "back"])})
labels = st.one_of(good_labels, good_labels, good_labels, st.just({}), st.just(BAD_LABELS))
ns_labels = st.one_of(st.fixed_dictionaries({"team": st.sampled_from(["red", "blue"])}), st.just({}),
                      st.just(BAD_LABELS))
ips = st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.5", "10.0.0.9", "10.0.1.1", "fd00::1", "fd00::7",
                                "not-an-ip"]), min_size=1, max_size=2, unique=True)
container_ports = st.lists(st.sampled_from([
    {"name": "http", "containerPort": 8080}, {"name": "http", "containerPort": 9090},
    {"name": "dns", "containerPort": 53, "protocol": "UDP"}, {"name": "metrics", "containerPort": 9100},
    {"name": "BAD_NAME", "containerPort": 1},
]), max_size=2, unique_by=lambda p: (p["name"], p.get("protocol", "TCP")))

good_selector = st.one_of(
    st.builds(lambda v: {"matchLabels": {"app": v}}, st.sampled_from(["web", "api", "db"])),
    st.just({}),
    st.builds(lambda op, v: {"matchExpressions": [{"key": "tier", "operator": op, "values": v}]},
              st.sampled_from(["In", "NotIn"]), st.just(["front"])),
    st.just({"matchExpressions": [{"key": "app", "operator": "Exists"}]}),
)
selector = st.one_of(good_selector, st.just({"matchLabels": 0}))  # invalid: never "everything"
good_ns_selector = st.one_of(
    st.just({}),
    st.builds(lambda v: {"matchLabels": {"team": v}}, st.sampled_from(["red", "blue"])),
    st.just({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}),
)
ns_selector = st.one_of(good_ns_selector, st.just({"matchLabels": 0}))
valid_peer = st.one_of(
    st.builds(lambda s: {"podSelector": s}, good_selector),
    st.builds(lambda s: {"namespaceSelector": s}, good_ns_selector),
    st.builds(lambda p, n: {"podSelector": p, "namespaceSelector": n}, good_selector, good_ns_selector),
)
peer = st.one_of(
    valid_peer, valid_peer,
    st.builds(lambda s: {"podSelector": s}, selector),
    st.builds(lambda s: {"namespaceSelector": s}, ns_selector),
    st.builds(lambda p, n: {"podSelector": p, "namespaceSelector": n}, selector, ns_selector),
    st.just({"ipBlock": {"cidr": "10.0.0.0/28", "except": ["10.0.0.4/30"]}}),
    st.just({"ipBlock": {"cidr": "fd00::/124"}}),
    st.just({"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.1.0.0/30"]}}),  # invalid except
    st.just({}),  # invalid peer
)
port = st.sampled_from([
    {"port": 80}, {"port": "http"}, {"protocol": "UDP", "port": "dns"}, {"port": "metrics"},
    {"port": 1000, "endPort": 2000}, {"protocol": "SCTP"}, {"port": "80"},  # "80": an invalid name
])


def rule(peers_key: str) -> st.SearchStrategy[dict[str, Any]]:
    # Mostly peers that select pods (what the incremental index is about); sometimes none.
    with_peers = st.fixed_dictionaries({peers_key: st.lists(peer, min_size=1, max_size=2)},
                                       optional={"ports": st.lists(port, max_size=2)})
    return st.one_of(with_peers, with_peers, with_peers, st.fixed_dictionaries({}, optional={
        peers_key: st.just([]), "ports": st.lists(port, max_size=2)}))


spec = st.fixed_dictionaries(
    {"podSelector": st.one_of(good_selector, selector), "ingress": st.lists(rule("from"), min_size=1, max_size=2),
     "egress": st.lists(rule("to"), max_size=2)},
    optional={"policyTypes": st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"], ["Ingress", "Egress"],
                                              ["Bogus"]])},
)


def pod_event(key: str | st.SearchStrategy[str]) -> st.SearchStrategy[tuple[Any, ...]]:
    keys = key if isinstance(key, st.SearchStrategy) else st.just(key)
    return st.tuples(st.just("pod"), keys, labels, ips, container_ports, st.sampled_from(["n1", "n1", "n2"]))


# Cluster policies (Admin and Baseline tiers, Accept/Deny/Pass, pods/namespaces/networks/nodes
# peers, numeric and named ports, invalid parts), present throughout the event sequences.
CLUSTER = ("c0", "c1", "c2", "anp", "default")  # three ClusterNetworkPolicies, an ANP, the BANP
NODES = ("n1", "n2")
node_selector = st.one_of(st.just({}), st.builds(lambda v: {"matchLabels": {"role": v}},
                                                 st.sampled_from(["worker", "control"])), st.just({"matchLabels": 0}))
cluster_pod_peer = st.builds(lambda n, p: {"namespaceSelector": n, "podSelector": p}, ns_selector, selector)
cnp_peer = st.one_of(st.builds(lambda n: {"namespaces": n}, ns_selector),
                     st.builds(lambda x: {"pods": x}, cluster_pod_peer))
cnp_egress_peer = st.one_of(cnp_peer, cnp_peer, st.builds(lambda x: {"nodes": x}, node_selector),
                            st.just({"networks": ["10.0.0.0/30", "fd00::/126"]}), st.just({"networks": ["bogus"]}))
cnp_protocol = st.sampled_from([{"tcp": {"destinationPort": {"number": 80}}}, {"destinationNamedPort": "http"},
                                {"destinationNamedPort": "dns"},
                                {"udp": {"destinationPort": {"range": {"start": 50, "end": 60}}}}])
anp_port = st.sampled_from([{"portNumber": {"protocol": "TCP", "port": 80}}, {"namedPort": "http"},
                            {"portRange": {"protocol": "UDP", "start": 50, "end": 60}}])


def cluster_rule(actions: list[str], peers_key: str, peer: st.SearchStrategy[Any], ports_key: str,
                 ports: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"name": st.just("r"), "action": st.sampled_from(actions),
                                  peers_key: st.lists(peer, min_size=1, max_size=2)},
                                 optional={ports_key: st.lists(ports, min_size=1, max_size=2)})


subject = st.one_of(st.builds(lambda n: {"namespaces": n}, ns_selector),
                    st.builds(lambda x: {"pods": x}, cluster_pod_peer))


def cluster_body(name: str) -> st.SearchStrategy[dict[str, Any]]:
    if name == "default":  # v1alpha1 BaselineAdminNetworkPolicy (Allow/Deny, no priority)
        api, kind, acts, key, ports = "policy.networking.k8s.io/v1alpha1", "BaselineAdminNetworkPolicy", \
            ["Allow", "Deny"], "ports", anp_port
        spec = st.fixed_dictionaries({"subject": subject})
    elif name == "anp":
        api, kind, acts, key, ports = "policy.networking.k8s.io/v1alpha1", "AdminNetworkPolicy", \
            ["Allow", "Deny", "Pass"], "ports", anp_port
        spec = st.fixed_dictionaries({"subject": subject, "priority": st.sampled_from([5, 20])})
    else:
        api, kind, acts, key, ports = "policy.networking.k8s.io/v1alpha2", "ClusterNetworkPolicy", \
            ["Accept", "Deny", "Pass"], "protocols", cnp_protocol
        spec = st.fixed_dictionaries({"subject": subject, "priority": st.sampled_from([5, 10, 20]),
                                      "tier": st.sampled_from(["Admin", "Admin", "Baseline"])})
    rules = st.fixed_dictionaries({}, optional={
        "ingress": st.lists(cluster_rule(acts, "from", cnp_peer, key, ports), min_size=1, max_size=2),
        "egress": st.lists(cluster_rule(acts, "to", cnp_egress_peer, key, ports), min_size=1, max_size=2)})
    return st.tuples(spec, rules).map(lambda sr: {
        "apiVersion": api, "kind": kind, "metadata": {"name": name}, "spec": {**sr[0], **sr[1]}})


cluster_event = st.sampled_from(CLUSTER).flatmap(lambda n: st.tuples(st.just("cluster"), st.just(n), cluster_body(n)))
node_event = st.tuples(st.just("node"), st.sampled_from(NODES),
                       st.sampled_from([{"role": "worker"}, {"role": "control"}, {}, BAD_LABELS]),
                       st.lists(st.sampled_from(["10.9.0.1", "10.9.0.2", "10.0.0.2", "fd00::7"]), min_size=1,
                                max_size=2, unique=True))

# A populated start: every namespace, pod and node, a few policies and cluster policies.
start_state = st.tuples(
    *(st.tuples(st.just("namespace"), st.just(n), ns_labels) for n in NAMESPACES),
    *(pod_event(k) for k in PODS),
    *(st.tuples(st.just("node"), st.just(n), st.just({"role": "worker"}), st.just([f"10.9.0.{i + 1}"]))
      for i, n in enumerate(NODES)),
).flatmap(lambda base: st.tuples(
    st.lists(st.tuples(st.just("policy"), st.sampled_from(POLICIES), spec), min_size=3, max_size=6),
    st.lists(cluster_event, min_size=1, max_size=3),
).map(lambda pols: [*base, *pols[0], *pols[1]]))
common_event = st.one_of(
    pod_event(st.sampled_from(PODS)),
    st.tuples(st.just("delete"), st.sampled_from(PODS)),
    st.tuples(st.just("namespace"), st.sampled_from(NAMESPACES), ns_labels),
    st.tuples(st.just("delete"), st.sampled_from(NAMESPACES)),
    st.tuples(st.just("policy"), st.sampled_from(POLICIES), spec),
    st.tuples(st.just("delete"), st.sampled_from(POLICIES)),
)
# Rarer: cluster policies change or go (a fresh tier compile), Nodes change (their peers).
rare_event = st.one_of(
    cluster_event,
    st.tuples(st.just("delete"), st.sampled_from(CLUSTER)),
    node_event, node_event,
)
event = st.one_of(common_event, common_event, common_event, common_event, common_event, rare_event)


def body_of(ev: tuple[Any, ...]) -> tuple[str, dict[str, Any] | None]:
    kind, key = ev[0], ev[1]
    if kind == "pod":
        _, _, lab, addrs, ports, node = ev
        body = pod(key, addrs, lab, ports=ports)
        body["spec"]["nodeName"] = node
        return f"Pod {key}", body
    if kind == "namespace":
        body = ns(key)
        body["metadata"]["labels"] = ev[2]
        return f"Namespace {key}", body
    if kind == "policy":
        return f"NetworkPolicy {key}", policy(key, ev[2])
    if kind == "cluster":
        return f"{ev[2]['kind']} {key}", ev[2]
    if kind == "node":
        return f"Node {key}", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": key, "labels": ev[2]},
                               "status": {"addresses": [{"type": "InternalIP", "address": a} for a in ev[3]]}}
    if key in CLUSTER:
        kind = {"anp": "AdminNetworkPolicy", "default": "BaselineAdminNetworkPolicy"}.get(key, "ClusterNetworkPolicy")
        return f"{kind} {key}", None
    what = "Pod" if key in PODS else "Namespace" if key in NAMESPACES else "NetworkPolicy"
    return f"{what} {key}", None


def renderings(program: Program) -> tuple[str, str]:
    return render_full(build_model(program)), tables.render(program, [])


def check(inc: IncrementalCompiler, inv: Inventory, node: str | None, touched: Touched | None = None) -> None:
    got = inc.compile(inv, touched)
    want = compile_inventory(inv, node, source="file")
    assert got == want
    assert list(got.endpoints) == list(want.endpoints)  # same order: renderings iterate it
    assert renderings(got) == renderings(want)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=start_state, events=st.lists(event, min_size=5, max_size=25),
       node=st.sampled_from(["n1", None]))
def test_incremental_equals_full_after_every_event(
        start: list[tuple[Any, ...]], events: list[tuple[Any, ...]], node: str | None) -> None:
    objects: dict[str, RawObject] = {}
    store = LastGood()
    inc = IncrementalCompiler(node, "file")

    def put(ev: tuple[Any, ...]) -> None:
        name, body = body_of(ev)
        if body is None:
            objects.pop(name, None)
        else:  # unchanged objects stay the same objects, as sources deliver them
            objects[name] = RawObject(ref_of(body, "file", "test"), body)

    for ev in start:
        put(ev)
    check(inc, kubernetes_inventory(list(objects.values()), store), node)
    for ev in events:
        put(ev)
        check(inc, kubernetes_inventory(list(objects.values()), store), node)


def test_unchanged_objects_keep_their_identity() -> None:
    """A pod's label change recompiles what it touches; every other endpoint program (and
    every rule of the changed one that did not change) is the very same object."""
    docs = [ns("a", team="red"), ns("b", team="blue"),
            pod("a/web", "10.0.0.1", {"app": "web"}), pod("a/api", "10.0.0.2", {"app": "api"}),
            pod("b/cli", "10.0.1.1", {"app": "cli"}), pod("b/db", "10.0.1.2", {"app": "db"}),
            policy("a/allow-cli", {"podSelector": {"matchLabels": {"app": "web"}},
                                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}},
                                                          "podSelector": {"matchLabels": {"app": "cli"}}}]},
                                               {"from": [{"podSelector": {}}]}]}),
            policy("a/api", {"podSelector": {"matchLabels": {"app": "api"}},
                             "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]})]
    objects = {i: RawObject(ref_of(b, "file", "t"), b) for i, b in enumerate(docs)}
    store = LastGood()
    inc = IncrementalCompiler("n1", "file")
    before = inc.compile(kubernetes_inventory(list(objects.values()), store))
    relabelled = pod("b/db", "10.0.1.2", {"app": "cli"})  # now a peer of a/allow-cli's first rule
    objects[5] = RawObject(ref_of(relabelled, "file", "t"), relabelled)
    after = inc.compile(kubernetes_inventory(list(objects.values()), store))
    assert not inc.stats.full and inc.stats.pods == 1
    assert after.endpoints["a/api"] is before.endpoints["a/api"]
    web_before, web_after = before.endpoints["a/web"].ingress.rules, after.endpoints["a/web"].ingress.rules
    assert web_after[0] != web_before[0] and web_after[1] is web_before[1]
    assert after == compile_inventory(kubernetes_inventory(list(objects.values()), LastGood()), "n1")


def test_cluster_policies_keep_the_incremental_path() -> None:
    """With cluster policies present, a NetworkPolicy-only event reuses every cluster rule
    object; a pod event edits the tiers and leaves the endpoints it does not reach alone."""
    anp = {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
           "metadata": {"name": "x"},
           "spec": {"priority": 5, "subject": {"namespaces": {"matchLabels": {"team": "red"}}},
                    "ingress": [{"name": "no-db", "action": "Deny",
                                 "from": [{"pods": {"namespaceSelector": {},
                                                    "podSelector": {"matchLabels": {"app": "db"}}}}]}]}}
    docs = [ns("a", team="red"), ns("b", team="blue"), pod("a/web", "10.0.0.1", {"app": "web"}),
            pod("b/api", "10.0.1.1", {"app": "api"}), pod("b/db", "10.0.1.2", {"app": "db"}), anp,
            policy("b/p", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})]
    objects = {i: RawObject(ref_of(b, "file", "t"), b) for i, b in enumerate(docs)}
    store = LastGood()
    inc = IncrementalCompiler(None, "file")

    def compile_now() -> Program:
        inv = kubernetes_inventory(list(objects.values()), store)
        got = inc.compile(inv)
        assert got == compile_inventory(inv, None)
        return got

    first = compile_now()
    deny = first.endpoints["a/web"].ingress.rules[0]
    assert deny.verdict is Verdict.DROP and deny.peers == PeerSet.of([ipaddress.ip_address("10.0.1.2")])
    changed = policy("b/p", {"podSelector": {},
                             "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "x"}}}]}]})
    objects[6] = RawObject(ref_of(changed, "file", "t"), changed)
    second = compile_now()
    assert not inc.stats.full and inc.stats.tiers == "kept" and inc.stats.tier_endpoints == 0
    assert second.endpoints["a/web"] is first.endpoints["a/web"]
    relabelled = pod("b/api", "10.0.1.1", {"app": "db"})  # now a peer of the Deny
    objects[3] = RawObject(ref_of(relabelled, "file", "t"), relabelled)
    third = compile_now()
    assert not inc.stats.full and inc.stats.tiers == "edited" and inc.stats.tier_rules == 1
    assert third.endpoints["a/web"].ingress.rules[0].peers == PeerSet.of(
        [ipaddress.ip_address("10.0.1.1"), ipaddress.ip_address("10.0.1.2")])
    assert third.endpoints["b/db"] is second.endpoints["b/db"]  # neither part changed


addresses = st.sampled_from([ipaddress.ip_address(a) for a in (
    *(f"10.0.0.{i}" for i in range(12)), "10.0.1.0", "10.0.0.255", "fd00::", "fd00::1", "fd00::2", "fd00::3")])


@settings(max_examples=100, deadline=None)
@given(start=st.sets(addresses), static=st.sampled_from([(), ("10.0.0.4/30",), ("10.0.0.0/29", "fd00::2/127")]),
       edits=st.lists(st.tuples(st.booleans(), addresses), max_size=20))
def test_spans_edited_by_address_equal_a_fresh_collapse(
        start: set[Any], static: tuple[str, ...], edits: list[tuple[bool, Any]]) -> None:
    blocks = [ipaddress.ip_network(n) for n in static]
    members = set(start)
    spans = Spans(PeerSet.of([*members, *blocks]), PeerSet.of(blocks))
    for add, ip in edits:
        if add:
            members.add(ip)
            spans.add(ip)
        else:
            members.discard(ip)
            if not spans.static_holds(ip):
                spans.remove(ip)
        assert spans.peer_set() == PeerSet.of([*members, *blocks])


def test_a_failed_compile_starts_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception half-way through an incremental compile (a bug) must not leave
    half-edited state behind: the next compile is a full one, and right."""
    docs = [ns("a"), pod("a/web", "10.0.0.1", {"app": "web"}), pod("a/api", "10.0.0.2", {"app": "api"}),
            policy("a/p", {"podSelector": {},
                           "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}]}]})]
    objects = {i: RawObject(ref_of(b, "file", "t"), b) for i, b in enumerate(docs)}
    store = LastGood()
    inc = IncrementalCompiler("n1", "file")
    inc.compile(kubernetes_inventory(list(objects.values()), store))
    moved = pod("a/web", "10.0.0.1", {"app": "api"})
    objects[1] = RawObject(ref_of(moved, "file", "t"), moved)
    inv = kubernetes_inventory(list(objects.values()), store)

    def boom(*args: Any) -> None:
        raise RuntimeError("bug")

    with monkeypatch.context() as m:
        m.setattr(incremental, "FULL_SHARE", 1.0)  # a world this small: one change is "many"
        m.setattr(IncrementalCompiler, "_edit_peer_sets", boom)
        with pytest.raises(RuntimeError):
            inc.compile(inv)
    assert inc.compile(inv) == compile_inventory(inv, "n1")
    assert inc.stats.full


def _same_inventory(got: Inventory, want: Inventory) -> None:
    assert (got.endpoints, got.namespaces, got.policies, got.nodes) == (
        want.endpoints, want.namespaces, want.policies, want.nodes)
    assert sorted(map(str, got.problems)) == sorted(map(str, want.problems))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=start_state, events=st.lists(event, min_size=5, max_size=25),
       node=st.sampled_from(["n1", None]))
def test_admission_delta_equals_full_admission(
        start: list[tuple[Any, ...]], events: list[tuple[Any, ...]], node: str | None) -> None:
    """KubernetesAdmission, handed only the keys that changed (as the sources hand them),
    admits what kubernetes_inventory admits from every object, keeps unchanged entries as
    the same objects, and saves the same state file; the compiler fed by it equals a full
    compile. Each step is also restarted from the state file it saved (a new process)."""
    with tempfile.TemporaryDirectory() as tmp:
        state, reference = Path(tmp) / "delta.json", Path(tmp) / "full.json"
        objects: dict[tuple[str, str, str], RawObject] = {}
        delta = KubernetesAdmission(LastGood(state))
        full = LastGood(reference)
        inc = IncrementalCompiler(node, "file")
        changed: set[tuple[str, str, str]] | None = None  # the first delivery: everything
        previous: Inventory | None = None

        def put(ev: tuple[Any, ...]) -> None:
            name, body = body_of(ev)
            kind, _, rest = name.partition(" ")
            key = (kind, *rest.split("/")) if "/" in rest else (kind, "", rest)
            if body is None:
                objects.pop(key, None)  # type: ignore[arg-type]
            else:
                objects[key] = RawObject(ref_of(body, "file", "test"), body)  # type: ignore[index]
            if changed is not None:
                changed.add(key)  # type: ignore[arg-type]

        for ev in start:
            put(ev)
        for ev in [None, *events]:
            if ev is not None:
                put(ev)
            got = delta.update(objects, changed, [])
            want = kubernetes_inventory(list(objects.values()), full)
            _same_inventory(got, want)
            assert json.loads(state.read_text()) == json.loads(reference.read_text())
            check(inc, got, node, delta.touched)
            if previous is not None and changed is not None:  # what did not change is the very object it was
                for k, ep in got.endpoints.items():
                    if ("Pod", ep.namespace, ep.name) not in changed and k in previous.endpoints:
                        assert previous.endpoints[k] is ep, k
                for k, raw in got.policies.items():
                    if k not in changed and k in previous.policies:
                        assert previous.policies[k] is raw, k
            restarted = kubernetes_inventory(list(objects.values()), LastGood(state, readonly=True))
            _same_inventory(restarted, want)
            previous, changed = got, set()
