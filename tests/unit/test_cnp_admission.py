"""Admission of ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy and Node:
cluster-scoped references, last good versions, fail-closed readings, field paths."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

from agent.admission import LastGood, kubernetes_inventory
from agent.inventory import ObjectRef
from agent.ir import Verdict
from agent.pipeline import Snapshot, compile_kubernetes
from agent.policy.cluster import ClusterPolicy
from agent.simulate import evaluate
from agent.sources.kubeobjects import RawObject, ref_of
from tests.kit.builders import BASE, policy, snapshot_of

WEB, CLI = "10.0.0.1", "10.0.1.1"
BLUE = {"namespaces": {"matchLabels": {"team": "blue"}}}
ISOLATE_NP = policy("a/isolate", {"podSelector": {}, "policyTypes": ["Ingress"]})


def accept_blue(name: str = "open", kind: str = "ClusterNetworkPolicy") -> dict[str, Any]:
    spec: dict[str, Any] = {"subject": {"namespaces": {"matchLabels": {"team": "red"}}},
                            "ingress": [{"action": "Accept" if kind == "ClusterNetworkPolicy" else "Allow",
                                         "from": [copy.deepcopy(BLUE)]}]}
    if kind == "ClusterNetworkPolicy":
        spec.update(tier="Admin", priority=1)
    elif kind == "AdminNetworkPolicy":
        spec["priority"] = 1
    version = "v1alpha2" if kind == "ClusterNetworkPolicy" else "v1alpha1"
    return {"apiVersion": f"policy.networking.k8s.io/{version}", "kind": kind, "metadata": {"name": name},
            "spec": spec}


def node(name: str, labels: Any, addresses: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "status": {"addresses": addresses}}


def objects(docs: list[dict[str, Any]]) -> list[RawObject]:
    return [RawObject(ref_of(d, "file", "test"), d) for d in docs]


def allowed(s: Snapshot, src: str, dst: str, port: int = 80) -> bool:
    fv = evaluate(s.program, ipaddress.ip_address(src), ipaddress.ip_address(dst), "tcp", port)
    return fv.verdict is Verdict.ACCEPT


def fields(s: Snapshot) -> set[str]:
    return {p.field for p in s.problems}


def test_cluster_kinds_are_cluster_scoped_whatever_the_reference_says() -> None:
    docs = [accept_blue("c"), accept_blue("a", "AdminNetworkPolicy"),
            accept_blue("default", "BaselineAdminNetworkPolicy")]
    s = snapshot_of([*BASE, *docs])  # ref_of gives them namespace "default" today
    assert not s.problems
    keys = {k for k in s.inventory.policies if k[0] != "NetworkPolicy"}
    assert keys == {("ClusterNetworkPolicy", "", "c"), ("AdminNetworkPolicy", "", "a"),
                    ("BaselineAdminNetworkPolicy", "", "default")}
    assert all(isinstance(s.inventory.policies[k].parsed, ClusterPolicy) for k in keys)
    # A source that already says "" gives the same keys.
    raw = [RawObject(ObjectRef(d["kind"], "", d["metadata"]["name"], "file"), d) for d in docs]
    inv = kubernetes_inventory(raw, LastGood())
    assert {k for k in inv.policies} == keys


def test_node_addresses_and_labels() -> None:
    docs = [node("n1", {"role": "worker"}, [
        {"type": "InternalIP", "address": "192.168.0.1"}, {"type": "ExternalIP", "address": "2001:db8::1"},
        {"type": "Hostname", "address": "n1.example"}, {"type": "InternalIP", "address": "192.168.0.1"}])]
    s = snapshot_of(docs)
    assert not s.problems
    n = s.inventory.nodes["n1"]
    assert n.ips == (ipaddress.ip_address("192.168.0.1"), ipaddress.ip_address("2001:db8::1"))
    assert dict(n.labels) == {"role": "worker"} and not n.labels_invalid


def test_node_with_bad_labels_or_addresses_is_reported_and_fails_closed() -> None:
    s = snapshot_of([node("n1", {"role": "worker", "bad key": "x"},
                          [{"type": "InternalIP", "address": "192.168.0.300"},
                           {"type": "InternalIP", "address": "192.168.0.2"}]),
                     node("n2", {}, "nope")])
    assert {"metadata.labels['bad key']", "status.addresses[0].address", "status.addresses"} <= fields(s)
    n1 = s.inventory.nodes["n1"]
    assert n1.labels_invalid and n1.ips == (ipaddress.ip_address("192.168.0.2"),)
    assert s.inventory.nodes["n2"].ips == ()


def test_node_with_bad_labels_is_matched_by_deny_not_accept() -> None:
    bad = node("n1", {"role": "worker", "bad key": "x"}, [{"type": "InternalIP", "address": "192.168.0.1"}])
    sel = {"nodes": {"matchLabels": {"role": "worker"}}}
    base = {"subject": {"namespaces": {}}, "tier": "Admin", "priority": 1}
    acc = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": "acc"}, "spec": {**base, "egress": [
               {"action": "Accept", "to": [sel]}, {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}]}}
    s = snapshot_of([*BASE, bad, acc])
    assert not allowed(s, WEB, "192.168.0.1")
    deny = copy.deepcopy(acc)
    deny["spec"]["egress"] = [{"action": "Deny", "to": [sel]}]
    s = snapshot_of([*BASE, bad, deny])
    assert not allowed(s, WEB, "192.168.0.1")
    assert allowed(s, WEB, "192.168.0.9")


def test_last_good_version_stays_in_force(tmp_path: Path) -> None:
    state = tmp_path / "last-good.json"
    good = accept_blue()
    s = compile_kubernetes(objects([*BASE, ISOLATE_NP, good]), LastGood(state), None, "file")
    assert not s.problems and allowed(s, CLI, WEB)
    bad = copy.deepcopy(good)
    bad["spec"]["ingress"][0]["from"][0] = {}  # an empty peer: the Accept would match nothing
    bad["spec"]["priority"] = -1
    for store in (LastGood(state), LastGood(state)):  # also in a new process, from the state file
        s = compile_kubernetes(objects([*BASE, ISOLATE_NP, bad]), store, None, "file")
        assert {"spec.ingress[0].from[0]", "spec.priority"} <= fields(s)
        assert allowed(s, CLI, WEB)  # the last good version
    # Without a last good version the invalid one is read fail-closed.
    s = compile_kubernetes(objects([*BASE, ISOLATE_NP, bad]), LastGood(), None, "file")
    assert not allowed(s, CLI, WEB)


def test_a_broken_deny_without_last_good_denies_everything_that_way() -> None:
    bad = accept_blue()
    bad["spec"]["ingress"] = [{"action": "Deny", "from": [{"namespaces": {"matchLabels": 0}}]}]
    s = snapshot_of([*BASE, bad])
    assert "spec.ingress[0].from[0].namespaces.matchLabels" in fields(s)
    assert not allowed(s, "10.0.0.2", WEB) and not allowed(s, CLI, WEB)
    assert allowed(s, WEB, CLI)  # b is no subject


def test_unreadable_spec_and_bad_name() -> None:
    s = snapshot_of([*BASE, {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
                             "metadata": {"name": "Bad_Name"}, "spec": 7}])
    assert {"metadata.name", "spec"} <= fields(s)
    assert allowed(s, CLI, WEB)  # no rules: nothing allowed or denied by it
    (raw,) = (v for k, v in s.inventory.policies.items() if k[0] == "ClusterNetworkPolicy")
    assert raw.parsed.name.startswith("_invalid_")


def test_baseline_admin_network_policy_must_be_named_default() -> None:
    s = snapshot_of([*BASE, ISOLATE_NP, accept_blue("other", "BaselineAdminNetworkPolicy")])
    assert "metadata.name" in fields(s)
    assert not allowed(s, CLI, WEB)
    s = snapshot_of([*BASE, accept_blue("default", "BaselineAdminNetworkPolicy")])
    assert not s.problems


def test_v1alpha1_field_paths() -> None:
    anp = accept_blue("a", "AdminNetworkPolicy")
    anp["spec"]["ingress"][0]["ports"] = [{"portNumber": {"protocol": "ICMP", "port": 80}},
                                          {"portRange": {"start": 9, "end": 8}}]
    s = snapshot_of([*BASE, anp])
    assert "spec.ingress[0].ports[0].portNumber.protocol" in fields(s)
    anp["spec"]["ingress"][0]["ports"] = [{"portRange": {"start": 9, "end": 8}}]
    assert "spec.ingress[0].ports[0].portRange" in fields(snapshot_of([*BASE, anp]))
    anp["spec"]["ingress"][0]["action"] = "Accept"  # a v1alpha2 word: unknown in v1alpha1
    assert "spec.ingress[0].action" in fields(snapshot_of([*BASE, anp]))


def test_kinds_no_semantics_reads_are_not_admitted() -> None:
    """A StatefulSet beside the policies (snapshot_of does not filter kinds) is not read as a
    NetworkPolicy: without a podSelector that would isolate its whole namespace."""
    sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "x", "namespace": "a"},
           "spec": {"selector": {"matchLabels": {"app": "x"}}}}
    s = snapshot_of([*BASE, sts])
    assert not s.problems and not s.inventory.policies
    assert allowed(s, CLI, WEB)
