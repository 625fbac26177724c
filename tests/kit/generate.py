"""Seeded synthetic clusters: Namespaces, Pods and NetworkPolicies as Kubernetes manifests.

Built with tests/kit/builders.py (what the directory and API sources deliver).
A cluster of P pods and K policies over N namespaces:

- namespaces carry `team`, `env` and (some) `monitoring` labels; one `kube-system`
  and one `monitoring` namespace exist in every cluster;
- pods carry `app`, `role`, `version` labels and container ports with names
  (`http`, `metrics`, `grpc`; numbers differ per app so named ports resolve to
  several numbers); 10 % of the pods (at most 250) run on the local node
  `Cluster.node`; every other namespace is dual-stack (IPv4 + IPv6);
- per namespace, in this order until K policies exist: a default deny (ingress, or
  ingress+egress with a DNS allow), label-selected allows (podSelector peers, named
  ports), namespaceSelector peers (alone or AND'd with a podSelector, with
  matchExpressions), ipBlocks with excepts (IPv4 and IPv6), endPort ranges, a
  monitoring scrape allow on the named port `metrics`.

`Cluster.new_pod`, `relabel_pod`, `change_policy` and `relabel_namespace` produce the
incremental events the benchmark times, also seeded.
"""

from __future__ import annotations

import copy
import ipaddress
import random
from dataclasses import dataclass, field
from typing import Any

from tests.kit import builders

LOCAL_NODE = "bench-node"
LOCAL_SHARE = 0.10
LOCAL_CAP = 250
PODS_PER_NODE = 110

# (pods, policies) by size name
SIZES: dict[str, tuple[int, int]] = {"1k": (1000, 100), "10k": (10_000, 1000), "50k": (50_000, 5000)}

TEAMS = ("payments", "search", "identity", "storage", "frontend", "data", "ml", "ops")
ENVS = ("prod", "staging", "dev")
ROLES = ("frontend", "backend", "db", "cache", "worker")
APPS_PER_NS = 8
V4_BASE = int(ipaddress.IPv4Address("10.0.0.0"))  # pod addresses: 10.0.0.0/12 and up
V6_BASE = int(ipaddress.IPv6Address("fd00:10::"))


@dataclass
class Cluster:
    seed: int
    pods: int
    policies: int
    namespaces: list[dict[str, Any]] = field(default_factory=list)
    pod_objs: list[dict[str, Any]] = field(default_factory=list)
    policy_objs: list[dict[str, Any]] = field(default_factory=list)
    node: str = LOCAL_NODE
    _next_pod: int = 0
    _rng: random.Random | None = None

    def objects(self) -> list[dict[str, Any]]:
        """Every manifest: namespaces, then pods, then policies."""
        return [*self.namespaces, *self.pod_objs, *self.policy_objs]

    @property
    def local_pods(self) -> list[dict[str, Any]]:
        return [p for p in self.pod_objs if p["spec"]["nodeName"] == self.node]

    @property
    def rng(self) -> random.Random:
        if self._rng is None:
            self._rng = random.Random(self.seed * 7919 + 1)
        return self._rng

    # ------------------------------------------------------------ incremental events
    # Each returns a manifest: a changed copy of an existing object, or a new one; the
    # caller decides how to feed it to the pipeline.

    def new_pod(self, local: bool = True) -> dict[str, Any]:
        """One more pod (on the local node by default), like a scale-up."""
        ns = self.rng.choice(self.namespaces)["metadata"]["name"]
        idx = len(self.namespaces)  # any stable namespace index for the address family choice
        return _make_pod(self.rng, ns, self._take_index(), dual=idx % 2 == 0,
                         node=self.node if local else "node-remote", apps=APPS_PER_NS)

    def _take_index(self) -> int:
        i = self._next_pod
        self._next_pod += 1
        return i

    def relabel_pod(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The pod with its `role` changed (moves it in and out of selectors)."""
        out = copy.deepcopy(pod)
        labels = out["metadata"]["labels"]
        labels["role"] = self.rng.choice([r for r in ROLES if r != labels.get("role")])
        return out

    def change_policy(self, pol: dict[str, Any]) -> dict[str, Any]:
        """The policy with one more allowed TCP port in its first rule (or a new rule)."""
        out = copy.deepcopy(pol)
        spec = out["spec"]
        key = "ingress" if "Ingress" in spec.get("policyTypes", ["Ingress"]) else "egress"
        rules = spec.setdefault(key, [])
        port = {"protocol": "TCP", "port": self.rng.randint(1024, 65000)}
        if rules and rules[0].get("ports"):
            rules[0]["ports"] = [*rules[0]["ports"], port]
        else:
            rules.append({"ports": [port]})
        return out

    def relabel_namespace(self, ns: dict[str, Any]) -> dict[str, Any]:
        """The namespace with its `team` label changed (namespaceSelector peers move)."""
        out = copy.deepcopy(ns)
        labels = out["metadata"]["labels"]
        if "team" in labels:
            labels["team"] = self.rng.choice([t for t in TEAMS if t != labels["team"]])
        return out


def _ips(i: int, dual: bool) -> list[str]:
    v4 = str(ipaddress.IPv4Address(V4_BASE + 2 + i * 2))  # never adjacent: no collapsing
    if not dual:
        return [v4]
    return [v4, str(ipaddress.IPv6Address(V6_BASE + 2 + i * 2))]


def _make_pod(rng: random.Random, ns: str, i: int, dual: bool, node: str, apps: int) -> dict[str, Any]:
    app_n = rng.randrange(apps)
    app = f"app{app_n}"
    role = ROLES[app_n % len(ROLES)] if rng.random() < 0.8 else rng.choice(ROLES)
    ports = [
        {"name": "http", "containerPort": 8080 + app_n % 3, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
    ]
    if app_n % 2:
        ports.append({"name": "grpc", "containerPort": 9000 + app_n % 4, "protocol": "TCP"})
    if app_n % 4 == 3:
        ports.append({"name": "dns", "containerPort": 53, "protocol": "UDP"})
    labels = {"app": app, "role": role, "version": f"v{rng.randint(1, 3)}"}
    return builders.pod(f"{ns}/{app}-{i:06d}", _ips(i, dual), labels, ports, nodeName=node)


def _policies_for(rng: random.Random, ns: str, ns_index: int, n_ns: int) -> list[dict[str, Any]]:
    """The policies of one namespace in the order they are taken (realistic mix)."""
    out: list[dict[str, Any]] = []
    egress_deny = ns_index % 3 == 0
    if egress_deny:
        out.append(builders.policy(f"{ns}/default-deny", {
            "podSelector": {}, "policyTypes": ["Ingress", "Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
                                                                       "kube-system"}}}],
                        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}],
        }))
    else:
        out.append(builders.policy(f"{ns}/default-deny", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    # label-selected allows with named ports: role tiers
    for a in range(APPS_PER_NS):
        app = f"app{a}"
        out.append(builders.policy(f"{ns}/allow-{app}-from-frontend", {
            "podSelector": {"matchLabels": {"app": app}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                         "ports": [{"port": "http"}, {"port": "grpc"}]}],
        }))
        kind = (ns_index + a) % 4
        if kind == 0:  # namespaceSelector peers AND'd with a podSelector, matchExpressions
            team = rng.choice(TEAMS)
            out.append(builders.policy(f"{ns}/allow-{app}-team-{team}", {
                "podSelector": {"matchLabels": {"app": app}},
                "ingress": [{"from": [{
                    "namespaceSelector": {"matchLabels": {"team": team},
                                          "matchExpressions": [{"key": "env", "operator": "In",
                                                                "values": ["prod", "staging"]}]},
                    "podSelector": {"matchExpressions": [{"key": "role", "operator": "NotIn",
                                                          "values": ["db"]}]},
                }], "ports": [{"port": "http"}]}],
            }))
        elif kind == 1:  # ipBlocks with excepts, both families
            octet = rng.randrange(1, 250)
            out.append(builders.policy(f"{ns}/allow-{app}-external", {
                "podSelector": {"matchLabels": {"app": app}},
                "ingress": [{"from": [
                    {"ipBlock": {"cidr": f"172.{16 + octet % 16}.0.0/16",
                                 "except": [f"172.{16 + octet % 16}.{octet}.0/24"]}},
                    {"ipBlock": {"cidr": "2001:db8::/32", "except": [f"2001:db8:{octet:x}::/48"]}},
                ], "ports": [{"protocol": "TCP", "port": 443}]}],
            }))
        elif kind == 2:  # endPort ranges from a whole namespace by label
            out.append(builders.policy(f"{ns}/allow-{app}-ephemeral", {
                "podSelector": {"matchLabels": {"app": app}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": rng.choice(ENVS)}}}],
                             "ports": [{"protocol": "TCP", "port": 30000, "endPort": 32767},
                                       {"protocol": "UDP", "port": 5000, "endPort": 5100}]}],
            }))
        else:  # egress to a peer app in another namespace, plus a broad ipBlock egress
            other = f"ns{(ns_index + 1 + a) % n_ns:04d}"
            out.append(builders.policy(f"{ns}/egress-{app}", {
                "podSelector": {"matchLabels": {"app": app}},
                "policyTypes": ["Egress"],
                "egress": [
                    {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": other}},
                             "podSelector": {"matchLabels": {"role": "backend"}}}],
                     "ports": [{"port": "http"}]},
                    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32",
                                                                         "10.0.0.0/8"]}}],
                     "ports": [{"protocol": "TCP", "port": 443}]},
                ],
            }))
    out.append(builders.policy(f"{ns}/allow-monitoring", {
        "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"monitoring": "true"}}}],
                     "ports": [{"port": "metrics"}]}],
    }))
    return out


def generate(pods: int, policies: int, seed: int = 1) -> Cluster:
    """A seeded synthetic cluster; the same arguments always give the same manifests."""
    rng = random.Random(seed)
    n_ns = max(4, pods // 100)
    cl = Cluster(seed=seed, pods=pods, policies=policies)
    names = ["kube-system", "monitoring"] + [f"ns{i:04d}" for i in range(n_ns - 2)]
    for i, name in enumerate(names):
        labels = {"team": TEAMS[i % len(TEAMS)], "env": ENVS[rng.randrange(len(ENVS))]}
        if name == "monitoring":
            labels["monitoring"] = "true"
        cl.namespaces.append(builders.ns(name, **labels))
    local = min(LOCAL_CAP, int(pods * LOCAL_SHARE))
    remote_nodes = max(1, (pods - local) // PODS_PER_NODE)
    local_slots = set(rng.sample(range(pods), local))
    for i in range(pods):
        ns_i = rng.randrange(n_ns)
        node = LOCAL_NODE if i in local_slots else f"node-{rng.randrange(remote_nodes):04d}"
        cl.pod_objs.append(_make_pod(rng, names[ns_i], i, dual=ns_i % 2 == 0, node=node, apps=APPS_PER_NS))
    cl._next_pod = pods
    # policies: round-robin over namespaces, each namespace's list in order
    per_ns = [_policies_for(rng, n, i, n_ns) for i, n in enumerate(names)]
    depth = 0
    while len(cl.policy_objs) < policies and depth < max(len(p) for p in per_ns):
        for lst in per_ns:
            if depth < len(lst) and len(cl.policy_objs) < policies:
                cl.policy_objs.append(lst[depth])
        depth += 1
    return cl


def peer_block_addresses(n: int, base: str = "100.64.0.0") -> list[str]:
    """n distinct /32s that never collapse into a shorter prefix (every other address)."""
    start = int(ipaddress.IPv4Address(base))
    return [f"{ipaddress.IPv4Address(start + 1 + 2 * i)}/32" for i in range(n)]


# The datapath benchmark's two pods and ports.
CLIENT_IP, SERVER_IP = "10.99.0.1", "10.99.0.2"
IPERF_PORT, CRR_PORT, RR_PORT = 5201, 7000, 7001


def datapath_manifests(peers: int) -> list[dict[str, Any]]:
    """The lab's two pods and (peers > 0) the server's policy with `peers` extra /32s."""
    objs = [
        builders.ns("bench", team="bench"),
        builders.pod("bench/client", [CLIENT_IP], {"app": "client"}, [], nodeName=LOCAL_NODE),
        builders.pod("bench/server", [SERVER_IP], {"app": "server"},
            [{"name": "iperf", "containerPort": IPERF_PORT, "protocol": "TCP"}], nodeName=LOCAL_NODE),
    ]
    if peers:
        blocks = [{"ipBlock": {"cidr": c}} for c in peer_block_addresses(peers)]
        objs.append(builders.policy("bench/server-allow", {
            "podSelector": {"matchLabels": {"app": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": "client"}}}, *blocks],
                "ports": [{"protocol": "TCP", "port": "iperf"},
                          {"protocol": "TCP", "port": CRR_PORT, "endPort": RR_PORT},
                          {"protocol": "UDP", "port": IPERF_PORT}],
            }],
        }))
    return objs
