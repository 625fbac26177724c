"""Kubernetes object shapes shared by the manifest-directory and API sources.

Raw shapes only: `RawObject`, list expansion, references, and trimming every object to
the fields the semantics read, so memory follows what matters. Validation is admission's
(agent.admission.kubernetes).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any

from agent.inventory import ObjectRef, RawObject

__all__ = ["CLUSTER_POLICY_KINDS", "CLUSTER_SCOPED", "KINDS", "RawObject", "expand", "interned", "ref_of", "trim"]
# (RawObject: the raw shape every source yields)

# ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) and its v1alpha1 predecessors.
CLUSTER_POLICY_KINDS = ("ClusterNetworkPolicy", "AdminNetworkPolicy", "BaselineAdminNetworkPolicy")
# Every kind the semantics read: Nodes for ClusterNetworkPolicy `nodes` egress peers.
KINDS = ("Namespace", "Pod", "NetworkPolicy", "Node", *CLUSTER_POLICY_KINDS)
# Kinds without a namespace: their references carry namespace "".
CLUSTER_SCOPED = frozenset({"Namespace", "Node", *CLUSTER_POLICY_KINDS})


def expand(doc: Any) -> Iterator[Mapping[str, Any]]:
    """Yield the objects of one document, unwrapping `kind: List` / `PodList` / ..."""
    if not isinstance(doc, Mapping):
        return
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
        item_kind = kind[: -len("List")] or None
        for item in doc["items"]:
            if isinstance(item, Mapping):
                if item_kind and "kind" not in item:
                    item = {**item, "kind": item_kind}  # typed lists may omit items' kind
                yield from expand(item)
        return
    yield doc


def ref_of(body: Mapping[str, Any], source: str, location: str = "") -> ObjectRef:
    meta = body.get("metadata") if isinstance(body.get("metadata"), Mapping) else {}
    kind = str(body.get("kind") or "")
    name = str(meta.get("name") or "")
    ns = "" if kind in CLUSTER_SCOPED else str(meta.get("namespace") or "default")
    return ObjectRef(kind, ns, name, source, location)


def trim(body: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only what the semantics read (drops managedFields, annotations, most status)."""
    meta = body.get("metadata") or {}
    kept_meta = {k: meta[k] for k in ("name", "namespace", "labels", "resourceVersion") if k in meta}
    out: dict[str, Any] = {"kind": body.get("kind"), "metadata": kept_meta}
    if "apiVersion" in body:
        out["apiVersion"] = body["apiVersion"]
    kind = body.get("kind")
    if kind == "NetworkPolicy" or kind in CLUSTER_POLICY_KINDS:
        out["spec"] = body.get("spec")
    elif kind == "Node":
        # Only the addresses: conditions and heartbeats change every few seconds and must
        # not wake the loop. Entries keep just type and address; anything malformed is kept
        # as it is, for admission to report (dropping it could narrow a deny).
        status = body.get("status") if isinstance(body.get("status"), Mapping) else {}
        if "addresses" in status:
            addrs = status["addresses"]
            if isinstance(addrs, list):
                addrs = [{k: a[k] for k in ("type", "address") if k in a} if isinstance(a, Mapping) else a
                         for a in addrs]
            out["status"] = {"addresses": addrs}
    elif kind == "Pod":
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        out["spec"] = {
            "nodeName": spec.get("nodeName"),
            "hostNetwork": spec.get("hostNetwork", False),
            "containers": [
                {"ports": c.get("ports")} for c in spec.get("containers") or [] if isinstance(c, Mapping)
            ],
        }
        out["status"] = {k: status[k] for k in ("phase", "podIP", "podIPs") if k in status}
    return out


def interned(value: Any, depth: int = 0) -> Any:
    """`value` (JSON data) with every string, keys included, interned (sys.intern): the
    sources keep every object they deliver, and a cluster's objects repeat the same few
    thousand strings (kinds, label keys and values, port names) hundreds of thousands of
    times. Dicts and lists are rebuilt (json.loads shares keys within one call only);
    anything else, and anything nested deeper than INTERN_DEPTH, is kept as it is (equal
    either way: interning only shares)."""
    t = type(value)
    if t is str:
        return sys.intern(value)
    if depth >= INTERN_DEPTH:
        return value
    if t is dict:
        return {(sys.intern(k) if type(k) is str else k): interned(v, depth + 1) for k, v in value.items()}
    if t is list:
        return [interned(v, depth + 1) for v in value]
    return value


INTERN_DEPTH = 64  # a NetworkPolicy is about 10 levels deep; the recursion stays short
