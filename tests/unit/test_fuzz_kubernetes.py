"""Fuzz (hypothesis): generated NetworkPolicies, valid and invalid, through admission and
semantics. No crash; every invalid object reported; no verdict wider than the same
input without the invalid objects; an invalid edit keeps the last good version."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.admission import LastGood, kubernetes_inventory
from agent.ir import Verdict
from agent.policy.evaluate import evaluate, index_by_ip
from agent.policy.kubernetes import compile_inventory
from agent.sources.kubeobjects import RawObject, ref_of
from tests.helpers import ns, pod, policy

CLUSTER = [
    ns("a", team="red"), ns("b", team="blue"),
    pod("a/x", ["10.1.0.1", "fd00::1"], {"app": "x", "tier": "web"}, ports=[{"name": "http", "containerPort": 80}]),
    pod("a/y", "10.1.0.2", {"app": "y"}, ports=[{"name": "http", "containerPort": 8080}]),
    pod("b/z", "10.1.0.3", {"app": "z", "tier": "web"}),
]
IPS = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "192.0.2.9"]
PORTS = [(80, "tcp"), (8080, "tcp"), (53, "udp"), (81, "tcp")]

labels = st.dictionaries(st.sampled_from(["app", "tier", "team"]), st.sampled_from(["x", "y", "z", "web", "red"]),
                         max_size=2)
selector = st.one_of(
    st.just({}),
    st.builds(lambda m: {"matchLabels": m}, labels),
    st.builds(lambda k, op, v: {"matchExpressions": [{"key": k, "operator": op, "values": v}]},
              st.sampled_from(["app", "tier"]), st.sampled_from(["In", "NotIn"]),
              st.lists(st.sampled_from(["x", "y", "web"]), min_size=1, max_size=2)),
    st.builds(lambda k, op: {"matchExpressions": [{"key": k, "operator": op}]},
              st.sampled_from(["app", "tier"]), st.sampled_from(["Exists", "DoesNotExist"])),
)
peer = st.one_of(
    st.builds(lambda s: {"podSelector": s}, selector),
    st.builds(lambda s: {"namespaceSelector": s}, selector),
    st.builds(lambda s, t: {"podSelector": s, "namespaceSelector": t}, selector, selector),
    st.builds(lambda c: {"ipBlock": {"cidr": c}}, st.sampled_from(["10.1.0.0/30", "0.0.0.0/0", "fd00::/64"])),
    st.just({"ipBlock": {"cidr": "10.1.0.0/24", "except": ["10.1.0.2/32"]}}),
)
port = st.one_of(
    st.builds(lambda p, proto: {"port": p, "protocol": proto}, st.sampled_from([80, 53, 8080, "http"]),
              st.sampled_from(["TCP", "UDP"])),
    st.just({"port": 1, "endPort": 100}),
    st.just({"protocol": "UDP"}),
)
rule_in = st.builds(lambda f, p: {k: v for k, v in (("from", f), ("ports", p)) if v is not None},
                    st.one_of(st.none(), st.lists(peer, max_size=2)), st.one_of(st.none(), st.lists(port, max_size=2)))
rule_out = st.builds(lambda f, p: {k: v for k, v in (("to", f), ("ports", p)) if v is not None},
                     st.one_of(st.none(), st.lists(peer, max_size=2)), st.one_of(st.none(), st.lists(port, max_size=2)))
spec = st.builds(
    lambda s, i, e, t: {k: v for k, v in (("podSelector", s), ("ingress", i), ("egress", e), ("policyTypes", t))
                        if v is not None},
    selector, st.one_of(st.none(), st.lists(rule_in, max_size=2)), st.one_of(st.none(), st.lists(rule_out, max_size=2)),
    st.one_of(st.none(), st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]])),
)

# Each mutation makes a policy certainly invalid (and what it would mean if misread).
MUTATIONS = [
    lambda s: s.setdefault("ingress", []).append({"from": [{"ipBlock": {"cidr": "10.1.0.0/33"}}]}),
    lambda s: s.setdefault("ingress", []).append({"ports": [{"protocol": "ICMP"}]}),
    lambda s: s.setdefault("egress", []).append({"ports": [{"port": 70000}]}),
    lambda s: s.setdefault("egress", []).append({"ports": [{"port": 90, "endPort": 80}]}),
    lambda s: s.update(podSelector={"matchExpressions": [{"key": "app", "operator": "Maybe"}]}),
    lambda s: s.update(policyTypes=["Inward"]),
    lambda s: s.update(ingress="everything"),
    lambda s: s.setdefault("ingress", []).append({"from": [{}]}),
    lambda s: s.setdefault("ingress", []).append(
        {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["9.0.0.0/8"]}}]}),
    lambda s: s.update(podSelector="app=x"),
]
policies = st.lists(
    st.tuples(spec, st.sampled_from(["a", "b"]), st.one_of(st.none(), st.integers(0, len(MUTATIONS) - 1))),
    max_size=5,
)


def _objects(docs: list[dict[str, Any]]) -> list[RawObject]:
    return [RawObject(ref_of(d, "file", "fuzz"), d) for d in docs]


def _verdicts(docs: list[dict[str, Any]], store: LastGood | None = None) -> tuple[dict, list]:
    inv = kubernetes_inventory(_objects(docs), store or LastGood())
    program = compile_inventory(inv)
    by_ip = index_by_ip(program)
    out = {}
    for s in IPS:
        for d in IPS:
            for p, proto in PORTS:
                fv = evaluate(program, ipaddress.ip_address(s), ipaddress.ip_address(d), proto, p, by_ip)
                out[(s, d, p, proto)] = fv.verdict is Verdict.ACCEPT
    return out, inv.problems


def _build(generated: list) -> tuple[list[dict], list[dict], set[str]]:
    valid, everything, bad = [], [], set()
    for i, (sp, namespace, mutation) in enumerate(generated):
        doc = policy(f"{namespace}/p{i}", copy.deepcopy(sp))
        if mutation is None:
            valid.append(doc)
        else:
            MUTATIONS[mutation](doc["spec"])
            bad.add(f"p{i}")
        everything.append(doc)
    return valid, everything, bad


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies)
def test_invalid_objects_are_reported_and_never_widen(generated: list) -> None:
    valid, everything, bad = _build(generated)
    with_bad, problems = _verdicts(CLUSTER + everything)
    without_bad, clean = _verdicts(CLUSTER + valid)
    assert not clean
    assert {p.ref.name for p in problems} == bad
    widened = [k for k, ok in with_bad.items() if ok and not without_bad[k]]
    assert not widened


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec, st.integers(0, len(MUTATIONS) - 1))
def test_invalid_edit_keeps_last_good_version(good: dict, mutation: int) -> None:
    store = LastGood()
    first = policy("a/p", copy.deepcopy(good))
    before, _ = _verdicts([*CLUSTER, first], store)
    edited = policy("a/p", copy.deepcopy(good))
    MUTATIONS[mutation](edited["spec"])
    after, problems = _verdicts([*CLUSTER, edited], store)
    assert [p.ref.name for p in problems] == ["p"]
    assert after == before
