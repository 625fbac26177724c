"""Fuzz (hypothesis): generated NetworkPolicies, pods and namespaces, valid and hostile,
through admission and semantics.

Properties: no crash; every invalid object reported, no valid one; and fail closed: for
every flow, the verdict is never more permissive than under any VALID reading of the
hostile input. The readings are built independently of the code under test, as plain
valid documents compiled by the valid path: an invalid peer, port or rule replaced by one
that matches nothing; an invalid podSelector replaced by a few valid ones (rules kept);
invalid policyTypes by each valid one; invalid labels by the valid ones alone, and by the
bad ones coerced to strings. Since fail-closed must be below every valid reading, checking
a handful of them is a sound, falsifiable bound (dropping an isolation, or letting an
unreadable object match a NotIn, allows a flow some reading denies).
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.admission import LastGood, kubernetes_inventory
from agent.ir import Verdict
from agent.policy.kubernetes import compile_inventory
from agent.simulate import evaluate, index_by_ip
from agent.sources.kubeobjects import RawObject, ref_of
from tests.kit.builders import ns, pod, policy
from tests.kit.fuzz_kubernetes import HOSTILE, MUTATIONS, peer_key, policies, spec

NAMESPACES = {"a": {"team": "red"}, "b": {"team": "blue"}}
PODS = {
    "a/x": (["10.1.0.1", "fd00::1"], {"app": "x", "tier": "web"}, [{"name": "http", "containerPort": 80}]),
    "a/y": ("10.1.0.2", {"app": "y"}, [{"name": "http", "containerPort": 8080}]),
    "b/z": ("10.1.0.3", {"app": "z", "tier": "web"}, []),
}
IPS = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "192.0.2.9"]
PORTS = [(80, "tcp"), (8080, "tcp"), (53, "udp"), (81, "tcp")]


def corrupt_labels(good: dict[str, str], key: Any, value: Any) -> tuple[Any, list[dict[str, str]]]:
    """Corrupt an object's labels: (hostile labels, valid readings of them). Readings vary
    what selectors look at: a bad value of a selected key read as absent or as each value
    the selectors use; a bad map (key None) read as the old labels, none, or others."""
    if key is None:
        value = "app=x" if value is None or isinstance(value, dict) else value  # null, {}: valid
        return value, [good, {}, {"app": "x", "tier": "web", "team": "red"}, {"team": "blue"}]
    if not isinstance(key, str) or key not in ("app", "tier", "team"):
        return {**good, key: "x"}, [good]  # a bad key: it can be no key a selector names
    rest = {k: v for k, v in good.items() if k != key}
    return {**rest, key: value}, [rest, *({**rest, key: v} for v in ("x", "web", "red"))]


LABEL_KEYS = ["team", "tier", "app", None, "bad key", 2, "x/", "/x", "Tier.io/x", "a" * 64]
BAD_LABEL_VALUES = [h for h in HOSTILE if h != ""]  # "" is a valid label value
READINGS = 4

cluster_corruption = st.dictionaries(
    st.sampled_from(["a", "b", "a/x", "a/y", "b/z"]),
    st.tuples(st.sampled_from(LABEL_KEYS), st.sampled_from(BAD_LABEL_VALUES)), max_size=3)


def _cluster(corrupt: dict[str, tuple[Any, Any]], reading: int) -> tuple[list[dict], list[dict], set[tuple[str, str]]]:
    """(hostile cluster, the reading-th valid reading of it, bad objects as (kind, name))."""
    hostile, valid, bad = [], [], set()
    for name, lab in NAMESPACES.items():
        docs = [ns(name, **lab), ns(name, **lab)]
        if name in corrupt:
            value, readings = corrupt_labels(dict(lab), *corrupt[name])
            docs[0]["metadata"]["labels"] = value
            docs[1]["metadata"]["labels"] = readings[reading % len(readings)]
            bad.add(("Namespace", name))
        hostile.append(docs[0])
        valid.append(docs[1])
    for key, (ips, lab, ports) in PODS.items():
        docs = [pod(key, ips, dict(lab), ports=ports), pod(key, ips, dict(lab), ports=ports)]
        if key in corrupt:
            value, readings = corrupt_labels(dict(lab), *corrupt[key])
            docs[0]["metadata"]["labels"] = value
            docs[1]["metadata"]["labels"] = readings[reading % len(readings)]
            bad.add(("Pod", key.split("/")[1]))
        hostile.append(docs[0])
        valid.append(docs[1])
    return hostile, valid, bad


def _policies(generated: list, reading: int) -> tuple[list[dict], list[dict], set[tuple[str, str]]]:
    hostile, valid, bad = [], [], set()
    for i, (sp, namespace, mutation) in enumerate(generated):
        doc = policy(f"{namespace}/p{i}", copy.deepcopy(sp))
        ref = copy.deepcopy(doc)
        if mutation is not None:
            readings = MUTATIONS[mutation](doc["spec"])
            ref["spec"] = readings[reading % len(readings)]
            bad.add(("NetworkPolicy", f"p{i}"))
        hostile.append(doc)
        valid.append(ref)
    return hostile, valid, bad


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


def _check_against_readings(corrupt: dict[str, tuple[Any, Any]], generated: list) -> None:
    cluster, _, bad_objects = _cluster(corrupt, 0)
    pols, _, bad_policies = _policies(generated, 0)
    ours, problems = _verdicts(cluster + pols)
    assert {(p.ref.kind, p.ref.name) for p in problems} == bad_objects | bad_policies
    for reading in range(READINGS):
        ref, clean = _verdicts(_cluster(corrupt, reading)[1] + _policies(generated, reading)[1])
        assert not clean, [str(p) for p in clean]  # the readings themselves are valid
        widened = [k for k, ok in ours.items() if ok and not ref[k]]
        assert not widened, (reading, widened[:5])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_corruption, policies)
def test_hostile_input_is_reported_and_never_more_permissive_than_any_valid_reading(
    corrupt: dict[str, tuple[Any, Any]], generated: list
) -> None:
    _check_against_readings(corrupt, generated)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["a", "b", "a/x", "a/y", "b/z"]),
                       st.tuples(st.sampled_from(["team", "tier", "app", None]), st.sampled_from(BAD_LABEL_VALUES)),
                       min_size=1, max_size=3),
       st.lists(st.tuples(spec, st.sampled_from(["a", "b"]), st.none()), min_size=1, max_size=4))
# The findings, always tried: an integer namespace label vs NotIn, an integer pod label vs
# a DoesNotExist peer, and a pod whose selected label is unreadable (still isolated).
@example({"b": ("team", 2)}, [({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {
    "matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["red"]}]}}]}]}, "a", None)])
@example({"a/x": ("tier", 2)}, [({"podSelector": {"matchLabels": {"app": "y"}}, "ingress": [{"from": [
    {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}}]}]}, "a", None)])
@example({"a/x": ("app", None)}, [({"podSelector": {"matchLabels": {"app": "x"}}}, "a", None)])
def test_unreadable_labels_never_more_permissive_than_any_valid_reading(
    corrupt: dict[str, tuple[Any, Any]], generated: list
) -> None:
    """The same property, aimed: only labels are bad, on the keys the selectors name."""
    _check_against_readings(corrupt, generated)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies)
def test_sloppy_cidrs_mean_what_the_api_server_means(generated: list) -> None:
    """Leading-zero octets are decimal: the policy is valid and equals its canonical form."""
    pols = _policies([(s, n, None) for s, n, _ in generated], 0)[0]
    canonical = copy.deepcopy(pols)
    for doc in canonical:
        for direction in ("ingress", "egress"):
            for rule in doc["spec"].get(direction) or []:
                for p in rule.get(peer_key(direction)) or []:
                    if "ipBlock" in p:
                        block = p["ipBlock"]
                        block["cidr"] = block["cidr"].replace("010.001.000.000", "10.1.0.0").replace("/031", "/31")
                        block["except"] = [e.replace("010.", "10.") for e in block.get("except", [])]
    cluster = _cluster({}, 0)[0]
    sloppy, problems = _verdicts(cluster + pols)
    assert not problems
    assert sloppy == _verdicts(cluster + canonical)[0]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec, st.integers(0, len(MUTATIONS) - 1))
def test_invalid_edit_keeps_last_good_version(good: dict, mutation: int) -> None:
    store = LastGood()
    cluster = _cluster({}, 0)[0]
    first = policy("a/p", copy.deepcopy(good))
    before, _ = _verdicts([*cluster, first], store)
    edited = policy("a/p", copy.deepcopy(good))
    MUTATIONS[mutation](edited["spec"])
    after, problems = _verdicts([*cluster, edited], store)
    assert problems and {p.ref.name for p in problems} == {"p"}
    assert after == before
