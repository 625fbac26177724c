"""Hypothesis strategies for NetworkPolicy specs and the invalid edits (mutations) the fuzz
tests, the differential packet test and the reliability soak all draw from."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

# Valid stand-ins that match nothing here: no generated flow is from 203.0.113.0/24 or SCTP.
NOTHING_PEER = {"ipBlock": {"cidr": "203.0.113.77/32"}}
NOTHING_PORT = {"protocol": "SCTP", "port": 9}

labels = st.dictionaries(st.sampled_from(["app", "tier", "team"]), st.sampled_from(["x", "y", "z", "web", "red"]),
                         max_size=2)

selector = st.one_of(
    st.just({}),
    st.builds(lambda m: {"matchLabels": m}, labels),
    st.builds(lambda k, op, v: {"matchExpressions": [{"key": k, "operator": op, "values": v}]},
              st.sampled_from(["app", "tier", "team"]), st.sampled_from(["In", "NotIn"]),
              st.lists(st.sampled_from(["x", "y", "web", "red"]), min_size=1, max_size=2)),
    st.builds(lambda k, op: {"matchExpressions": [{"key": k, "operator": op}]},
              st.sampled_from(["app", "tier", "team"]), st.sampled_from(["Exists", "DoesNotExist"])),
)

# Leading zeros are decimal to the API server (ParseCIDRSloppy): these are all valid.
CIDRS = ["10.1.0.0/30", "010.001.000.000/30", "0.0.0.0/0", "fd00::/64", "10.1.0.2/031"]

peer = st.one_of(
    st.builds(lambda s: {"podSelector": s}, selector),
    st.builds(lambda s: {"namespaceSelector": s}, selector),
    st.builds(lambda s, t: {"podSelector": s, "namespaceSelector": t}, selector, selector),
    st.builds(lambda c: {"ipBlock": {"cidr": c}}, st.sampled_from(CIDRS)),
    st.just({"ipBlock": {"cidr": "10.1.0.0/24", "except": ["010.1.0.2/32"]}}),
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

# Hostile shapes where a string, map or list belongs: ints, nulls, lists, newlines, quotes.
HOSTILE = [0, 2, None, [], ["x"], {}, True, 1.5, "", "x\n", 'x" ; flush ruleset', "-x", "a" * 64, "\u0661"]

BAD_PEERS = [
    {"ipBlock": {"cidr": "10.1.0.0/33"}}, {"ipBlock": {"cidr": 10}}, {"ipBlock": {"cidr": "10.1.0.0"}},
    {"ipBlock": {"cidr": "10.1.0.0/24 "}}, {"ipBlock": {"cidr": "10.1.0.0/24", "except": ["fd00::/64"]}},
    {"ipBlock": {"cidr": "10.1.0.0/24", "except": ["10.2.0.0/24"]}},
    {"ipBlock": {"cidr": "10.1.0.0/24", "except": ["10.1.0.0/24"]}},
    {"ipBlock": {"cidr": "0.0.0.0/0"}, "podSelector": {}}, {}, None, "everyone", {"podSelector": {}, "x": 1},
    *({"podSelector": {"matchLabels": h}} for h in HOSTILE if h is not None and not isinstance(h, dict)),
    *({"namespaceSelector": {"matchLabels": {"team": h}}} for h in HOSTILE if h != ""),
    *({"podSelector": {"matchLabels": {h: "x"}}} for h in HOSTILE if isinstance(h, str | int) and h != "x"),
    {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}},
    {"podSelector": {"matchExpressions": [{"key": "app", "operator": "DoesNotExist", "values": ["x"]}]}},
    {"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "notin", "values": ["red"]}]}},
    {"namespaceSelector": {"matchExpressions": "team!=red"}},
]

BAD_PORTS = [
    {"port": 70000}, {"port": 0}, {"port": "80"}, {"port": "HTTP"}, {"port": "http-"}, {"port": "a--b"},
    {"port": "abcdefghijklmnop"}, {"port": [80]}, {"port": 1.5}, {"port": True}, {"port": 90, "endPort": 80},
    {"endPort": 90}, {"port": "http", "endPort": 90}, {"protocol": "ICMP"}, {"protocol": "tcp"}, {"protocol": 0},
    {"port": 80, "proto": "UDP"}, "80",
]

BAD_RULES = ["everything", 7, [], {"from": "x"}, {"to": 1}, {"ports": {"port": 80}}, {"ports": "80"},
             {"peers": [{}]}]


def peer_key(direction: str) -> str:
    return "from" if direction == "ingress" else "to"


Mutation = Callable[[dict[str, Any]], list[dict[str, Any]]]


def bad_peer(i: int, direction: str, with_good: bool) -> Mutation:
    """Append a rule holding a bad peer (next to a good one or not); reading: the bad peer
    replaced by one matching nothing."""
    def mutate(s: dict[str, Any]) -> list[dict[str, Any]]:
        ref = copy.deepcopy(s)
        good = [{"podSelector": {}}] if with_good else []
        s.setdefault(direction, []).append({peer_key(direction): [BAD_PEERS[i], *good]})
        ref.setdefault(direction, []).append({peer_key(direction): [NOTHING_PEER, *good]})
        return [ref]
    return mutate


def bad_port(i: int, direction: str, with_good: bool) -> Mutation:
    def mutate(s: dict[str, Any]) -> list[dict[str, Any]]:
        ref = copy.deepcopy(s)
        good = [{"port": 80}] if with_good else []
        s.setdefault(direction, []).append({"ports": [BAD_PORTS[i], *good]})
        ref.setdefault(direction, []).append({"ports": [NOTHING_PORT, *good]})
        return [ref]
    return mutate


def bad_rule(i: int, direction: str) -> Mutation:
    def mutate(s: dict[str, Any]) -> list[dict[str, Any]]:
        ref = copy.deepcopy(s)
        s.setdefault(direction, []).append(BAD_RULES[i])
        ref.setdefault(direction, []).append({peer_key(direction): [NOTHING_PEER]})
        return [ref]
    return mutate


def bad_pod_selector(i: int) -> Mutation:
    """Readings: the same policy selecting everything, or only app=x."""
    bad = [{"matchLabels": 0}, "app=x", {"matchLabels": {"app": 2}}, {"matchExpressions": [{"key": "app"}]},
           {"matchLabels": {"app": "x"}, "matchFields": []},
           {"matchExpressions": [{"key": "x\n", "operator": "Exists"}]}]

    def mutate(s: dict[str, Any]) -> list[dict[str, Any]]:
        readings = [{**copy.deepcopy(s), "podSelector": sel} for sel in ({}, {"matchLabels": {"app": "x"}})]
        s["podSelector"] = bad[i % len(bad)]
        return readings
    return mutate


def bad_types(i: int) -> Mutation:
    bad = [["Inward"], "Ingress", [1], ["Ingress", None], {"Ingress": True}]

    def mutate(s: dict[str, Any]) -> list[dict[str, Any]]:
        readings = [{**copy.deepcopy(s), "policyTypes": t} for t in (["Ingress"], ["Egress"], ["Ingress", "Egress"])]
        s["policyTypes"] = bad[i % len(bad)]
        return readings
    return mutate


def bad_rules_list(direction: str) -> Mutation:
    def mutate(s: dict[str, Any]) -> list[dict[str, Any]]:
        ref = copy.deepcopy(s)
        ref[direction] = [{peer_key(direction): [NOTHING_PEER]}]
        s[direction] = "everything"
        return [ref]
    return mutate


MUTATIONS: list[Mutation] = [
    *(bad_peer(i, d, g) for i in range(len(BAD_PEERS)) for d in ("ingress", "egress") for g in (False, True)),
    *(bad_port(i, d, g) for i in range(len(BAD_PORTS)) for d in ("ingress", "egress") for g in (False, True)),
    *(bad_rule(i, d) for i in range(len(BAD_RULES)) for d in ("ingress", "egress")),
    *(bad_pod_selector(i) for i in range(6)),
    *(bad_types(i) for i in range(5)),
    bad_rules_list("ingress"), bad_rules_list("egress"),
]

policies = st.lists(
    st.tuples(spec, st.sampled_from(["a", "b"]), st.one_of(st.none(), st.integers(0, len(MUTATIONS) - 1))),
    max_size=4,
)
