"""ClusterNetworkPolicy egress `domainNames`: patterns, validation, and a rule's peers being
the addresses `Learned` holds for (endpoint, rule), through the compiler and the simulator."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.ir import Verdict
from agent.policy.cluster import ClusterCompiler, Learned, domain_rule_key, parse_domain, with_learned
from agent.policy.errors import Invalid
from agent.policy.kubernetes.compile import compile_inventory
from agent.simulate import evaluate
from tests.kit.builders import BASE, snapshot_of

WEB, API, CLI = "10.0.0.1", "10.0.0.2", "10.0.1.1"  # a/web, a/api (team=red), b/cli (team=blue)
OUT, OTHER = "192.0.2.10", "198.51.100.7"
RULE = "file:cnp:names/egress/0"


def cnp(egress: list[dict[str, Any]], name: str = "names", tier: str = "Admin") -> dict[str, Any]:
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"tier": tier, "priority": 10, "subject": {"namespaces": {"matchLabels": {"team": "red"}}},
                     "egress": egress}}


def accept_names(*names: str, protocols: list[dict[str, Any]] | None = None, action: str = "Accept") -> dict[str, Any]:
    r: dict[str, Any] = {"action": action, "to": [{"domainNames": list(names)}]}
    if protocols is not None:
        r["protocols"] = protocols
    return r


DENY_REST = {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}
TCP443 = [{"tcp": {"destinationPort": {"number": 443}}}]


def verdict(prog: Any, src: str, dst: str, port: int = 443) -> str:
    fv = evaluate(prog, ipaddress.ip_address(src), ipaddress.ip_address(dst), "tcp", port)
    return "allow" if fv.verdict is Verdict.ACCEPT else "deny"


def compiled(docs: list[dict[str, Any]], learned: Learned, problems: bool = False) -> Any:
    s = snapshot_of(docs)
    if not problems:
        assert not s.problems, [str(p) for p in s.problems]
    return s, compile_inventory(s.inventory, None, "file", learned)


def learned(*items: tuple[str, str, float]) -> Learned:
    return Learned.of((ep, RULE, ipaddress.ip_address(ip), t) for ep, ip, t in items)


# ------------------------------------------------------------------ patterns


@pytest.mark.parametrize(("pattern", "name", "match"), [
    ("kubernetes.io", "kubernetes.io", True),
    ("kubernetes.io", "KUBERNETES.io.", True),   # case and one trailing dot ignored
    ("Kubernetes.IO.", "kubernetes.io", True),
    ("kubernetes.io", "www.kubernetes.io", False),
    ("kubernetes.io", "my-kubernetes.io", False),
    ("blog.kubernetes.io", "kubernetes.io", False),
    ("*.kubernetes.io", "www.kubernetes.io", True),
    ("*.kubernetes.io", "latest.blog.kubernetes.io", True),  # one OR MORE labels
    ("*.kubernetes.io", "kubernetes.io", False),             # zero labels: no
    ("*.kubernetes.io", "xkubernetes.io", False),            # whole labels only
    ("*.kubernetes.io", "wikipedia.org", False),
    ("*.Kubernetes.io", "A.B.KUBERNETES.IO.", True),
])
def test_patterns_as_the_api_documents(pattern: str, name: str, match: bool) -> None:
    assert parse_domain(pattern, "f").matches(name) is match


@pytest.mark.parametrize("bad", [
    "kubernetes", "*", "*.io.", "", "a..b", "-a.io", "a-.io", "*foo.io", "www.*.io", "a.*", "a b.io",
    "x^.io", "_a.io", "a.io..", 7, None, "a." * 127 + "io",
])
def test_invalid_patterns(bad: Any) -> None:
    with pytest.raises(Invalid):
        parse_domain(bad, "spec.egress[0].to[0].domainNames[0]")


@given(st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True), min_size=1, max_size=5),
       st.lists(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), min_size=0, max_size=3),
       st.booleans())
def test_wildcard_is_one_or_more_labels(base: list[str], prefix: list[str], upper: bool) -> None:
    if len(base) < 2:
        base = [*base, "io"]
    suffix = ".".join(base)
    name = ".".join([*prefix, suffix])
    if upper:
        name = name.upper() + "."
    assert parse_domain("*." + suffix, "f").matches(name) is bool(prefix)
    assert parse_domain(suffix, "f").matches(name) is (not prefix)


# ------------------------------------------------------------------ validation, fail closed


def test_domain_names_in_deny_or_pass_are_invalid_and_deny_everything() -> None:
    for action in ("Deny", "Pass"):
        s, prog = compiled([*BASE, cnp([accept_names("example.test", action=action)])],
                           learned(("a/web", OUT, 1e9)), problems=True)
        [p] = [p for p in s.problems if "domainNames" in p.field]
        assert p.field == "spec.egress[0].to[0].domainNames"
        assert "only allowed in Accept rules" in p.message
        # fail closed as for any invalid Deny/Pass: the rule drops everything that way
        assert verdict(prog, WEB, OUT) == "deny"
        assert verdict(prog, WEB, CLI) == "deny"


def test_invalid_name_in_accept_matches_nothing_with_its_field_path() -> None:
    s, prog = compiled([*BASE, cnp([accept_names("ok.test", "bad name"), DENY_REST])],
                       learned(("a/web", OUT, 1e9)), problems=True)
    assert [(p.field, "invalid domain name" in p.message) for p in s.problems] == [
        ("spec.egress[0].to[0].domainNames[1]", True)]
    assert verdict(prog, WEB, OUT) == "deny"


def test_duplicates_and_named_ports_are_refused() -> None:
    s, _ = compiled([*BASE, cnp([accept_names("a.test", "a.test")])], Learned(), problems=True)
    assert [p.field for p in s.problems] == ["spec.egress[0].to[0].domainNames[1]"]
    s, _ = compiled([*BASE, cnp([accept_names("a.test", protocols=[{"destinationNamedPort": "http"}])])],
                    Learned(), problems=True)
    assert [p.field for p in s.problems] == ["spec.egress[0].protocols"]


# ------------------------------------------------------------------ learned peers


def test_without_learned_addresses_the_rule_matches_nothing() -> None:
    _, prog = compiled([*BASE, cnp([accept_names("example.test", protocols=TCP443), DENY_REST])], Learned())
    assert verdict(prog, WEB, OUT) == "deny"


def test_learned_addresses_are_per_endpoint_and_per_rule() -> None:
    docs = [*BASE, cnp([accept_names("example.test", protocols=TCP443), DENY_REST])]
    table = Learned.of([
        ("a/web", RULE, ipaddress.ip_address(OUT), 100.0),
        ("a/api", RULE, ipaddress.ip_address(OTHER), 100.0),
        ("a/web", "file:cnp:other/egress/0", ipaddress.ip_address(OTHER), 100.0),  # no such rule
    ])
    _, prog = compiled(docs, table)
    assert verdict(prog, WEB, OUT) == "allow"
    assert verdict(prog, WEB, OUT, port=80) == "deny"  # the rule's ports still apply
    assert verdict(prog, WEB, OTHER) == "deny"  # learned by another pod, or for another rule
    assert verdict(prog, API, OTHER) == "allow"
    assert verdict(prog, API, OUT) == "deny"
    # b/cli is not a subject: nothing learned applies to it, no rule either
    assert verdict(prog, CLI, OUT) == "allow"
    # the IR invariant: one key, one peer set, in every endpoint
    seen: dict[str, Any] = {}
    for ep in prog.endpoints.values():
        for r in ep.egress.rules:
            assert seen.setdefault(r.key, r.peers) == r.peers, r.key
    keys = {r.key for ep in prog.endpoints.values() for r in ep.egress.rules if "domains" in r.key}
    assert keys == {f"{RULE}/domains@a/web", f"{RULE}/domains@a/api"}


def test_expiry_removes_addresses() -> None:
    docs = [*BASE, cnp([accept_names("example.test"), DENY_REST])]
    table = learned(("a/web", OUT, 100.0), ("a/web", OTHER, 200.0))
    assert table.expired(100.0) == 1
    _, prog = compiled(docs, table.expire(100.0))
    assert verdict(prog, WEB, OUT) == "deny"
    assert verdict(prog, WEB, OTHER) == "allow"
    assert len(table.expire(250.0)) == 0


def test_mixed_peers_keep_their_shared_rule_and_ipv6() -> None:
    rule = {"action": "Accept", "to": [{"domainNames": ["*.example.test"]}, {"networks": ["203.0.113.0/24"]}]}
    _, prog = compiled([*BASE, cnp([rule, DENY_REST])], learned(("a/web", "2001:db8::5", 50.0)))
    assert verdict(prog, WEB, "203.0.113.9") == "allow"
    assert verdict(prog, API, "203.0.113.9") == "allow"
    fv = evaluate(prog, ipaddress.ip_address(WEB), ipaddress.ip_address("2001:db8::5"), "tcp", 443)
    assert fv.verdict is Verdict.ACCEPT


def test_domain_rules_for_the_learner() -> None:
    docs = [*BASE, cnp([DENY_REST, accept_names("a.test", "*.b.test")]),
            cnp([accept_names("c.test")], name="base", tier="Baseline")]
    s = snapshot_of(docs)
    comp = ClusterCompiler(s.inventory, [p.parsed for p in s.inventory.policies.values()])
    rules = comp.domain_rules(s.inventory.endpoints["a/web"])
    assert [(r.key, [str(p) for p in r.patterns]) for r in rules] == [
        ("file:cnp:names/egress/1", ["a.test", "*.b.test"]), ("file:cnp:base/egress/0", ["c.test"])]
    assert rules[0].matches("X.B.TEST.") and not rules[0].matches("b.test")
    assert comp.domain_rules(s.inventory.endpoints["b/cli"]) == []
    pol = next(p.parsed for p in s.inventory.policies.values() if p.parsed.name == "base")
    assert domain_rule_key(pol, pol.egress[0]) == "file:cnp:base/egress/0"


def test_with_learned_equals_compiling_with_the_table() -> None:
    docs = [*BASE, cnp([accept_names("example.test", protocols=TCP443), DENY_REST]),
            cnp([{"action": "Accept", "to": [{"domainNames": ["*.x.test"]}, {"networks": ["203.0.113.0/24"]}]}],
                name="mixed", tier="Baseline")]
    table = Learned.of([
        ("a/web", RULE, ipaddress.ip_address(OUT), 100.0),
        ("a/api", "file:cnp:mixed/egress/0", ipaddress.ip_address("2001:db8::9"), 100.0),
    ])
    s = snapshot_of(docs)
    bare = compile_inventory(s.inventory, None, "file")
    assert with_learned(bare, table) == compile_inventory(s.inventory, None, "file", table)
    assert with_learned(with_learned(bare, table), Learned()) == bare
