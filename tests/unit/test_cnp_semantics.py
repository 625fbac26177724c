"""ClusterNetworkPolicy semantics (Admin and Baseline tiers around NetworkPolicy), through
admission, the compiler and the simulator, as `stockade matrix` / `explain` answer."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest

from agent.ir import Tier, Verdict
from agent.pipeline import Snapshot
from agent.query import explain, matrix
from agent.simulate import evaluate
from tests.kit.builders import BASE, ns, pod, policy, snapshot_of

# BASE: namespaces a (team=red) and b (team=blue); a/web 10.0.0.1 (http: 8080/TCP),
# a/api 10.0.0.2 (http: 9090/TCP, dns: 53/UDP), b/cli 10.0.1.1.
WEB, API, CLI = "10.0.0.1", "10.0.0.2", "10.0.1.1"
RED = {"namespaces": {"matchLabels": {"team": "red"}}}
BLUE = {"namespaces": {"matchLabels": {"team": "blue"}}}
EVERY_NS: dict[str, Any] = {"namespaces": {}}


def cnp(name: str, tier: str, priority: int, subject: dict[str, Any] | None = None,
        ingress: list[dict[str, Any]] | None = None, egress: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    subject = RED if subject is None else subject
    spec: dict[str, Any] = {"tier": tier, "priority": priority, "subject": copy.deepcopy(subject)}
    if ingress is not None:
        spec["ingress"] = copy.deepcopy(ingress)
    if egress is not None:
        spec["egress"] = copy.deepcopy(egress)
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


def rule(action: str, *peers: dict[str, Any], name: str | None = None, egress: bool = False,
         protocols: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"action": action, "to" if egress else "from": list(peers)}
    if name is not None:
        r["name"] = name
    if protocols is not None:
        r["protocols"] = protocols
    return r


def tcp(port: int) -> dict[str, Any]:
    return {"tcp": {"destinationPort": {"number": port}}}


ALLOW_ALL_NP = policy("a/all", {"podSelector": {}, "ingress": [{}], "egress": [{}],
                                "policyTypes": ["Ingress", "Egress"]})
ISOLATE_NP = policy("a/isolate", {"podSelector": {}, "policyTypes": ["Ingress"]})
FROM_BLUE_NP = policy("a/from-blue", {"podSelector": {}, "ingress": [
    {"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]})


def snap(docs: list[dict[str, Any]], problems: bool = False) -> Snapshot:
    s = snapshot_of(docs)
    if not problems:
        assert not s.problems, [str(p) for p in s.problems]
    return s


def verdict(s: Snapshot, src: str, dst: str, port: int | None = 80, proto: str = "tcp") -> str:
    fv = evaluate(s.program, ipaddress.ip_address(src), ipaddress.ip_address(dst), proto, port)
    return "allow" if fv.verdict is Verdict.ACCEPT else "deny"


def check_same_peers_per_key(s: Snapshot) -> None:
    """The IR invariant dataplanes rely on: one key, one peer set, in every endpoint."""
    seen: dict[str, Any] = {}
    for ep in s.program.endpoints.values():
        for d in (ep.ingress, ep.egress):
            for r in d.rules:
                assert seen.setdefault(r.key, r.peers) == r.peers, r.key


# ------------------------------------------------------------------ actions and tiers


def test_admin_deny_beats_a_networkpolicy_accept() -> None:
    s = snap([*BASE, ALLOW_ALL_NP, cnp("deny-blue", "Admin", 10, ingress=[rule("Deny", BLUE)])])
    assert verdict(s, CLI, WEB) == "deny"
    assert verdict(s, API, WEB) == "allow"  # not a peer: the NetworkPolicy decides


def test_admin_accept_beats_a_networkpolicy_isolation() -> None:
    s = snap([*BASE, ISOLATE_NP, cnp("accept-blue", "Admin", 10, ingress=[rule("Accept", BLUE)])])
    assert verdict(s, CLI, WEB) == "allow"
    assert verdict(s, API, WEB) == "deny"  # default deny of a/isolate


def test_admin_pass_into_an_isolating_networkpolicy() -> None:
    deny_later = cnp("z-deny", "Admin", 20, ingress=[rule("Deny", BLUE)])
    passing = cnp("pass-blue", "Admin", 10, ingress=[rule("Pass", BLUE)])
    # Pass skips the later Admin Deny; the isolating NetworkPolicy then denies...
    assert verdict(snap([*BASE, passing, deny_later, ISOLATE_NP]), CLI, WEB) == "deny"
    # ...or allows, when it has a rule for the peer.
    s = snap([*BASE, passing, deny_later, FROM_BLUE_NP])
    assert verdict(s, CLI, WEB) == "allow"
    # Without the Pass, the Admin Deny decides before the NetworkPolicy.
    assert verdict(snap([*BASE, deny_later, FROM_BLUE_NP]), CLI, WEB) == "deny"
    # Without any NetworkPolicy, a passed connection is allowed (Kubernetes' default).
    assert verdict(snap([*BASE, passing, deny_later]), CLI, WEB) == "allow"


def test_baseline_deny_applies_only_where_no_networkpolicy_selects() -> None:
    base = cnp("baseline-deny", "Baseline", 10, subject=EVERY_NS, ingress=[rule("Deny", EVERY_NS)])
    s = snap([*BASE, base])
    assert verdict(s, CLI, WEB) == "deny" and verdict(s, WEB, CLI) == "deny"
    s = snap([*BASE, base, FROM_BLUE_NP])
    assert verdict(s, CLI, WEB) == "allow"  # the NetworkPolicy overrides the Baseline
    assert verdict(s, WEB, API) == "deny"  # isolated by the NetworkPolicy: its default deny
    assert verdict(s, WEB, CLI) == "deny"  # b has no NetworkPolicy: the Baseline denies


def test_baseline_accept_never_opens_a_networkpolicy_isolation() -> None:
    base = cnp("baseline-accept", "Baseline", 10, ingress=[rule("Accept", BLUE)])
    assert verdict(snap([*BASE, base, ISOLATE_NP]), CLI, WEB) == "deny"  # NP wins
    admin_deny = cnp("admin-deny", "Admin", 1, ingress=[rule("Deny", BLUE)])
    assert verdict(snap([*BASE, base, admin_deny]), CLI, WEB) == "deny"  # Admin first


def test_baseline_pass_means_nothing_further_applies() -> None:
    docs = [*BASE, cnp("b1", "Baseline", 1, ingress=[rule("Pass", BLUE)]),
            cnp("b2", "Baseline", 2, ingress=[rule("Deny", EVERY_NS)])]
    s = snap(docs)
    assert verdict(s, CLI, WEB) == "allow"
    assert verdict(s, API, WEB) == "deny"


def test_cluster_rules_enforce_without_isolating() -> None:
    s = snap([*BASE, cnp("deny-blue", "Admin", 10, ingress=[rule("Deny", BLUE)])])
    web = s.program.endpoints["a/web"].ingress
    assert web.enforced and not web.isolated and web.isolated_by == ()
    assert [r.origin.tier for r in web.rules] == [Tier.ADMIN]
    assert not s.program.endpoints["b/cli"].ingress.enforced  # not a subject


def test_rules_are_ordered_admin_networkpolicy_baseline() -> None:
    s = snap([*BASE, FROM_BLUE_NP, cnp("base", "Baseline", 0, ingress=[rule("Deny", EVERY_NS)]),
              cnp("adm", "Admin", 999, ingress=[rule("Deny", BLUE)])])
    tiers = [r.origin.tier for r in s.program.endpoints["a/web"].ingress.rules]
    assert tiers == [Tier.ADMIN, Tier.POLICY, Tier.BASELINE]
    check_same_peers_per_key(s)


# ------------------------------------------------------------------ precedence


def test_lower_priority_value_wins() -> None:
    acc = cnp("accept", "Admin", 5, ingress=[rule("Accept", BLUE)])
    deny = cnp("deny", "Admin", 10, ingress=[rule("Deny", BLUE)])
    assert verdict(snap([*BASE, acc, deny]), CLI, WEB) == "allow"
    acc["spec"]["priority"] = 11
    assert verdict(snap([*BASE, acc, deny]), CLI, WEB) == "deny"


def test_equal_priorities_are_ordered_by_name() -> None:
    """The API leaves ties to the implementation; Stockade orders them by name."""
    a = cnp("aaa-accept", "Admin", 7, ingress=[rule("Accept", BLUE)])
    b = cnp("bbb-deny", "Admin", 7, ingress=[rule("Deny", BLUE)])
    assert verdict(snap([*BASE, b, a]), CLI, WEB) == "allow"
    a["metadata"]["name"] = "ccc-accept"
    assert verdict(snap([*BASE, a, b]), CLI, WEB) == "deny"
    # The same for the Baseline tier.
    a2 = cnp("aaa", "Baseline", 3, ingress=[rule("Deny", BLUE)])
    b2 = cnp("bbb", "Baseline", 3, ingress=[rule("Accept", BLUE)])
    assert verdict(snap([*BASE, b2, a2]), CLI, WEB) == "deny"


def test_rules_of_one_policy_in_written_order() -> None:
    docs = [*BASE, cnp("p", "Admin", 1, ingress=[rule("Accept", BLUE, protocols=[tcp(80)]), rule("Deny", BLUE)])]
    s = snap(docs)
    assert verdict(s, CLI, WEB, 80) == "allow"
    assert verdict(s, CLI, WEB, 81) == "deny"


# ------------------------------------------------------------------ peers and ports


def test_pods_peer_ands_namespace_and_pod_selectors() -> None:
    peer = {"pods": {"namespaceSelector": {"matchLabels": {"team": "red"}},
                     "podSelector": {"matchLabels": {"app": "api"}}}}
    s = snap([*BASE, cnp("p", "Admin", 1, subject={"pods": {"namespaceSelector": {},
                                                              "podSelector": {"matchLabels": {"app": "web"}}}},
                         ingress=[rule("Deny", peer)])])
    assert verdict(s, API, WEB) == "deny"
    assert verdict(s, CLI, WEB) == "allow"
    assert verdict(s, WEB, API) == "allow"  # a/api is no subject


def test_networks_peer_ipv4_and_ipv6() -> None:
    docs = [*BASE, pod("b/v6", ["10.0.1.9", "fd00::9"]), pod("a/v6", ["10.0.0.9", "fd00::1"]),
            cnp("no-external", "Admin", 1, egress=[
                rule("Deny", {"networks": ["10.0.1.0/24", "fd00::8/125"]}, egress=True)])]
    s = snap(docs)
    assert verdict(s, WEB, CLI) == "deny"
    assert verdict(s, WEB, API) == "allow"
    assert verdict(s, WEB, "192.0.2.1") == "allow"
    assert verdict(s, "fd00::1", "fd00::9") == "deny"
    assert verdict(s, "fd00::1", "fd00::10") == "allow"
    assert verdict(s, "10.0.0.9", "10.0.1.9") == "deny"


def test_nodes_peer_matches_node_addresses_by_labels() -> None:
    nodes = [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"role": "worker"}},
         "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"},
                                  {"type": "ExternalIP", "address": "2001:db8::1"},
                                  {"type": "Hostname", "address": "n1"}]}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2", "labels": {"role": "control"}},
         "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}},
    ]
    docs = [*BASE, *nodes, cnp("nodes", "Admin", 1, egress=[
        rule("Accept", {"nodes": {"matchLabels": {"role": "worker"}}}, egress=True, protocols=[tcp(10250)]),
        rule("Deny", {"nodes": {}}, egress=True)])]
    s = snap(docs)
    assert verdict(s, WEB, "192.168.0.1", 10250) == "allow"
    assert verdict(s, WEB, "192.168.0.1", 22) == "deny"
    assert verdict(s, WEB, "192.168.0.2", 10250) == "deny"
    assert verdict(s, WEB, "2001:db8::1", 22) == "deny"
    assert verdict(s, WEB, "192.168.0.3", 22) == "allow"  # no such node
    assert verdict(s, CLI, "192.168.0.2", 22) == "allow"  # b is no subject


def test_named_port_ingress_resolves_on_each_subject_pod() -> None:
    s = snap([*BASE, cnp("http", "Admin", 1, subject=RED, ingress=[
        rule("Deny", BLUE, protocols=[{"destinationNamedPort": "http"}])])])
    assert verdict(s, CLI, WEB, 8080) == "deny"
    assert verdict(s, CLI, WEB, 9090) == "allow"
    assert verdict(s, CLI, API, 9090) == "deny"
    assert verdict(s, CLI, API, 8080) == "allow"


def test_named_port_egress_resolves_on_each_peer_pod_with_its_protocol() -> None:
    s = snap([*BASE, cnp("named", "Admin", 1, subject=BLUE, egress=[
        rule("Deny", RED, egress=True, protocols=[{"destinationNamedPort": "http"},
                                                  {"destinationNamedPort": "dns"}])])])
    assert verdict(s, CLI, WEB, 8080) == "deny"
    assert verdict(s, CLI, WEB, 9090) == "allow"
    assert verdict(s, CLI, API, 9090) == "deny"
    assert verdict(s, CLI, API, 53, "udp") == "deny"
    assert verdict(s, CLI, API, 53, "tcp") == "allow"  # dns is a UDP port
    keys = {r.key for r in s.program.endpoints["b/cli"].egress.rules}
    assert keys == {"file:cnp:named/egress/0/tcp/8080", "file:cnp:named/egress/0/tcp/9090",
                    "file:cnp:named/egress/0/udp/53"}
    check_same_peers_per_key(s)


def test_protocols_sctp_udp_and_ranges() -> None:
    s = snap([*BASE, cnp("p", "Admin", 1, ingress=[rule("Deny", BLUE, protocols=[
        {"sctp": {"destinationPort": {"number": 9003}}},
        {"udp": {"destinationPort": {"range": {"start": 5000, "end": 5010}}}}])])])
    assert verdict(s, CLI, WEB, 9003, "sctp") == "deny"
    assert verdict(s, CLI, WEB, 9003, "tcp") == "allow"
    assert verdict(s, CLI, WEB, 5005, "udp") == "deny"
    assert verdict(s, CLI, WEB, 5011, "udp") == "allow"


def test_host_network_pods_are_neither_subjects_nor_peers() -> None:
    docs = [*BASE, pod("b/host", "10.0.1.50", {"app": "host"}, hostNetwork=True),
            cnp("p", "Admin", 1, subject=BLUE, ingress=[rule("Deny", RED)], egress=[rule("Deny", RED, egress=True)]),
            cnp("q", "Admin", 2, subject=RED, ingress=[rule("Deny", BLUE)])]
    s = snap(docs)
    assert "b/host" not in s.program.endpoints
    assert all(r.peers is None or not r.peers.contains(ipaddress.ip_address("10.0.1.50"))
               for ep in s.program.endpoints.values() for r in ep.ingress.rules)
    assert verdict(s, "10.0.1.50", WEB) == "allow"


# ------------------------------------------------------------------ v1alpha1


def anp(name: str, priority: int, ingress: list[dict[str, Any]] | None = None,
        egress: list[dict[str, Any]] | None = None, kind: str = "AdminNetworkPolicy") -> dict[str, Any]:
    spec: dict[str, Any] = {"subject": copy.deepcopy(RED), "ingress": ingress or [], "egress": egress or []}
    if kind == "AdminNetworkPolicy":
        spec["priority"] = priority
    return {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": kind, "metadata": {"name": name},
            "spec": spec}


def test_v1alpha1_admin_network_policy_allow_deny_pass() -> None:
    docs = [*BASE, ISOLATE_NP, anp("anp", 3, ingress=[
        {"name": "allow-80", "action": "Allow", "from": [BLUE],
         "ports": [{"portNumber": {"protocol": "TCP", "port": 80}}]},
        {"action": "Pass", "from": [BLUE], "ports": [{"portRange": {"start": 90, "end": 99}}]},
        {"action": "Deny", "from": [BLUE], "ports": [{"namedPort": "http"}]},
    ])]
    s = snap(docs)
    assert verdict(s, CLI, WEB, 80) == "allow"
    assert verdict(s, CLI, WEB, 95) == "deny"  # passed to the isolating NetworkPolicy
    assert verdict(s, CLI, WEB, 8080) == "deny"
    r = s.program.endpoints["a/web"].ingress.rules[0]
    assert (r.origin.kind, r.origin.tier, r.origin.priority, r.origin.name) == (
        "AdminNetworkPolicy", Tier.ADMIN, 3, "allow-80")
    assert [x.verdict for x in s.program.endpoints["a/web"].ingress.rules[:3]] == [
        Verdict.ACCEPT, Verdict.PASS, Verdict.DROP]


def test_v1alpha1_baseline_admin_network_policy() -> None:
    banp = anp("default", 0, kind="BaselineAdminNetworkPolicy", ingress=[
        {"action": "Allow", "from": [BLUE]}, {"action": "Deny", "from": [EVERY_NS]}],
        egress=[{"action": "Deny", "to": [{"networks": ["10.0.1.0/24"]}]}])
    s = snap([*BASE, banp])
    assert verdict(s, CLI, WEB) == "allow"
    assert verdict(s, API, WEB) == "deny"
    assert verdict(s, WEB, CLI) == "deny"
    r = s.program.endpoints["a/web"].ingress.rules[0]
    assert (r.origin.tier, r.origin.priority) == (Tier.BASELINE, None)
    # A Baseline CNP comes first in the tier (the singleton has no priority).
    s = snap([*BASE, banp, cnp("zzz", "Baseline", 1000, ingress=[rule("Deny", BLUE)])])
    assert verdict(s, CLI, WEB) == "deny"


# ------------------------------------------------------------------ fail closed


def problems(s: Snapshot) -> set[str]:
    return {p.field for p in s.problems}


@pytest.mark.parametrize("bad_peer", [{}, {"namespaces": {}, "pods": {"podSelector": {}}}, {"future": {}},
                                      {"namespaces": {"matchLabels": 0}}, {"pods": {"namespaceSelector": {}}}])
def test_an_invalid_peer_makes_accept_match_nothing_and_deny_or_pass_deny_all(bad_peer: dict[str, Any]) -> None:
    acc = cnp("acc", "Admin", 1, ingress=[rule("Accept", BLUE, bad_peer)])
    s = snap([*BASE, ISOLATE_NP, acc], problems=True)
    assert "spec.ingress[0].from[1]" in {f[: len("spec.ingress[0].from[1]")] for f in problems(s)}
    assert verdict(s, CLI, WEB) == "deny"  # the valid peer of that rule does not open either
    for action in ("Deny", "Pass"):
        d = cnp("d", "Admin", 1, ingress=[rule(action, BLUE, bad_peer)])
        s = snap([*BASE, ALLOW_ALL_NP, d], problems=True)
        assert verdict(s, API, WEB) == "deny"  # every peer, not only BLUE
        assert verdict(s, API, WEB, 5, "udp") == "deny"
        r = s.program.endpoints["a/web"].ingress.rules[0]
        assert (r.peers, r.ports, r.verdict) == (None, (), Verdict.DROP)


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda r: r.update(action="Reject"), "spec.ingress[0].action"),
    (lambda r: r.update(protocols=[{"tcp": {}}]), "spec.ingress[0].protocols[0].tcp.destinationPort"),
    (lambda r: r.update(protocols=[{"tcp": {"destinationPort": {"number": 0}}}]),
     "spec.ingress[0].protocols[0].tcp.destinationPort.number"),
    (lambda r: r.update(protocols=[{"tcp": {"destinationPort": {"range": {"start": 9, "end": 9}}}}]),
     "spec.ingress[0].protocols[0].tcp.destinationPort.range"),
    (lambda r: r.update(protocols=[{"icmp": {}}]), "spec.ingress[0].protocols[0].icmp"),
    (lambda r: r.update(protocols=[]), "spec.ingress[0].protocols"),
    (lambda r: r.update({"from": []}), "spec.ingress[0].from"),
    (lambda r: r.update(extra=1), "spec.ingress[0].extra"),
])
def test_an_invalid_rule_part_fails_closed_with_its_field_path(mutate: Any, field: str) -> None:
    for action, expected in (("Accept", "deny"), ("Deny", "deny"), ("Pass", "deny")):
        r = rule(action, BLUE)
        mutate(r)
        base = ISOLATE_NP if action == "Accept" else ALLOW_ALL_NP
        s = snap([*BASE, base, cnp("p", "Admin", 1, ingress=[r])], problems=True)
        assert field in problems(s), problems(s)
        assert verdict(s, CLI, WEB) == expected, action
        if action != "Accept" and r["action"] != "Reject":
            assert verdict(s, API, WEB) == "deny"  # a Deny all


def test_named_port_with_networks_or_nodes_is_invalid() -> None:
    r = rule("Deny", {"networks": ["192.0.2.0/24"]}, egress=True, protocols=[{"destinationNamedPort": "http"}])
    s = snap([*BASE, cnp("p", "Admin", 1, egress=[r])], problems=True)
    assert "spec.egress[0].protocols" in problems(s)
    assert verdict(s, WEB, API) == "deny"  # the Deny reads as Deny all


def test_invalid_networks_entry() -> None:
    r = rule("Accept", {"networks": ["10.0.1.0/33"]}, egress=True)
    s = snap([*BASE, policy("a/eg", {"podSelector": {}, "policyTypes": ["Egress"]}),
              cnp("p", "Admin", 1, egress=[r])], problems=True)
    assert "spec.egress[0].to[0].networks[0]" in problems(s)
    assert verdict(s, WEB, CLI) == "deny"


@pytest.mark.parametrize("subject", [{}, {"namespaces": {}, "pods": {"podSelector": {}}},
                                     {"namespaces": {"matchExpressions": [{"key": "x", "operator": "In"}]}}])
def test_invalid_subject_selects_every_pod_for_deny_only(subject: dict[str, Any]) -> None:
    docs = [*BASE, cnp("p", "Admin", 50, subject=subject, ingress=[
        rule("Accept", BLUE), rule("Pass", RED), rule("Deny", BLUE)])]
    s = snap(docs, problems=True)
    assert any(f.startswith("spec.subject") for f in problems(s))
    assert verdict(s, CLI, API) == "deny"  # Accept dropped, Deny applies to every pod
    assert verdict(s, WEB, API) == "deny"  # Pass read as Deny
    rules = s.program.endpoints["b/cli"].ingress.rules  # b/cli is a subject too
    assert {r.verdict for r in rules} == {Verdict.DROP}


@pytest.mark.parametrize(("spec_change", "field"), [
    ({"tier": "Middle"}, "spec.tier"), ({"priority": 1001}, "spec.priority"), ({"priority": "1"}, "spec.priority"),
    ({"future": 1}, "spec.future"),
])
def test_unreadable_precedence_reads_as_admin_zero_deny_only(spec_change: dict[str, Any], field: str) -> None:
    p = cnp("p", "Baseline", 500, ingress=[rule("Accept", BLUE), rule("Pass", RED)])
    p["spec"].update(spec_change)
    s = snap([*BASE, ALLOW_ALL_NP, p], problems=True)
    assert field in problems(s)
    assert verdict(s, CLI, WEB) == "allow"  # the Accept is dropped; the NetworkPolicy allows
    assert verdict(s, API, WEB) == "deny"  # the Pass reads as an Admin Deny
    r = s.program.endpoints["a/web"].ingress.rules[0]
    assert (r.origin.tier, r.verdict) == (Tier.ADMIN, Verdict.DROP)


def test_pod_with_invalid_labels_as_peer_and_subject() -> None:
    bad = pod("b/bad", "10.0.1.7", {"app": "bad"})
    bad["metadata"]["labels"]["-x"] = "y"
    sel_bad = {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "bad"}}}}
    acc = cnp("acc", "Admin", 1, ingress=[rule("Accept", sel_bad)])
    s = snap([*BASE, bad, ISOLATE_NP, acc], problems=True)
    assert verdict(s, "10.0.1.7", WEB) == "deny"  # an Accept never matches unknown labels
    deny = cnp("deny", "Admin", 1, ingress=[rule("Deny", sel_bad)])
    s = snap([*BASE, bad, ALLOW_ALL_NP, deny], problems=True)
    assert verdict(s, "10.0.1.7", WEB) == "deny"  # a Deny does
    passing = cnp("pass", "Admin", 1, ingress=[rule("Pass", sel_bad)])
    s = snap([*BASE, bad, ALLOW_ALL_NP, passing], problems=True)
    assert verdict(s, "10.0.1.7", WEB) == "deny"  # a Pass drops what it cannot be sure of
    assert verdict(s, API, WEB) == "allow"
    check_same_peers_per_key(s)
    # As a subject: only the Deny side of a policy whose selector might select it.
    subj = cnp("subj", "Admin", 1, subject={"pods": {"namespaceSelector": {},
                                                      "podSelector": {"matchLabels": {"app": "bad"}}}},
               egress=[rule("Accept", RED, egress=True), rule("Pass", BLUE, egress=True)])
    s = snap([*BASE, bad, subj], problems=True)
    assert verdict(s, "10.0.1.7", CLI) == "deny"
    assert verdict(s, "10.0.1.7", WEB) == "allow"  # the Accept does not apply; not isolated


def test_namespace_with_invalid_labels() -> None:
    bad_ns = ns("c", team="green")
    bad_ns["metadata"]["labels"]["bad key"] = "x"
    docs = [*BASE, bad_ns, pod("c/x", "10.0.2.1"),
            cnp("acc", "Admin", 1, ingress=[rule("Accept", {"namespaces": {"matchLabels": {"team": "green"}}})]),
            ISOLATE_NP]
    assert verdict(snap(docs, problems=True), "10.0.2.1", WEB) == "deny"
    docs[-2] = cnp("dn", "Admin", 1, ingress=[rule("Deny", {"namespaces": {"matchLabels": {"team": "green"}}})])
    docs[-1] = ALLOW_ALL_NP
    assert verdict(snap(docs, problems=True), "10.0.2.1", WEB) == "deny"


def test_too_many_rules() -> None:
    rules = [rule("Deny", {"networks": [f"192.0.2.{i}/32"]}) for i in range(25)] + [rule("Accept", BLUE)]
    s = snap([*BASE, ISOLATE_NP, cnp("p", "Admin", 1, ingress=rules)], problems=True)
    assert "spec.ingress" in problems(s)
    assert verdict(s, CLI, WEB) == "deny"


# ------------------------------------------------------------------ explain and matrix


def test_explain_names_tier_and_rule() -> None:
    docs = [*BASE, FROM_BLUE_NP,
            cnp("deny-metadata", "Admin", 10, subject=EVERY_NS, egress=[
                rule("Deny", {"networks": ["169.254.169.254/32"]}, egress=True)]),
            cnp("admin-baseline", "Admin", 5, ingress=[rule("Pass", BLUE, name="to-np")])]
    s = snap([*docs, pod("b/meta", "169.254.169.254")])
    ex = explain(s, "b/cli", "b/meta", "TCP", "80")
    assert not ex.allowed
    assert ex.flow.egress is not None
    assert ex.flow.egress.reason == "deny by ClusterNetworkPolicy deny-metadata (Admin, priority 10) egress rule 0"
    ex = explain(s, "b/cli", "a/web", "TCP", "80")
    assert ex.allowed and ex.flow.ingress is not None
    assert ex.flow.ingress.reason == ("pass by ClusterNetworkPolicy admin-baseline (Admin, priority 5) ingress "
                                      "rule 0 (to-np) → accept by rule a/from-blue ingress[0]")
    j = ex.to_json()["ingress"]
    assert j["passed"] == [{"policy": "admin-baseline", "kind": "ClusterNetworkPolicy", "tier": "admin",
                            "priority": 5, "direction": "ingress", "index": 0, "name": "to-np",
                            "verdict": "pass"}]
    assert j["rule"]["policy"] == "a/from-blue" and j["rule"]["tier"] == "policy"


def test_explain_baseline_decisions() -> None:
    s = snap([*BASE, cnp("floor", "Baseline", 1, subject=EVERY_NS, ingress=[rule("Deny", RED, name="no-red")])])
    ex = explain(s, "a/api", "b/cli", "TCP", "80")
    assert ex.flow.ingress is not None
    assert ex.flow.ingress.reason == "deny by ClusterNetworkPolicy floor (Baseline, priority 1) ingress rule 0 (no-red)"
    assert ex.to_json()["ingress"]["rule"]["tier"] == "baseline"


def test_matrix_through_all_tiers() -> None:
    docs = [*BASE, FROM_BLUE_NP,
            cnp("adm", "Admin", 1, subject=EVERY_NS, ingress=[rule("Deny", {"pods": {
                "namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "api"}}}})]),
            cnp("base", "Baseline", 1, subject=BLUE, ingress=[rule("Deny", RED)])]
    m = matrix(snap(docs), "80", "TCP", None)
    assert m == {
        "a/api": {"a/api": "allow", "a/web": "deny", "b/cli": "deny"},
        "a/web": {"a/api": "deny", "a/web": "allow", "b/cli": "deny"},
        "b/cli": {"a/api": "allow", "a/web": "allow", "b/cli": "allow"},
    }
