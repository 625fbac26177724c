"""Per-event compile time with ClusterNetworkPolicies present: full compile vs the incremental one.

    python -m bench.cnp_incremental [--size 10k] [--cnps 20] [--events 15] [--node bench-node]

A synthetic cluster (tests/kit/generate.py) plus Node objects and `--cnps` cluster policies
(Admin and Baseline ClusterNetworkPolicies, an AdminNetworkPolicy; namespaces, pods,
networks and nodes peers, named ports). Each event kind (pod added, pod relabelled,
NetworkPolicy changed, namespace relabelled, Node relabelled, cluster policy changed) is
applied `--events` times, and each state compiled twice: by `compile_inventory` (what the
incremental compiler fell back to whenever a cluster policy was present) and by one
`IncrementalCompiler` kept across the run; the two results are checked equal. Admission
(kubernetes_inventory) is not timed: it is the same for both. Reports medians in ms of
process CPU time; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from typing import Any

from agent.admission import LastGood, kubernetes_inventory
from agent.inventory import Inventory
from agent.policy.kubernetes import compile_inventory
from agent.policy.kubernetes.incremental import IncrementalCompiler
from agent.sources.kubeobjects import RawObject, ref_of
from tests.kit.generate import LOCAL_NODE, SIZES, TEAMS, generate

SOURCE = "bench"
KINDS = ("pod_added", "pod_labels", "policy_changed", "namespace_labels", "node_labels", "cnp_changed")


def node(i: int, role: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node-{i:03d}", "labels": {"role": role}},
            "status": {"addresses": [{"type": "InternalIP", "address": f"172.16.{i // 250}.{i % 250 + 1}"}]}}


def cnp(i: int) -> dict[str, Any]:
    """The i-th cluster policy of a realistic mix."""
    team = TEAMS[i % len(TEAMS)]
    v2, kinds = "policy.networking.k8s.io/v1alpha2", "ClusterNetworkPolicy"
    if i % 4 == 0:  # Admin: a team's namespaces refuse dev, pass monitoring on
        spec = {"tier": "Admin", "priority": i, "subject": {"namespaces": {"matchLabels": {"team": team}}},
                "ingress": [{"name": "mon", "action": "Pass", "from": [{"namespaces": {"matchLabels": {
                    "kubernetes.io/metadata.name": "monitoring"}}}]},
                            {"name": "no-dev", "action": "Deny", "from": [{"namespaces": {"matchLabels": {
                                "env": "dev"}}}]}]}
    elif i % 4 == 1:  # Admin: databases talk only to backends (named port), never to the metadata range
        spec = {"tier": "Admin", "priority": i, "subject": {"pods": {"namespaceSelector": {"matchLabels": {
            "team": team}}, "podSelector": {"matchLabels": {"role": "db"}}}},
                "egress": [{"name": "backends", "action": "Accept", "protocols": [{"destinationNamedPort": "grpc"}],
                            "to": [{"pods": {"namespaceSelector": {"matchLabels": {"team": team}},
                                             "podSelector": {"matchLabels": {"role": "backend"}}}}]},
                           {"name": "meta", "action": "Deny", "to": [{"networks": ["169.254.0.0/16"]}]}]}
    elif i % 4 == 2:  # Baseline: prod namespaces closed to other namespaces, control nodes unreachable
        spec = {"tier": "Baseline", "priority": i, "subject": {"namespaces": {"matchLabels": {"env": "prod"}}},
                "ingress": [{"name": "others", "action": "Deny", "from": [{"namespaces": {}}]}],
                "egress": [{"name": "control", "action": "Deny", "to": [{"nodes": {"matchLabels": {
                    "role": "control"}}}]}]}
    else:  # v1alpha1 AdminNetworkPolicy: frontends reach every node's kubelet port
        return {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
                "metadata": {"name": f"anp-{i}"},
                "spec": {"priority": 50 + i,
                         "subject": {"pods": {"namespaceSelector": {},
                                              "podSelector": {"matchLabels": {"role": "frontend"}}}},
                         "egress": [{"name": "kubelet", "action": "Allow", "to": [{"nodes": {}}],
                                     "ports": [{"portNumber": {"protocol": "TCP", "port": 10250}}]}]}}
    return {"apiVersion": v2, "kind": kinds, "metadata": {"name": f"cnp-{i}"}, "spec": spec}


class World:
    def __init__(self, size: str, cnps: int, seed: int) -> None:
        pods, pols = SIZES[size]
        self.cl = generate(pods, pols, seed)
        self.nodes = [node(i, "control" if i < 3 else "worker") for i in range(100)]
        self.cnps = [cnp(i) for i in range(cnps)]
        self.raw: dict[tuple[str, str, str], RawObject] = {}
        for body in [*self.cl.objects(), *self.nodes, *self.cnps]:
            self.put(body)
        self.store = LastGood()
        self.rng = random.Random(seed)

    def put(self, body: dict[str, Any]) -> None:
        obj = RawObject(ref_of(body, SOURCE), body)
        self.raw[(obj.ref.kind, obj.ref.namespace, obj.ref.name)] = obj

    def inventory(self) -> Inventory:
        return kubernetes_inventory(list(self.raw.values()), self.store)

    def event(self, kind: str) -> None:
        cl, rng = self.cl, self.rng
        if kind == "pod_added":
            body = cl.new_pod(local=rng.random() < 0.5)
            cl.pod_objs.append(body)
        elif kind == "pod_labels":
            j = rng.randrange(len(cl.pod_objs))
            body = cl.pod_objs[j] = cl.relabel_pod(cl.pod_objs[j])
        elif kind == "policy_changed":
            j = rng.randrange(len(cl.policy_objs))
            body = cl.policy_objs[j] = cl.change_policy(cl.policy_objs[j])
        elif kind == "namespace_labels":
            j = rng.randrange(len(cl.namespaces))
            body = cl.namespaces[j] = cl.relabel_namespace(cl.namespaces[j])
        elif kind == "node_labels":
            j = rng.randrange(len(self.nodes))
            body = self.nodes[j] = copy.deepcopy(self.nodes[j])
            labels = body["metadata"]["labels"]
            labels["role"] = "worker" if labels["role"] == "control" else "control"
        else:
            j = rng.randrange(len(self.cnps))
            body = self.cnps[j] = copy.deepcopy(self.cnps[j])
            body["spec"]["priority"] += 100
        self.put(body)


def cpu_ms(fn: Any) -> tuple[float, Any]:
    c0 = time.process_time()
    out = fn()
    return (time.process_time() - c0) * 1000, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="10k", choices=sorted(SIZES))
    ap.add_argument("--cnps", type=int, default=20)
    ap.add_argument("--events", type=int, default=15)
    ap.add_argument("--node", default=LOCAL_NODE, help="'' for every node")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    node = args.node or None
    w = World(args.size, args.cnps, args.seed)
    inc = IncrementalCompiler(node, SOURCE)
    inv = w.inventory()
    cold_full, want = cpu_ms(lambda: compile_inventory(inv, node, source=SOURCE))
    cold_inc, got = cpu_ms(lambda: inc.compile(inv))
    assert got == want
    out: dict[str, Any] = {"size": args.size, "cnps": args.cnps, "node": node, "endpoints": len(want.endpoints),
                           "cold_ms": {"full": round(cold_full, 1), "incremental": round(cold_inc, 1)}, "events": {}}
    for kind in KINDS:
        full, incr, how = [], [], []
        for _ in range(args.events):
            w.event(kind)
            inv = w.inventory()
            t_inc, got = cpu_ms(lambda inv=inv: inc.compile(inv))
            t_full, want = cpu_ms(lambda inv=inv: compile_inventory(inv, node, source=SOURCE))
            assert got == want, kind
            full.append(t_full)
            incr.append(t_inc)
            how.append(inc.stats.tiers or ("full" if inc.stats.full else ""))
        out["events"][kind] = {"full_ms": round(statistics.median(full), 1),
                               "incremental_ms": round(statistics.median(incr), 1),
                               "incremental_max_ms": round(max(incr), 1), "tiers": sorted(set(how))}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
