"""Kubernetes object shapes shared by the manifest-directory and API sources.

Raw shapes only: `RawObject`, list expansion, references, and trimming every object to
the fields the semantics read, so memory follows what matters. Validation is admission's
(agent.admission.kubernetes).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from agent.inventory import ObjectRef, RawObject

__all__ = ["KINDS", "RawObject", "expand", "ref_of", "trim"]  # RawObject: the raw shape every source yields

KINDS = ("Namespace", "Pod", "NetworkPolicy")


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
    ns = "" if kind == "Namespace" else str(meta.get("namespace") or "default")
    return ObjectRef(kind, ns, name, source, location)


def trim(body: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only what the semantics read (drops managedFields, annotations, most status)."""
    meta = body.get("metadata") or {}
    kept_meta = {k: meta[k] for k in ("name", "namespace", "labels", "resourceVersion") if k in meta}
    out: dict[str, Any] = {"kind": body.get("kind"), "metadata": kept_meta}
    if "apiVersion" in body:
        out["apiVersion"] = body["apiVersion"]
    kind = body.get("kind")
    if kind == "NetworkPolicy":
        out["spec"] = body.get("spec")
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
