"""Upstream NetworkPolicy e2e cases (tests/data/upstream) as manifests and expected grids.

The data is IPv4; `to_v6` maps every 10.10.0.x address and CIDR into fd00:10::/96
(the IPv4 address embedded in the low 32 bits, prefix length + 96), so the same
cases run on IPv6 with the same expectations.
"""

from __future__ import annotations

import copy
import fnmatch
import ipaddress
import re
from pathlib import Path
from typing import Any

import yaml

from tests.kit.builders import dump_manifests

DATA = Path(__file__).resolve().parents[1] / "data" / "upstream"
V6_BASE = int(ipaddress.IPv6Address("fd00:10::"))
_V4 = re.compile(r"^(10\.10\.\d+\.\d+)(/\d+)?$")


def load_cluster() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DATA / "cluster.yaml").read_text()) if d]


def load_cases() -> list[dict[str, Any]]:
    return yaml.safe_load((DATA / "cases.yaml").read_text())


def _v6(text: str) -> str:
    m = _V4.match(text)
    if not m:
        return text
    addr = ipaddress.IPv6Address(V6_BASE + int(ipaddress.IPv4Address(m.group(1))))
    if m.group(2):
        return f"{addr}/{int(m.group(2)[1:]) + 96}"
    return str(addr)


def to_v6(obj: Any) -> Any:
    """Deep copy with every lab IPv4 address or CIDR replaced by its IPv6 twin."""
    if isinstance(obj, dict):
        return {k: to_v6(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_v6(v) for v in obj]
    if isinstance(obj, str):
        return _v6(obj)
    return obj


def step_objects(step: dict[str, Any], family: int = 4) -> list[dict[str, Any]]:
    """The full state of one step: the cluster with label overrides, plus its policies."""
    objs = copy.deepcopy(load_cluster())
    ns_labels = step.get("namespaceLabels") or {}
    pod_labels = step.get("podLabels") or {}
    for o in objs:
        meta = o["metadata"]
        if o["kind"] == "Namespace" and meta["name"] in ns_labels:
            meta["labels"] = dict(ns_labels[meta["name"]])
        key = f"{meta.get('namespace')}/{meta['name']}"
        if o["kind"] == "Pod" and key in pod_labels:
            meta["labels"] = dict(pod_labels[key])
    objs += copy.deepcopy(step.get("policies") or [])
    return to_v6(objs) if family == 6 else objs


def write_dir(path: Path, objects: list[dict[str, Any]]) -> Path:
    """Replace the manifests in `path` (one file per object kind group)."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.yaml"):
        old.unlink()
    cluster = [o for o in objects if o["kind"] != "NetworkPolicy"]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    (path / "cluster.yaml").write_text(dump_manifests(cluster))
    if policies:
        (path / "policies.yaml").write_text(dump_manifests(policies))
    return path


def pod_keys(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(
        f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in objects if o["kind"] == "Pod"
    )


def pod_ips(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {
        f"{o['metadata']['namespace']}/{o['metadata']['name']}": o["status"]["podIP"]
        for o in objects
        if o["kind"] == "Pod"
    }


def expected_grid(expect: list[str], pods: list[str]) -> dict[str, dict[str, str]]:
    """Apply "allow|deny SRC -> DST" glob lines in order over an all-allow grid."""
    grid = {s: dict.fromkeys(pods, "allow") for s in pods}
    for line in expect:
        verdict, rest = line.split(None, 1)
        src_glob, dst_glob = (x.strip() for x in rest.split("->"))
        for s in fnmatch.filter(pods, src_glob):
            for d in fnmatch.filter(pods, dst_glob):
                grid[s][d] = verdict
    return grid


def off_diagonal(grid: dict[str, dict[str, str]]) -> dict[tuple[str, str], str]:
    return {(s, d): v for s, row in grid.items() for d, v in row.items() if s != d}


def all_probes() -> list[tuple[str, int, dict[str, Any], dict[str, Any]]]:
    """(case name, step index, step, probe) for every probe of every case."""
    out = []
    for case in load_cases():
        for i, step in enumerate(case["steps"]):
            for probe in step["probes"]:
                out.append((case["name"], i, step, probe))
    return out
