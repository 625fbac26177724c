"""ClusterNetworkPolicy conformance cases (tests/data/cnp) as manifests, steps and probes.

A case starts from the cluster (`cluster.yaml`) plus its upstream manifests and/or inline
`objects`; each step applies its `mutate` operations to the previous step's state (upstream
patches objects and never restores them within a test) and lists probes
"allow|deny SRC -> DST proto/port [v4|v6]" (pod names; DST may be a hostNetwork pod, whose
address is its node's). The data is IPv4; `to_v6` maps 10.30.x.y into fd00:30::/96 so every
case also runs on IPv6, and `to_dual` adds those twins next to the IPv4 addresses so it runs
dual-stack (a probe marked v4 or v6 runs in that family only).
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from agent.pipeline import Snapshot
from agent.query import explain, matrix
from tests.kit.builders import dump_manifests, snapshot_of

DATA = Path(__file__).resolve().parents[1] / "data" / "cnp"
HOST_NETWORK_PORT_START = 34345  # upstream's default HostNetworkPortRangeStart
V6_BASE = int(ipaddress.IPv6Address("fd00:30::"))
_V4 = re.compile(r"^(10\.30\.\d+\.\d+)(/\d+)?$")
_TEMPLATE = re.compile(r"\{\{\s*index\s+\.HostNetworkPorts\s+(\d+)\s*\}\}")
_PROBE = re.compile(r"^(allow|deny)\s+(\S+)\s*->\s*(\S+)\s+(tcp|udp|sctp)/(\d+)(?:\s+(v4|v6))?$")
_POD_REF = re.compile(r"^@([a-z0-9-]+)(/\d+)?$")


@dataclass(frozen=True)
class Probe:
    verdict: str  # allow | deny
    src: str  # pod name (unique across the cluster)
    dst: str  # pod name; a hostNetwork pod stands for its node's address
    protocol: str  # TCP | UDP | SCTP
    port: int
    family: int | None  # None: both

    def __str__(self) -> str:
        return f"{self.verdict} {self.src} -> {self.dst} {self.protocol}/{self.port}"


def parse_probe(line: str) -> Probe:
    m = _PROBE.match(line.strip())
    if not m:
        raise ValueError(f"bad probe line {line!r}")
    fam = {"v4": 4, "v6": 6, None: None}[m.group(6)]
    return Probe(m.group(1), m.group(2), m.group(3), m.group(4).upper(), int(m.group(5)), fam)


def render(text: str) -> str:
    """Upstream's manifest templates with its default host-network port range."""
    return _TEMPLATE.sub(lambda m: str(HOST_NETWORK_PORT_START + int(m.group(1))), text)


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render(text)) if d]


def load_cluster() -> list[dict[str, Any]]:
    return _docs((DATA / "cluster.yaml").read_text())


def load_manifest(rel: str) -> list[dict[str, Any]]:
    return _docs((DATA / "upstream" / rel).read_text())


def load_cases() -> list[dict[str, Any]]:
    """Upstream cases (`origin: upstream`) then our own (`origin: own`)."""
    out = []
    for fname, origin in (("cases.yaml", "upstream"), ("own.yaml", "own")):
        for case in yaml.safe_load((DATA / fname).read_text()):
            out.append({**case, "origin": origin})
    return out


def _v6(text: str) -> str:
    m = _V4.match(text)
    if not m:
        return text
    addr = ipaddress.IPv6Address(V6_BASE + int(ipaddress.IPv4Address(m.group(1))))
    return f"{addr}/{int(m.group(2)[1:]) + 96}" if m.group(2) else str(addr)


def to_v6(obj: Any) -> Any:
    """Deep copy with every lab IPv4 address or CIDR replaced by its IPv6 twin."""
    if isinstance(obj, dict):
        return {k: to_v6(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_v6(v) for v in obj]
    return _v6(obj) if isinstance(obj, str) else obj


def to_dual(obj: Any) -> Any:
    """Deep copy, dual-stack: each lab IPv4 address or CIDR in a list (podIPs, node addresses,
    `networks`) is followed by its IPv6 twin; single values (podIP, hostIP) stay IPv4."""
    if isinstance(obj, dict):
        return {k: to_dual(v) for k, v in obj.items()}
    if not isinstance(obj, list):
        return obj
    out = []
    for v in obj:
        out.append(to_dual(v))
        if isinstance(v, str) and _V4.match(v):
            out.append(_v6(v))
        elif isinstance(v, dict):
            for key in ("ip", "address"):  # podIPs[].ip, Node status.addresses[].address
                if isinstance(v.get(key), str) and _V4.match(v[key]):
                    out.append({**v, key: _v6(v[key])})
    return out


# ------------------------------------------------------------------ v1alpha1


class NotExpressible(ValueError):
    """A ClusterNetworkPolicy that v1alpha1 AdminNetworkPolicy/BaselineAdminNetworkPolicy cannot say."""


def _v1alpha1_ports(protocols: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for entry in protocols:
        if "destinationNamedPort" in entry:
            out.append({"namedPort": entry["destinationNamedPort"]})
            continue
        (proto, body), = entry.items()
        port = (body or {}).get("destinationPort")
        if port is None:
            raise NotExpressible("a protocol without destinationPort")
        if "range" in port:
            out.append({"portRange": {"protocol": proto.upper(), **port["range"]}})
        else:
            out.append({"portNumber": {"protocol": proto.upper(), "port": port["number"]}})
    return out


def to_v1alpha1(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same cluster with each ClusterNetworkPolicy written as the older v1alpha1 kind:
    Admin -> AdminNetworkPolicy (Accept -> Allow), Baseline -> the BaselineAdminNetworkPolicy
    singleton `default` (no priority, no Pass). Raises NotExpressible otherwise."""
    out = []
    for o in objs:
        if o["kind"] != "ClusterNetworkPolicy":
            out.append(o)
            continue
        spec = o["spec"]
        admin = spec["tier"] == "Admin"
        if not admin and o["metadata"]["name"] != "default":
            raise NotExpressible("a Baseline policy not named default")
        new: dict[str, Any] = {"subject": copy.deepcopy(spec["subject"])}
        if admin:
            new["priority"] = spec["priority"]
        for direction, peers in (("ingress", "from"), ("egress", "to")):
            rules = []
            for rule in spec.get(direction) or []:
                if rule["action"] == "Pass" and not admin:
                    raise NotExpressible("Baseline Pass")
                r = {"name": rule.get("name", ""), "action": "Allow" if rule["action"] == "Accept" else rule["action"],
                     peers: copy.deepcopy(rule.get(peers, []))}
                if "protocols" in rule:
                    r["ports"] = _v1alpha1_ports(rule["protocols"])
                rules.append(r)
            if rules:
                new[direction] = rules
        out.append({"apiVersion": "policy.networking.k8s.io/v1alpha1",
                    "kind": "AdminNetworkPolicy" if admin else "BaselineAdminNetworkPolicy",
                    "metadata": {"name": o["metadata"]["name"]}, "spec": new})
    return out


# ------------------------------------------------------------------ mutations


def _find(objs: list[dict[str, Any]], kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    for o in objs:
        meta = o["metadata"]
        if o["kind"] == kind and meta["name"] == name and meta.get("namespace") == namespace:
            return o
    raise KeyError(f"no {kind} {namespace + '/' if namespace else ''}{name} in the case")


def _walk(obj: Any, path: str) -> tuple[Any, str | int]:
    """The container holding the last segment of a dotted path, and that segment."""
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in path.split(".")]
    for p in parts[:-1]:
        obj = obj[p]
    return obj, parts[-1]


def _cnp(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return _find(objs, "ClusterNetworkPolicy", name)


def mutate(objs: list[dict[str, Any]], op: dict[str, Any]) -> None:
    """Apply one step operation in place (what upstream's Patch/Delete calls do)."""
    (verb, arg), = op.items()
    if verb == "swap":  # swap two rules of one direction
        rules = _cnp(objs, arg["policy"])["spec"][arg["direction"]]
        i, j = arg["rules"]
        rules[i], rules[j] = rules[j], rules[i]
    elif verb == "set":  # set a field by dotted path (list indices as numbers)
        holder, key = _walk(_cnp(objs, arg["policy"]), arg["path"])
        holder[key] = copy.deepcopy(arg["value"])
    elif verb == "insert":  # insert a rule at an index
        spec = _cnp(objs, arg["policy"])["spec"]
        spec.setdefault(arg["direction"], []).insert(arg["index"], copy.deepcopy(arg["rule"]))
    elif verb == "namespaceLabels":  # replace a namespace's labels (metadata.name label kept,
        ns = _find(objs, "Namespace", arg["name"])  # as the API server re-adds it)
        ns["metadata"]["labels"] = {**arg["labels"], "kubernetes.io/metadata.name": arg["name"]}
    elif verb == "nodeLabels":  # replace a node's labels
        _find(objs, "Node", arg["name"])["metadata"]["labels"] = dict(arg["labels"])
    elif verb == "delete":
        objs.remove(_find(objs, arg["kind"], arg["name"], arg.get("namespace")))
    elif verb == "add":
        objs.extend(copy.deepcopy(arg))
    else:
        raise ValueError(f"unknown step operation {verb!r}")


def pod_ips(objs: list[dict[str, Any]]) -> dict[str, str]:
    """Pod name -> address (hostNetwork pods: their node's), for every pod of the cluster."""
    return {o["metadata"]["name"]: o["status"]["podIP"] for o in objs if o["kind"] == "Pod"}


def pod_addresses(objs: list[dict[str, Any]]) -> dict[str, dict[int, str]]:
    """Pod name -> IP version -> address (from podIPs; hostNetwork pods: their node's)."""
    return {
        o["metadata"]["name"]: {ipaddress.ip_address(a["ip"]).version: a["ip"] for a in o["status"]["podIPs"]}
        for o in objs if o["kind"] == "Pod"
    }


def pod_keys(objs: list[dict[str, Any]]) -> dict[str, str]:
    """Pod name -> "namespace/name" for the pods that are endpoints (not hostNetwork)."""
    return {
        o["metadata"]["name"]: f"{o['metadata']['namespace']}/{o['metadata']['name']}"
        for o in objs if o["kind"] == "Pod" and not o["spec"].get("hostNetwork")
    }


def _resolve_refs(obj: Any, ips: dict[str, str]) -> Any:
    """"@pod" or "@pod/32" in data stands for that pod's address (upstream reads live IPs)."""
    if isinstance(obj, dict):
        return {k: _resolve_refs(v, ips) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_refs(v, ips) for v in obj]
    if isinstance(obj, str) and (m := _POD_REF.match(obj)):
        return ips[m.group(1)] + (m.group(2) or "")
    return obj


@dataclass(frozen=True)
class Step:
    case: str
    index: int
    name: str
    objects: list[dict[str, Any]]  # the full state, in the asked family (or dual-stack)
    checks: tuple[tuple[Probe, int], ...]  # (probe, IP version) for each family it runs in

    @property
    def probes(self) -> tuple[Probe, ...]:
        return tuple(dict.fromkeys(p for p, _ in self.checks))


def steps(case: dict[str, Any], family: int | None = 4) -> Iterator[Step]:
    """Every step of a case with the cumulative state after its mutations, in IPv4 (4), IPv6
    (6) or dual-stack (None: every probe in each of its families)."""
    objs = load_cluster()
    for rel in case.get("manifests") or []:
        objs += load_manifest(rel)
    objs += copy.deepcopy(case.get("objects") or [])
    ips = pod_ips(objs)
    families = (4, 6) if family is None else (family,)
    shape = {4: lambda o: o, 6: to_v6, None: to_dual}[family]
    for i, step in enumerate(case["steps"]):
        for op in step.get("mutate") or []:
            mutate(objs, _resolve_refs(op, ips))
        state = shape(_resolve_refs(copy.deepcopy(objs), ips))
        checks = tuple(
            (p, f) for p in map(parse_probe, step["probes"]) for f in families if p.family in (None, f)
        )
        yield Step(case["name"], i, step["name"], state, checks)


def write_dir(path: Path, objects: list[dict[str, Any]]) -> Path:
    """Replace the manifests in `path` (cluster objects, then policies)."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.yaml"):
        old.unlink()
    policy_kinds = ("NetworkPolicy", "ClusterNetworkPolicy")
    cluster = [o for o in objects if o["kind"] not in policy_kinds]
    policies = [o for o in objects if o["kind"] in policy_kinds]
    (path / "cluster.yaml").write_text(dump_manifests(cluster))
    if policies:
        (path / "policies.yaml").write_text(dump_manifests(policies))
    return path


# ------------------------------------------------------------------ simulator


def simulate(step: Step) -> dict[tuple[Probe, int], str]:
    """The simulator's verdict for every (probe, IP version) of a step."""
    snap = snapshot_of(step.objects, node="lab")
    assert not snap.problems, [str(p) for p in snap.problems]
    keys, ips = pod_keys(step.objects), pod_addresses(step.objects)
    grid = cache(lambda port, proto, family: matrix(snap, port, proto, family))
    return {(p, f): _verdict(snap, grid, keys, ips, p, f) for p, f in step.checks}


Grid = Callable[[str, str, int], dict[str, dict[str, str]]]  # (port, protocol, family) -> matrix


def _verdict(snap: Snapshot, grid: Grid, keys: dict[str, str], ips: dict[str, dict[int, str]],
             p: Probe, family: int) -> str:
    if p.dst in keys:
        return grid(str(p.port), p.protocol, family)[keys[p.src]][keys[p.dst]]
    # a hostNetwork pod: not an endpoint, only its (node's) address; the source's address of
    # the same family, by address (explain cannot pick one for a destination that is no pod)
    flow = explain(snap, ips[p.src][family], ips[p.dst][family], p.protocol, str(p.port))
    return "allow" if flow.allowed else "deny"
