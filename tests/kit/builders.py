"""Manifest builders (Namespace, Pod, NetworkPolicy: what the directory and API sources
deliver) and `snapshot_of`, objects through admission and semantics. Pure: no kernel."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from agent.admission import LastGood
from agent.pipeline import Snapshot, compile_kubernetes
from agent.sources.kubeobjects import RawObject, expand, ref_of


def snapshot_of(docs: list[dict[str, Any]], node: str | None = None) -> Snapshot:
    """Objects -> admission -> semantics, as the directory source would deliver them."""
    objs = [RawObject(ref_of(b, "file", "test"), b) for d in docs for b in expand(d)]
    return compile_kubernetes(objs, LastGood(), node, "file")


def ns(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(key: str, ips: str | list[str], labels: dict[str, str] | None = None,
        ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    namespace, name = key.split("/")
    ips = [ips] if isinstance(ips, str) else ips
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {"app": name})},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": ports or []}], **spec},
        "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": i} for i in ips]},
    }


def policy(key: str, spec: dict[str, Any]) -> dict[str, Any]:
    namespace, name = key.split("/")
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": copy.deepcopy(spec)}


BASE = [
    ns("a", team="red"), ns("b", team="blue"),
    pod("a/web", "10.0.0.1", {"app": "web", "tier": "front"},
        ports=[{"name": "http", "containerPort": 8080}]),
    pod("a/api", "10.0.0.2", {"app": "api", "tier": "back"},
        ports=[{"name": "http", "containerPort": 9090}, {"name": "dns", "containerPort": 53,
                                                          "protocol": "UDP"}]),
    pod("b/cli", "10.0.1.1", {"app": "cli"}),
]


class _NoAliases(yaml.SafeDumper):
    """PyYAML writes an anchor and an alias for an object it meets twice; the manifest
    directory refuses aliases (bounded input), so manifests are written in full."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_manifests(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML of `docs` as an operator's tooling writes it: no anchors or aliases."""
    return yaml.dump_all(docs, Dumper=_NoAliases)
