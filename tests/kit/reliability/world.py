"""The reliability lab's cluster as data: namespaces, pods, policies; random changes from a
seeded RNG; manifests written atomically; expected verdicts from the simulator.

Four lab pods, two per namespace. Endpoints are compiled in key order, so `alpha/*`
come first and `zeta/*` last: a large update puts hundreds of filler endpoints (`mid/*`)
between them, which makes a dataplane that switches endpoint by endpoint show any
cross-endpoint mixture.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.ir import Verdict
from agent.pipeline import DirectoryPipeline, Snapshot
from agent.query import matrix
from agent.simulate import evaluate, index_by_ip
from tests.kit.builders import dump_manifests, ns, pod, policy

NODE = "lab"
NET = "10.30.0"
LAB_PODS = {  # key -> (ip, labels, named port "http" number)
    "alpha/web": (f"{NET}.1", {"app": "web", "role": "front"}, 80),
    "alpha/db": (f"{NET}.2", {"app": "db", "role": "back"}, 81),
    "zeta/api": (f"{NET}.3", {"app": "api", "role": "front"}, 80),
    "zeta/job": (f"{NET}.4", {"app": "job", "role": "back"}, 81),
}
CHECKS = (("TCP", "80"), ("TCP", "81"), ("UDP", "80"))  # what every probe round covers
APPS = ("web", "db", "api", "job")
ROLES = ("front", "back", "batch")
TEAMS = ("red", "blue", None)

Verdicts = dict[tuple[str, str, str, int], bool]  # (src, dst, proto, port) -> allowed


def pod_doc(key: str, ip: str, labels: dict[str, str], http: int | None = None, node: str = NODE) -> dict[str, Any]:
    """A lab pod, its port `http` named "http"."""
    return pod(key, ip, labels, [{"name": "http", "containerPort": http}] if http else [], nodeName=node)


@dataclass
class World:
    ns_labels: dict[str, dict[str, str]] = field(default_factory=lambda: {"alpha": {"team": "red"},
                                                                          "zeta": {"team": "blue"}})
    pod_labels: dict[str, dict[str, str]] = field(
        default_factory=lambda: {k: dict(v[1]) for k, v in LAB_PODS.items()})
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    filler: int = 0  # filler pods (local, no namespace in the lab) and as many filler policies
    variant: int = 0  # changes every filler policy's ports: a large diff for every filler endpoint

    def docs(self) -> list[dict[str, Any]]:
        out = [ns(n, **lab) for n, lab in sorted(self.ns_labels.items())]
        out += [pod_doc(k, ip, self.pod_labels[k], http) for k, (ip, _, http) in LAB_PODS.items()]
        if self.filler:
            out.append(ns("mid", team="grey"))
            for i in range(self.filler):
                ip = f"10.31.{i // 250}.{i % 250 + 1}"
                out.append(pod_doc(f"mid/f{i:04d}", ip, {"app": f"f{i}", "role": "filler"}, 80))
                out.append(policy(f"mid/fp{i:04d}", {
                    "podSelector": {"matchLabels": {"app": f"f{i}"}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}},
                                           "podSelector": {"matchLabels": {"role": "front"}}}],
                                 "ports": [{"port": 80 + (i + self.variant) % 5}]}],
                }))
        out += [policy(k, s) for k, s in sorted(self.policies.items())]
        return out

    def copy(self) -> World:
        return copy.deepcopy(self)


def write_atomic(src: Path, docs: list[dict[str, Any]], name: str = "cluster.yaml") -> None:
    """Write then rename into place; the temporary file lives outside the watched directory."""
    src.mkdir(parents=True, exist_ok=True)
    staging = src.parent / f"{src.name}.staging"
    staging.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=staging, suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(dump_manifests(docs))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, src / name)


Directions = dict[tuple[str, str, str, int], tuple[bool, bool]]  # probe -> (egress allows, ingress allows)


def expected(src: Path) -> Verdicts:
    """`stockade matrix` for the directory (the very function the CLI prints), lab pods only."""
    return _verdicts(DirectoryPipeline(src, None, None, readonly=True).snapshot())


def expected_with_directions(src: Path) -> tuple[Verdicts, Directions]:
    """`expected` and `per_direction` of one simulator snapshot of the directory."""
    snap = DirectoryPipeline(src, None, None, readonly=True).snapshot()
    return _verdicts(snap), per_direction(snap)


def _verdicts(full: Snapshot) -> Verdicts:
    # Same program, pairs among the lab pods only (matrix() walks every endpoint pair).
    inv = dataclasses.replace(full.inventory, endpoints={k: full.inventory.endpoints[k] for k in LAB_PODS})
    snap = Snapshot(inv, full.program)
    out: Verdicts = {}
    for proto, port in CHECKS:
        m = matrix(snap, port, proto, 4)
        for s in LAB_PODS:
            for d in LAB_PODS:
                if s != d:
                    out[(s, d, proto.lower(), int(port))] = m[s][d] == "allow"
    return out


# ------------------------------------------------------------------ random policies


def _selector(rng: random.Random, keys: tuple[str, ...] = ("app", "role")) -> dict[str, Any]:
    k = rng.choice(keys)
    values = APPS if k == "app" else ROLES
    r = rng.random()
    if r < 0.2:
        return {}
    if r < 0.7:
        return {"matchLabels": {k: rng.choice(values)}}
    op = rng.choice(["In", "NotIn", "Exists", "DoesNotExist"])
    expr: dict[str, Any] = {"key": k, "operator": op}
    if op in ("In", "NotIn"):
        expr["values"] = rng.sample(values, rng.randint(1, 2))
    return {"matchExpressions": [expr]}


def _ns_selector(rng: random.Random) -> dict[str, Any]:
    r = rng.random()
    if r < 0.3:
        return {}
    if r < 0.8:
        return {"matchLabels": {"team": rng.choice(["red", "blue"])}}
    return {"matchLabels": {"kubernetes.io/metadata.name": rng.choice(["alpha", "zeta"])}}


def _peer(rng: random.Random) -> dict[str, Any]:
    r = rng.random()
    if r < 0.35:
        return {"podSelector": _selector(rng)}
    if r < 0.55:
        return {"namespaceSelector": _ns_selector(rng)}
    if r < 0.8:
        return {"namespaceSelector": _ns_selector(rng), "podSelector": _selector(rng)}
    return {"ipBlock": rng.choice([{"cidr": f"{NET}.0/30"}, {"cidr": f"{NET}.0/24", "except": [f"{NET}.2/32"]},
                                   {"cidr": "0.0.0.0/0"}, {"cidr": f"{NET}.4/32"}])}


def _ports(rng: random.Random) -> list[dict[str, Any]] | None:
    r = rng.random()
    if r < 0.25:
        return None
    choices = [{"port": 80}, {"port": 81}, {"port": 80, "protocol": "UDP"}, {"protocol": "UDP"},
               {"port": 80, "endPort": 81}, {"port": "http"}, {"port": "http", "protocol": "UDP"}]
    return rng.sample(choices, rng.randint(1, 2))


def _rule(rng: random.Random, peers_key: str) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if rng.random() < 0.8:
        rule[peers_key] = [_peer(rng) for _ in range(rng.randint(1, 2))]
    ports = _ports(rng)
    if ports is not None:
        rule["ports"] = ports
    return rule


def random_policy(rng: random.Random) -> dict[str, Any]:
    types = rng.choice([["Ingress"], ["Egress"], ["Ingress", "Egress"], None])
    spec: dict[str, Any] = {"podSelector": _selector(rng)}
    if types is not None:
        spec["policyTypes"] = types
    if types is None or "Ingress" in types:
        spec["ingress"] = [_rule(rng, "from") for _ in range(rng.randint(0, 2))]
    if types is None or "Egress" in types:
        spec["egress"] = [_rule(rng, "to") for _ in range(rng.randint(0, 2))]
    return spec


def random_world(rng: random.Random, policies: int = 4) -> World:
    w = World()
    for i in range(policies):
        w.policies[f"{rng.choice(['alpha', 'zeta'])}/p{i}"] = random_policy(rng)
    return w


_names = iter(range(10**9))


def mutate(w: World, rng: random.Random) -> str:
    """One random change in place; returns its kind."""
    kind = rng.choices(["policy_add", "policy_remove", "policy_change", "pod_labels", "namespace_labels"],
                       weights=[3, 2, 3, 3, 2])[0]
    if kind == "policy_remove" and not w.policies:
        kind = "policy_add"
    if kind == "policy_add" or (kind == "policy_change" and not w.policies):
        kind = "policy_add"
        w.policies[f"{rng.choice(['alpha', 'zeta'])}/c{next(_names)}"] = random_policy(rng)
    elif kind == "policy_remove":
        del w.policies[rng.choice(sorted(w.policies))]
    elif kind == "policy_change":
        w.policies[rng.choice(sorted(w.policies))] = random_policy(rng)
    elif kind == "pod_labels":
        key = rng.choice(sorted(w.pod_labels))
        labels = {"app": rng.choice(APPS)}
        if rng.random() < 0.8:
            labels["role"] = rng.choice(ROLES)
        w.pod_labels[key] = labels
    else:
        name = rng.choice(["alpha", "zeta"])
        team = rng.choice(TEAMS)
        w.ns_labels[name] = {"team": team} if team else {}
    return kind


# ------------------------------------------------------------------ the large update


# Isolation swapped between the first and the last lab endpoint: before, alpha/web may not
# send to zeta/job and zeta/job accepts everyone; after, alpha/web may send anywhere and
# zeta/job accepts nobody. alpha/web -> zeta/job is denied by both; a dataplane that
# switched alpha/web but not yet zeta/job would let it through.
SWAP_BEFORE = {
    "alpha/web-egress": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
                         "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}]},
    "zeta/job-ingress": {"podSelector": {"matchLabels": {"app": "job"}}, "ingress": [{}]},
}
SWAP_AFTER = {
    "alpha/web-egress": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
                         "egress": [{}]},
    "zeta/job-ingress": {"podSelector": {"matchLabels": {"app": "job"}}, "policyTypes": ["Ingress"]},
}


def base_world() -> World:
    """Allowed and denied pairs in both protocols, the swap pair included."""
    w = World()
    w.policies.update(copy.deepcopy(SWAP_BEFORE))
    w.policies["alpha/db-in"] = {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [
        {"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}], "ports": [{"port": 81}]},
        {"from": [{"podSelector": {}, "namespaceSelector": {"matchLabels": {"team": "blue"}}}],
         "ports": [{"port": 80, "protocol": "UDP"}]}]}
    w.policies["zeta/api-in"] = {"podSelector": {"matchLabels": {"app": "api"}}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"role": "front"}}, "namespaceSelector": {}}],
         "ports": [{"port": "http"}]}]}
    return w


def large_update(w: World, filler: int) -> World:
    """Hundreds of pods and policies more, and the swap."""
    big = w.copy()
    big.filler = filler
    big.variant = w.variant + 1
    big.policies.update(copy.deepcopy(SWAP_AFTER))
    return big


def per_direction(snap: Snapshot) -> Directions:
    """(source's egress allows, destination's ingress allows) for every lab probe: a dataplane
    that switches endpoint by endpoint can combine one policy's egress with the other's ingress."""
    by_ip = index_by_ip(snap.program)
    out = {}
    for proto, port in CHECKS:
        for s, (sip, _, _) in LAB_PODS.items():
            for d, (dip, _, _) in LAB_PODS.items():
                if s != d:
                    fv = evaluate(snap.program, ipaddress.ip_address(sip), ipaddress.ip_address(dip),
                                  proto.lower(), int(port), by_ip)
                    ok = [x is None or x.verdict is Verdict.ACCEPT for x in (fv.egress, fv.ingress)]
                    out[(s, d, proto.lower(), int(port))] = (ok[0], ok[1])
    return out


def cross_mixture(old: dict, new: dict, key: tuple[str, str, str, int], passed: bool) -> bool:
    """Whether a probe outcome is what one policy's egress combined with the other's ingress gives."""
    (eo, io), (en, inew) = old[key], new[key]
    mixes = {eo and inew, en and io}
    return passed in mixes
