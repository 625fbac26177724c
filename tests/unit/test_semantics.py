"""NetworkPolicy semantics beyond the upstream suite: each rule of the API reference."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from agent.ir import Direction, Verdict
from agent.simulate import evaluate
from tests.kit.builders import BASE, pod, policy, snapshot_of


def verdict(docs: list[dict[str, Any]], src: str, dst: str, port: int, proto: str = "tcp") -> str:
    snap = snapshot_of(docs)
    assert not snap.problems, [str(p) for p in snap.problems]
    fv = evaluate(snap.program, ipaddress.ip_address(src), ipaddress.ip_address(dst), proto, port)
    return "allow" if fv.verdict is Verdict.ACCEPT else "deny"


def test_no_policy_allows_everything() -> None:
    assert verdict(BASE, "10.0.1.1", "10.0.0.1", 80) == "allow"


def test_policy_types_default_to_ingress_only_without_egress_rules() -> None:
    docs = [*BASE, policy("a/p", {"podSelector": {}})]
    assert verdict(docs, "10.0.1.1", "10.0.0.1", 80) == "deny"  # ingress isolated
    assert verdict(docs, "10.0.0.1", "10.0.1.1", 80) == "allow"  # egress not isolated


def test_policy_types_default_add_egress_when_egress_rules_exist() -> None:
    docs = [*BASE, policy("a/p", {"podSelector": {}, "egress": [{"to": [{"podSelector": {}}]}]})]
    assert verdict(docs, "10.0.0.1", "10.0.1.1", 80) == "deny"  # egress isolated, b not allowed
    assert verdict(docs, "10.0.0.1", "10.0.0.2", 80) == "deny"  # a/api ingress isolated too
    snap = snapshot_of(docs)
    assert snap.program.endpoints["a/web"].ingress.isolated


def test_explicit_egress_only_does_not_isolate_ingress() -> None:
    docs = [*BASE, policy("a/p", {"podSelector": {}, "policyTypes": ["Egress"]})]
    assert verdict(docs, "10.0.1.1", "10.0.0.1", 80) == "allow"
    assert verdict(docs, "10.0.0.1", "10.0.1.1", 80) == "deny"


def test_ingress_empty_rule_allows_all() -> None:
    docs = [*BASE, policy("a/p", {"podSelector": {}, "ingress": [{}]})]
    assert verdict(docs, "10.0.1.1", "10.0.0.1", 1234, "udp") == "allow"


def test_both_sides_must_allow() -> None:
    docs = [*BASE,
            policy("a/in", {"podSelector": {"matchLabels": {"app": "api"}},
                            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
            policy("a/out", {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
                             "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]})]
    assert verdict(docs, "10.0.0.1", "10.0.0.2", 9090) == "deny"  # web egress forbids
    docs[-1]["spec"]["egress"].append({"to": [{"podSelector": {"matchLabels": {"app": "api"}}}]})
    assert verdict(docs, "10.0.0.1", "10.0.0.2", 9090) == "allow"


def test_namespace_and_pod_selector_in_one_peer_are_anded() -> None:
    peer = {"namespaceSelector": {"matchLabels": {"team": "blue"}},
            "podSelector": {"matchLabels": {"app": "web"}}}
    docs = [*BASE, pod("b/web", "10.0.1.2", {"app": "web"}),
            policy("a/p", {"podSelector": {}, "ingress": [{"from": [peer]}]})]
    assert verdict(docs, "10.0.1.2", "10.0.0.2", 80) == "allow"  # blue ns AND app=web
    assert verdict(docs, "10.0.1.1", "10.0.0.2", 80) == "deny"  # blue ns, app=cli
    assert verdict(docs, "10.0.0.1", "10.0.0.2", 80) == "deny"  # app=web, red ns


def test_namespace_selector_alone_means_all_pods_of_matching_namespaces() -> None:
    docs = [*BASE, policy("a/p", {"podSelector": {}, "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]})]
    assert verdict(docs, "10.0.1.1", "10.0.0.2", 80) == "allow"
    assert verdict(docs, "10.0.0.1", "10.0.0.2", 80) == "deny"


def test_pod_selector_alone_means_policy_namespace() -> None:
    docs = [*BASE, pod("b/web", "10.0.1.2", {"app": "web"}),
            policy("a/p", {"podSelector": {}, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]})]
    assert verdict(docs, "10.0.0.1", "10.0.0.2", 80) == "allow"
    assert verdict(docs, "10.0.1.2", "10.0.0.2", 80) == "deny"


def test_match_expressions_all_operators() -> None:
    def allowed_from(expr: dict[str, Any]) -> set[str]:
        docs = [*BASE, policy("a/p", {"podSelector": {"matchLabels": {"app": "api"}}, "ingress": [
            {"from": [{"namespaceSelector": {}, "podSelector": {"matchExpressions": [expr]}}]}]})]
        return {s for s in ("10.0.0.1", "10.0.1.1") if verdict(docs, s, "10.0.0.2", 80) == "allow"}

    assert allowed_from({"key": "tier", "operator": "In", "values": ["front"]}) == {"10.0.0.1"}
    assert allowed_from({"key": "tier", "operator": "NotIn", "values": ["front"]}) == {"10.0.1.1"}
    assert allowed_from({"key": "tier", "operator": "Exists"}) == {"10.0.0.1"}
    assert allowed_from({"key": "tier", "operator": "DoesNotExist"}) == {"10.0.1.1"}


def test_namespace_referenced_but_absent_has_its_name_label() -> None:
    docs = [pod("ghost/x", "10.0.2.1"), pod("a/api", "10.0.0.2"),
            policy("a/p", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": "ghost"}}}]}]})]
    assert verdict(docs, "10.0.2.1", "10.0.0.2", 80) == "allow"


def test_ip_block_except_on_ingress() -> None:
    docs = [*BASE, policy("a/p", {"podSelector": {}, "ingress": [{"from": [
        {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}]}]})]
    assert verdict(docs, "192.168.2.7", "10.0.0.2", 80) == "allow"
    assert verdict(docs, "192.168.1.7", "10.0.0.2", 80) == "deny"
    assert verdict(docs, "10.9.9.9", "10.0.0.2", 80) == "deny"


def test_ip_block_ipv6_and_dual_stack_pods() -> None:
    docs = [pod("a/api", ["10.0.0.2", "fd00::2"]), policy("a/p", {"podSelector": {}, "ingress": [
        {"from": [{"ipBlock": {"cidr": "fd00:1::/64", "except": ["fd00:1::/96"]}}]}]})]
    assert verdict(docs, "fd00:1::1:0:0:1", "fd00::2", 80) == "allow"
    assert verdict(docs, "fd00:1::1", "fd00::2", 80) == "deny"
    assert verdict(docs, "10.1.1.1", "10.0.0.2", 80) == "deny"  # v4 not in a v6 block


def test_end_port_range() -> None:
    docs = [*BASE, policy("a/p", {"podSelector": {}, "ingress": [
        {"ports": [{"port": 32000, "endPort": 32768}]}]})]
    assert verdict(docs, "10.0.1.1", "10.0.0.2", 31999) == "deny"
    assert verdict(docs, "10.0.1.1", "10.0.0.2", 32000) == "allow"
    assert verdict(docs, "10.0.1.1", "10.0.0.2", 32768) == "allow"
    assert verdict(docs, "10.0.1.1", "10.0.0.2", 32769) == "deny"
    assert verdict(docs, "10.0.1.1", "10.0.0.2", 32100, "udp") == "deny"  # TCP by default


def test_protocol_without_port_matches_every_port_of_that_protocol() -> None:
    docs = [*BASE, policy("a/p", {"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]})]
    assert verdict(docs, "10.0.1.1", "10.0.0.2", 5353, "udp") == "allow"
    assert verdict(docs, "10.0.1.1", "10.0.0.2", 5353, "tcp") == "deny"


def test_named_port_ingress_resolves_on_the_selected_pod() -> None:
    docs = [*BASE, policy("a/p", {"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]})]
    assert verdict(docs, "10.0.1.1", "10.0.0.1", 8080) == "allow"  # web: http=8080
    assert verdict(docs, "10.0.1.1", "10.0.0.1", 9090) == "deny"
    assert verdict(docs, "10.0.1.1", "10.0.0.2", 9090) == "allow"  # api: http=9090
    assert verdict(docs, "10.0.1.1", "10.0.0.2", 8080) == "deny"


def test_named_port_missing_on_pod_matches_nothing_and_never_widens() -> None:
    docs = [*BASE, policy("a/p", {"podSelector": {}, "ingress": [{"ports": [{"port": "nope"}]}]})]
    for port in (80, 8080, 9090):
        assert verdict(docs, "10.0.1.1", "10.0.0.1", port) == "deny"


def test_named_port_egress_differs_per_destination_pod() -> None:
    docs = [*BASE, pod("b/other", "10.0.1.5", {"app": "o"}, ports=[{"name": "http", "containerPort": 7000}]),
            policy("a/p", {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
                           "egress": [{"ports": [{"port": "http"}]}]})]
    assert verdict(docs, "10.0.0.1", "10.0.0.2", 9090) == "allow"
    assert verdict(docs, "10.0.0.1", "10.0.0.2", 7000) == "deny"
    assert verdict(docs, "10.0.0.1", "10.0.1.5", 7000) == "allow"
    assert verdict(docs, "10.0.0.1", "10.0.1.5", 9090) == "deny"
    assert verdict(docs, "10.0.0.1", "10.0.1.1", 9090) == "deny"  # no such port on b/cli
    assert verdict(docs, "10.0.0.1", "8.8.8.8", 9090) == "deny"  # not a pod: name unresolvable


def test_host_network_and_finished_pods_are_not_endpoints() -> None:
    docs = [*BASE, pod("a/host", "10.0.0.9", {"app": "web"}, hostNetwork=True),
            {**pod("a/done", "10.0.0.8", {"app": "web"}), "status": {"phase": "Succeeded", "podIP": "10.0.0.8"}},
            policy("a/p", {"podSelector": {}, "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]})]
    snap = snapshot_of(docs)
    assert set(snap.program.endpoints) == {"a/web", "a/api", "b/cli"}
    assert verdict(docs, "10.0.0.9", "10.0.0.2", 80) == "deny"  # host IP is no selected pod


def test_rule_origins_and_isolating_policies_are_reported() -> None:
    docs = [*BASE, policy("a/deny", {"podSelector": {}}),
            policy("a/allow", {"podSelector": {"matchLabels": {"app": "api"}}, "ingress": [
                {"from": [{"namespaceSelector": {}}], "ports": [{"port": 9090}]}]})]
    snap = snapshot_of(docs)
    ing = snap.program.endpoints["a/api"].ingress
    assert ing.isolated_by == ("a/allow", "a/deny")
    fv = evaluate(snap.program, ipaddress.ip_address("10.0.1.1"), ipaddress.ip_address("10.0.0.2"),
                  "tcp", 9090)
    assert fv.ingress is not None and fv.ingress.rule is not None
    assert fv.ingress.rule.origin.policy == "allow"
    assert fv.ingress.rule.origin.direction is Direction.INGRESS


def test_node_filter_compiles_only_local_endpoints() -> None:
    docs = [*BASE, pod("a/far", "10.0.9.1", {"app": "web"}, nodeName="n2")]
    snap = snapshot_of(docs, node="n1")
    assert "a/far" not in snap.program.endpoints and "a/web" in snap.program.endpoints


@pytest.mark.parametrize(("spec", "field"), [
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                             "except": ["11.0.0.0/24"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]"),
    ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "spec.ingress[0].ports[0].protocol"),
    ({"podSelector": {}, "egress": [{"ports": [{"port": 70000}]}]}, "spec.egress[0].ports[0].port"),
    ({"podSelector": {}, "egress": [{"ports": [{"port": 90, "endPort": 80}]}]},
     "spec.egress[0].ports[0].endPort"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Like", "values": ["x"]}]}},
     "spec.podSelector.matchExpressions[0].operator"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
     "spec.podSelector.matchExpressions[0].values"),
    ({"podSelector": {}, "policyTypes": ["Sideways"]}, "spec.policyTypes[0]"),
    ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "spec.ingress[0].from[0]"),
])
def test_invalid_policy_is_rejected_naming_the_field(spec: dict[str, Any], field: str) -> None:
    snap = snapshot_of([*BASE, policy("a/bad", spec), policy("a/good", {"podSelector": {}})])
    assert [(p.ref.name, p.field) for p in snap.problems] == [("bad", field)]
    # The good policy still applies; the bad one still isolates (fail closed) but its
    # invalid rule allows nothing.
    assert snap.program.endpoints["a/web"].ingress.isolated_by == ("a/bad", "a/good")
    rules = [r for ep in snap.program.endpoints.values() for r in (*ep.ingress.rules, *ep.egress.rules)]
    assert not [r for r in rules if r.origin.policy == "bad"]


def test_invalid_pod_is_reported_and_skipped() -> None:
    bad = pod("a/bad", "10.0.0.300")
    snap = snapshot_of([*BASE, bad])
    assert [(p.ref.kind, p.ref.name, p.field) for p in snap.problems] == [("Pod", "bad", "status.podIPs[0].ip"),
                                                                              ("Pod", "bad", "status.podIP")]
    assert "a/bad" not in snap.program.endpoints and "a/web" in snap.program.endpoints
