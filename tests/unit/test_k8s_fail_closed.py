"""Kubernetes input boundary: validation like the API server's, and fail-closed admission.

An invalid object never makes a verdict more permissive than its last good version or,
without one, than its invalid parts matching nothing in accept rules and everything in
isolations. One test per finding of issue 16 (k8s slice), then the validation table.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from agent import statefile
from agent.admission import LastGood, kubernetes_inventory
from agent.admission.kubernetes import parse_pod
from agent.inventory import Problem
from agent.ir import Program, Verdict
from agent.policy.errors import Invalid
from agent.policy.kubernetes import compile_inventory, parse_cidr_sloppy
from agent.simulate import evaluate
from agent.sources.kubeobjects import RawObject, ref_of
from tests.kit.builders import ns, pod, policy

WORLD = [
    ns("a", team="red"), ns("prod", env="prod"), ns("dev", env="dev"),
    pod("a/web", "10.0.0.1", {"app": "web"}),
    pod("a/api", "10.0.0.2", {"app": "api"}),
    pod("prod/p", "10.0.1.1", {"app": "p"}),
    pod("dev/d", "10.0.1.2", {"app": "d"}),
]
DENY_ALL = policy("a/deny", {"podSelector": {}})


def compile_docs(docs: list[dict[str, Any]], store: LastGood | None = None) -> tuple[Program, list[Problem]]:
    objs = [RawObject(ref_of(d, "file", "test"), d) for d in docs]
    inv = kubernetes_inventory(objs, store or LastGood())
    return compile_inventory(inv), inv.problems


def allowed(program: Program, src: str, dst: str, port: int = 80, proto: str = "tcp") -> bool:
    fv = evaluate(program, ipaddress.ip_address(src), ipaddress.ip_address(dst), proto, port)
    return fv.verdict is Verdict.ACCEPT


def fields(problems: list[Problem]) -> list[tuple[str, str]]:
    return [(p.ref.name, p.field) for p in problems]


# ---------------------------------------------------------------- one test per finding


def test_leading_zero_cidr_reads_as_decimal_and_default_deny_stays() -> None:
    """010.0.2.0/24 is 10.0.2.0/24 to the API server (ParseCIDRSloppy): accepted, and a
    default deny next to it still denies everyone else."""
    allow = policy("a/allow", {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "010.0.2.0/24"}}]}]})
    program, problems = compile_docs([*WORLD, DENY_ALL, allow])
    assert problems == []
    assert allowed(program, "10.0.2.7", "10.0.0.1")
    assert not allowed(program, "8.0.2.7", "10.0.0.1")  # not octal (010 = 8)
    assert not allowed(program, "10.0.1.1", "10.0.0.1")


def test_invalid_ip_block_rule_keeps_its_policy_isolating() -> None:
    """Rejecting the whole policy would drop its isolation: deny-by-this-policy became allow."""
    bad = policy("a/bad", {"podSelector": {}, "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.0.2.0/33"}}]},
        {"from": [{"podSelector": {"matchLabels": {"app": "api"}}}]},  # a valid sibling rule
    ]})
    program, problems = compile_docs([*WORLD, bad])
    assert fields(problems) == [("bad", "spec.ingress[0].from[0].ipBlock.cidr")]
    assert not allowed(program, "10.0.2.7", "10.0.0.1")  # the invalid rule matches nothing
    assert not allowed(program, "10.0.1.1", "10.0.0.1")  # still isolated
    assert allowed(program, "10.0.0.2", "10.0.0.1")  # the valid sibling rule applies


def test_integer_pod_label_keeps_the_pod_isolated_and_matched_by_no_peer() -> None:
    weird = pod("a/v2", "10.0.0.3", {"app": "web", "version": 2})  # type: ignore[dict-item]
    allow_web = policy("a/allow", {"podSelector": {"matchLabels": {"app": "api"}}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]})
    only_web = policy("a/web", {"podSelector": {"matchLabels": {"app": "web"}}})
    program, problems = compile_docs([*WORLD, weird, allow_web, only_web])
    assert fields(problems) == [("v2", "metadata.labels[version]")]
    assert "a/v2" in program.endpoints  # still a local endpoint
    assert not allowed(program, "10.0.1.1", "10.0.0.3")  # isolated (by every policy of a)
    assert program.endpoints["a/v2"].ingress.isolated_by == ("a/allow", "a/web")
    assert allowed(program, "10.0.0.1", "10.0.0.2")  # app=web is allowed to api...
    assert not allowed(program, "10.0.0.3", "10.0.0.2")  # ...but the unreadable pod is no peer


def test_integer_namespace_label_is_matched_by_no_namespace_selector() -> None:
    """Dropping every label made `env NotIn [prod]` match prod."""
    prod = ns("prod", env="prod", tier=1)  # type: ignore[arg-type]
    for op, values in (("NotIn", ["prod"]), ("DoesNotExist", None), ("In", ["prod"]), ("Exists", None)):
        expr: dict[str, Any] = {"key": "env", "operator": op}
        if values:
            expr["values"] = values
        allow = policy("a/allow", {"podSelector": {}, "ingress": [
            {"from": [{"namespaceSelector": {"matchExpressions": [expr]}}]}]})
        program, problems = compile_docs([*WORLD[:1], prod, *WORLD[2:], allow])
        assert fields(problems) == [("prod", "metadata.labels[tier]")]
        assert not allowed(program, "10.0.1.1", "10.0.0.1"), op
    assert allowed(program, "10.0.1.2", "10.0.0.1")  # Exists still matches dev


def test_match_labels_zero_is_invalid_never_select_all() -> None:
    as_peer = policy("a/peer", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": 0}}]}]})
    program, problems = compile_docs([*WORLD, as_peer])
    assert fields(problems) == [("peer", "spec.ingress[0].from[0].podSelector.matchLabels")]
    assert not allowed(program, "10.0.0.2", "10.0.0.1")
    as_target = policy("a/target", {"podSelector": {"matchLabels": 0}, "ingress": [{}]})
    program, problems = compile_docs([*WORLD, as_target])
    assert fields(problems) == [("target", "spec.podSelector.matchLabels")]
    # Unknown selection: every pod of the namespace isolated, its allow-all rule not applied.
    assert not allowed(program, "10.0.1.1", "10.0.0.1") and not allowed(program, "10.0.1.1", "10.0.0.2")
    assert allowed(program, "10.0.0.1", "10.0.1.1")  # other namespaces untouched


def test_last_good_that_no_longer_validates_is_forgotten_not_fatal(tmp_path: Path) -> None:
    """A saved body that today's validation rejects (say, after an upgrade) once made every
    sync raise; now it is reported and the current version is read fail-closed."""
    bad = policy("a/p", {"podSelector": {}, "ingress": [{"ports": [{"port": "80"}]}]})  # "80" is no name
    state = tmp_path / "state.json"
    ref = ref_of(bad, "file", "test")
    state.write_text(json.dumps({f"{ref.source}|{ref.kind}|{ref.namespace}|{ref.name}": bad}))
    store = LastGood(state)
    program, problems = compile_docs([*WORLD, bad], store)
    assert ("p", "spec.ingress[0].ports[0].port") in fields(problems)
    assert ("p", "(last good version)") in fields(problems)
    assert not allowed(program, "10.0.1.1", "10.0.0.1", 80)  # isolated; the bad port allows nothing
    saved = json.loads(state.read_text())  # saved state is admitted state: valid bodies only
    assert "file|NetworkPolicy|a|p" not in saved and "file|Pod|a|web" in saved
    program, problems = compile_docs([*WORLD, bad], store)  # and the next sync works the same
    assert not allowed(program, "10.0.1.1", "10.0.0.1", 80)


def test_state_writer_removes_its_temp_file_on_every_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LastGood(tmp_path / "state.json")

    def broken_dump(*args: Any, **kwargs: Any) -> None:
        raise TypeError("cannot serialise")

    monkeypatch.setattr(statefile.json, "dump", broken_dump)
    monkeypatch.setattr(statefile.json, "dumps", broken_dump)  # LastGood encodes each object's text
    store.replace({"k": {"kind": "Pod"}})  # logged, not raised: enforcement goes on
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    store.replace({"k": {"kind": "Pod"}})  # same content, but the failed write is retried
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert json.loads((tmp_path / "state.json").read_text()) == {"k": {"kind": "Pod"}}


# ---------------------------------------------------------------- fail-closed semantics


def test_invalid_edit_keeps_the_last_good_version_across_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    good = policy("a/p", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]})
    edited = policy("a/p", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": 0}}]}]})
    newpol = policy("a/q", {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]})
    compile_docs([*WORLD, good], LastGood(state))
    flows = [(s, d) for s in ("10.0.0.1", "10.0.0.2", "10.0.1.1") for d in ("10.0.0.1", "10.0.0.2", "10.0.1.2")]
    running, problems = compile_docs([*WORLD, edited, newpol], LastGood(state))
    assert {f for _, f in fields(problems)} >= {"spec.ingress[0].from[0].podSelector.matchLabels"}
    assert allowed(running, "10.0.1.1", "10.0.0.1")  # the last good version is in force
    assert not allowed(running, "10.0.0.1", "10.0.1.2")  # a/q: egress isolated, bad rule allows nothing
    before = {f: allowed(running, *f) for f in flows}
    restarted, _ = compile_docs([*WORLD, edited, newpol], LastGood(state))  # a new process, same file
    assert {f: allowed(restarted, *f) for f in flows} == before


def test_invalid_policy_types_isolate_both_directions_and_apply_no_rule() -> None:
    bad = policy("a/p", {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress", "Sideways"],
                         "ingress": [{}], "egress": [{}]})
    program, problems = compile_docs([*WORLD, bad])
    assert fields(problems) == [("p", "spec.policyTypes[1]")]
    assert not allowed(program, "10.0.1.1", "10.0.0.1") and not allowed(program, "10.0.0.1", "10.0.1.1")
    assert allowed(program, "10.0.1.1", "10.0.0.2")  # the valid podSelector still limits it


def test_invalid_spec_isolates_the_namespace_and_one_bad_policy_blocks_no_other() -> None:
    program, problems = compile_docs([*WORLD, policy("a/bad", "everything"),  # type: ignore[arg-type]
                                      policy("dev/ok", {"podSelector": {}})])
    assert fields(problems) == [("bad", "spec")]
    assert not allowed(program, "10.0.1.1", "10.0.0.2") and not allowed(program, "10.0.0.2", "10.0.1.1")
    assert not allowed(program, "10.0.1.1", "10.0.1.2")  # dev/ok in force
    assert allowed(program, "10.0.1.2", "10.0.1.1")


def test_an_invalid_except_invalidates_its_whole_peer() -> None:
    """Dropping only the bad except would widen the block."""
    bad = policy("a/p", {"podSelector": {}, "ingress": [{"from": [
        {"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24", "fd00::/64"]}}]}]})
    program, problems = compile_docs([*WORLD, bad])
    assert fields(problems) == [("p", "spec.ingress[0].from[0].ipBlock.except[1]")]
    assert not allowed(program, "10.0.1.1", "10.0.0.1") and not allowed(program, "10.0.2.1", "10.0.0.1")


def test_all_ports_invalid_means_nothing_not_any_port() -> None:
    bad = policy("a/p", {"podSelector": {}, "ingress": [{"ports": [{"port": 0}, {"port": "-http"}]}]})
    program, problems = compile_docs([*WORLD, bad])
    assert fields(problems) == [("p", "spec.ingress[0].ports[0].port"), ("p", "spec.ingress[0].ports[1].port")]
    for port in (80, 1, 65535):
        assert not allowed(program, "10.0.1.1", "10.0.0.1", port)


def test_hostile_names_never_travel_further() -> None:
    hostile = pod("a/x", "10.0.0.9", {"app": "web"})
    hostile["metadata"]["name"] = 'x" ; flush ruleset\n'
    program, problems = compile_docs([*WORLD, hostile, DENY_ALL])
    assert [f for _, f in fields(problems)] == ["metadata.name"]
    (key,) = [k for k in program.endpoints if program.endpoints[k].ips == (ipaddress.ip_address("10.0.0.9"),)]
    assert key.startswith("a/_invalid_") and key.isprintable() and '"' not in key
    assert not allowed(program, "10.0.1.1", "10.0.0.9")  # and it is still isolated


# ---------------------------------------------------------------- validation table


def _policy_problems(spec: dict[str, Any], name: str = "p", namespace: str = "a") -> list[str]:
    doc = policy(f"{namespace}/{name}", spec)
    return [f for _, f in fields(compile_docs([doc])[1])]


@pytest.mark.parametrize(("spec", "field"), [
    ({"podSelector": {"matchLabels": {"a/b/c": "x"}}}, "spec.podSelector.matchLabels['a/b/c']"),
    ({"podSelector": {"matchLabels": {"/x": "x"}}}, "spec.podSelector.matchLabels['/x']"),
    ({"podSelector": {"matchLabels": {"Ex.com/x": "x"}}}, "spec.podSelector.matchLabels['Ex.com/x']"),
    ({"podSelector": {"matchLabels": {"x" * 64: "x"}}}, f"spec.podSelector.matchLabels['{'x' * 64}']"),
    ({"podSelector": {"matchLabels": {"app": "x\n"}}}, "spec.podSelector.matchLabels[app]"),
    ({"podSelector": {"matchLabels": {"app": "-x"}}}, "spec.podSelector.matchLabels[app]"),
    ({"podSelector": {"matchLabels": {"app": None}}}, "spec.podSelector.matchLabels[app]"),
    ({"podSelector": {"matchLabels": []}}, "spec.podSelector.matchLabels"),
    ({"podSelector": {"matchExpressions": {}}}, "spec.podSelector.matchExpressions"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}},
     "spec.podSelector.matchExpressions[0].values"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]}},
     "spec.podSelector.matchExpressions[0].values"),
    ({"podSelector": {}, "ingress": [{}, {"from": [{"podSelector": {}}, {"ipBlock": {"cidr": "10.0.0.0/8 "}}]}]},
     "spec.ingress[1].from[1].ipBlock.cidr"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "fe80::/64%eth0"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.1"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "256.0.0.0/8"}}]}]},
     "spec.ingress[0].from[0].ipBlock.cidr"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "80"}]}]}, "spec.ingress[0].ports[0].port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "a--b"}]}]}, "spec.ingress[0].ports[0].port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "abcdefghijklmnop"}]}]}, "spec.ingress[0].ports[0].port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "Http"}]}]}, "spec.ingress[0].ports[0].port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": True}]}]}, "spec.ingress[0].ports[0].port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]},
     "spec.ingress[0].ports[0].endPort"),
    ({"podSelector": {}, "ingress": [{"ports": [{"endPort": 90}]}]}, "spec.ingress[0].ports[0].endPort"),
    ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "tcp"}]}]}, "spec.ingress[0].ports[0].protocol"),
    ({"podSelector": {}, "ingress": [{"ports": [{"protocol": 0}]}]}, "spec.ingress[0].ports[0].protocol"),
    ({"podSelector": {}, "policyTypes": "Ingress"}, "spec.policyTypes"),
    ({"podSelector": {}, "policyTypes": ["Ingress", "Egress", "Ingress"]}, "spec.policyTypes"),
    ({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}, "x\ny": 1}]}]}, "spec.ingress[0].from[0].'x\\ny'"),
])
def test_policy_validation_names_the_field(spec: dict[str, Any], field: str) -> None:
    assert _policy_problems(spec) == [field]


@pytest.mark.parametrize(("text", "network"), [
    ("010.0.2.0/24", "10.0.2.0/24"),
    ("10.000.002.001/024", "10.0.2.0/24"),
    ("10.0.2.7/24", "10.0.2.0/24"),  # host bits may be set
    ("::ffff:010.0.0.1/128", "::ffff:a00:1/128"),
    ("FD00::1/64", "fd00::/64"),
])
def test_sloppy_cidrs_parse_like_the_api_server(text: str, network: str) -> None:
    assert parse_cidr_sloppy(text) == ipaddress.ip_network(network)
    assert _policy_problems({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": text}}]}]}) == []


@pytest.mark.parametrize("text", ["10.0.0.0", "10.0.0.0/33", "10.0.0/8", "10.0.0.0/-1", "10.0.0.0/8/8",
                                  "1O.0.0.0/8", "10.0.0.0/\u0668", "fe80::/64%1", ":::/8", 10])
def test_bad_cidrs_are_rejected(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_cidr_sloppy(text)


@pytest.mark.parametrize(("name", "namespace", "field"), [
    ("UPPER", "a", "metadata.name"),
    ("a_b", "a", "metadata.name"),
    ("x" * 254, "a", "metadata.name"),
    ("ok", "a.b", "metadata.namespace"),  # a namespace is a label, not a subdomain
    ("ok", "n" * 64, "metadata.namespace"),
])
def test_object_names_are_validated(name: str, namespace: str, field: str) -> None:
    assert _policy_problems({"podSelector": {}}, name, namespace) == [field]


def test_pod_validation_keeps_what_it_can_and_flags_the_rest() -> None:
    body = pod("a/x", ["10.0.0.5", "nope"], {"app": "x", "bad key": "v"},
               ports=[{"name": "http", "containerPort": 80}, {"name": "Bad", "containerPort": 81},
                      {"containerPort": 0}, {"containerPort": 82, "protocol": "ICMP"}])
    issues: list[Invalid] = []
    ep = parse_pod(body, issues)
    assert [i.field for i in issues] == ["metadata.labels['bad key']", "spec.containers[0].ports[1].name",
                                         "spec.containers[0].ports[2].containerPort",
                                         "spec.containers[0].ports[3].protocol", "status.podIPs[1].ip"]
    assert ep is not None and ep.labels_invalid and dict(ep.labels) == {"app": "x"}
    assert [p.name for p in ep.ports] == ["http"] and ep.ips == (ipaddress.ip_address("10.0.0.5"),)


def test_unnamed_and_non_string_names_stay_isolated_and_logs_stay_one_line() -> None:
    unnamed = pod("a/u", "10.0.0.7", {"app": "web"})
    del unnamed["metadata"]["name"]
    numbered = pod("a/n", "10.0.0.8", {"app": "web"})
    numbered["metadata"]["name"] = 5
    liar = policy("a/x", {"podSelector": {}})
    liar["metadata"]["name"] = 'x\ny'
    program, problems = compile_docs([*WORLD, unnamed, numbered, liar])
    assert sorted(f for _, f in fields(problems)) == ["metadata.name"] * 3
    assert all("\n" not in str(p) for p in problems)
    for ip in ("10.0.0.7", "10.0.0.8"):
        assert not allowed(program, "10.0.1.1", ip)  # still endpoints, isolated by a/_invalid_…
