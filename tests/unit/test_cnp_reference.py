"""Property: for generated ClusterNetworkPolicies (both tiers, every action, pod, namespace
and network peers, numbered and named ports) with and without NetworkPolicies, `matrix`
(compiler + IR + simulator) agrees with a direct reading of the API's documentation."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.query import matrix
from tests.kit.builders import BASE, pod, policy, snapshot_of

WORLD = [*BASE, pod("b/db", "10.0.1.2", {"app": "db"}, ports=[{"name": "http", "containerPort": 80}])]
PODS = {d["metadata"]["namespace"] + "/" + d["metadata"]["name"]: d for d in WORLD if d["kind"] == "Pod"}
NS_LABELS = {d["metadata"]["name"]: {**d["metadata"]["labels"], "kubernetes.io/metadata.name": d["metadata"]["name"]}
             for d in WORLD if d["kind"] == "Namespace"}
PORTS = (80, 8080, 9090)

ns_sel = st.sampled_from([{}, {"matchLabels": {"team": "red"}}, {"matchLabels": {"team": "blue"}}])
pod_sel = st.sampled_from([{}, {"matchLabels": {"app": "web"}}, {"matchLabels": {"app": "db"}},
                           {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["api"]}]}])
subject = st.one_of(st.builds(lambda n: {"namespaces": n}, ns_sel),
                    st.builds(lambda n, p: {"pods": {"namespaceSelector": n, "podSelector": p}}, ns_sel, pod_sel))
networks = st.sampled_from([["10.0.0.0/24"], ["10.0.1.2/32"], ["10.0.0.2/31", "10.0.1.0/31"]])


def peer(egress: bool) -> st.SearchStrategy[dict[str, Any]]:
    s = subject
    return st.one_of(s, st.builds(lambda n: {"networks": n}, networks)) if egress else s


protocols = st.one_of(st.none(), st.lists(st.sampled_from([
    {"tcp": {"destinationPort": {"number": 80}}}, {"tcp": {"destinationPort": {"number": 8080}}},
    {"tcp": {"destinationPort": {"range": {"start": 8000, "end": 9000}}}}, {"udp": {"destinationPort": {"number": 80}}},
    {"destinationNamedPort": "http"}]), min_size=1, max_size=2))


@st.composite
def rule(draw: st.DrawFn, egress: bool, tier: str) -> dict[str, Any]:
    actions = ["Accept", "Deny", "Pass"]
    r: dict[str, Any] = {"action": draw(st.sampled_from(actions)),
                         "to" if egress else "from": draw(st.lists(peer(egress), min_size=1, max_size=2))}
    ports = draw(protocols)
    if ports is not None:
        if any("networks" in p for p in r.get("to", [])):
            ports = [p for p in ports if "destinationNamedPort" not in p] or None
        if ports:
            r["protocols"] = ports
    return r


@st.composite
def cnp(draw: st.DrawFn, i: int) -> dict[str, Any]:
    tier = draw(st.sampled_from(["Admin", "Baseline"]))
    return {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": f"p{i}"},
            "spec": {"tier": tier, "priority": draw(st.integers(0, 3)), "subject": draw(subject),
                     "ingress": draw(st.lists(rule(False, tier), max_size=2)),
                     "egress": draw(st.lists(rule(True, tier), max_size=2))}}


NPS = [policy("a/isolate", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
       policy("b/from-red", {"podSelector": {"matchLabels": {"app": "db"}},
                             "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}]})]


# ------------------------------------------------------------------ the reference, from the API text


def labels_match(sel: dict[str, Any], labels: dict[str, str]) -> bool:
    ok = all(labels.get(k) == v for k, v in sel.get("matchLabels", {}).items())
    for e in sel.get("matchExpressions", []):
        ok = ok and labels.get(e["key"]) not in e["values"]  # NotIn only
    return ok


def selects(s: dict[str, Any], key: str) -> bool:
    ns, _ = key.split("/")
    p = PODS[key]
    if "namespaces" in s:
        return labels_match(s["namespaces"], NS_LABELS[ns])
    return labels_match(s["pods"]["namespaceSelector"], NS_LABELS[ns]) and \
        labels_match(s["pods"]["podSelector"], p["metadata"]["labels"])


def ip(key: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(PODS[key]["status"]["podIP"])


def peer_matches(pe: dict[str, Any], key: str) -> bool:
    if "networks" in pe:
        return any(ip(key) in ipaddress.ip_network(n) for n in pe["networks"])
    return selects(pe, key)


def port_matches(protos: list[dict[str, Any]] | None, dst: str, port: int) -> bool:
    if protos is None:
        return True
    for p in protos:
        if "tcp" in p:
            d = p["tcp"]["destinationPort"]
            if d.get("number") == port or ("range" in d and d["range"]["start"] <= port <= d["range"]["end"]):
                return True
        elif "destinationNamedPort" in p:
            for c in PODS[dst]["spec"]["containers"][0]["ports"]:
                if c["name"] == p["destinationNamedPort"] and c.get("protocol", "TCP") == "TCP" and \
                        c["containerPort"] == port:
                    return True
    return False


def np_verdict(nps: list[dict[str, Any]], subject_key: str, peer_key: str, egress: bool) -> bool | None:
    """NetworkPolicy tier for the two policies above: None when it does not select the pod."""
    ns, _ = subject_key.split("/")
    if ns == "a" and any(p["metadata"]["name"] == "isolate" for p in nps):
        return False
    if not egress and subject_key == "b/db" and any(p["metadata"]["name"] == "from-red" for p in nps):
        return peer_key.startswith("a/")
    return None


def side(cnps: list[dict[str, Any]], nps: list[dict[str, Any]], subject_key: str, peer_key: str,
         egress: bool, port: int) -> bool:
    dst = peer_key if egress else subject_key
    direction = "egress" if egress else "ingress"
    for tier in ("Admin", "NetworkPolicy", "Baseline"):
        if tier == "NetworkPolicy":
            v = np_verdict(nps, subject_key, peer_key, egress)
            if v is not None:
                return v
            continue
        pols = sorted((c for c in cnps if c["spec"]["tier"] == tier),
                      key=lambda c: (c["spec"]["priority"], c["metadata"]["name"]))
        passed = False
        for c in pols:
            if passed or not selects(c["spec"]["subject"], subject_key):
                continue
            for r in c["spec"][direction]:
                peers = r["to" if egress else "from"]
                if any(peer_matches(pe, peer_key) for pe in peers) and port_matches(r.get("protocols"), dst, port):
                    if r["action"] == "Pass":
                        if tier == "Baseline":
                            return True
                        passed = True
                        break
                    return r["action"] == "Accept"
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(*(cnp(i) for i in range(n)))),
       st.lists(st.sampled_from(NPS), unique_by=lambda p: p["metadata"]["name"]))
def test_matrix_agrees_with_the_api_reading(cnps: tuple[dict[str, Any], ...], nps: list[dict[str, Any]]) -> None:
    s = snapshot_of([*WORLD, *nps, *cnps])
    assert not s.problems, [str(p) for p in s.problems]
    for port in PORTS:
        m = matrix(s, str(port), "TCP", None)
        for src in PODS:
            for dst in PODS:
                if src == dst:
                    continue
                want = side(list(cnps), nps, src, dst, True, port) and side(list(cnps), nps, dst, src, False, port)
                assert m[src][dst] == ("allow" if want else "deny"), (src, dst, port)
