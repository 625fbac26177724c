"""Kubernetes object shapes shared by the manifest-directory and API sources.

Turns Pod and Namespace manifests into inventory objects and trims every object
to the fields the semantics read, so memory follows what matters.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from agent.inventory import (
    NAMESPACE_NAME_LABEL,
    ContainerPort,
    Endpoint,
    IPAddress,
    Namespace,
    ObjectRef,
)
from agent.policy.errors import Invalid

KINDS = ("Namespace", "Pod", "NetworkPolicy")
PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True)
class RawObject:
    """One Kubernetes object as delivered, with where it came from."""

    ref: ObjectRef
    body: Mapping[str, Any]


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


def _labels(meta: Mapping[str, Any]) -> dict[str, str]:
    labels = meta.get("labels") or {}
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise Invalid("metadata.labels", "must be a map of strings to strings")
    return dict(labels)


def parse_namespace(body: Mapping[str, Any]) -> Namespace:
    meta = body.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise Invalid("metadata.name", "missing")
    labels = _labels(meta)
    labels[NAMESPACE_NAME_LABEL] = name  # the API server always sets it
    return Namespace(name, labels)


def _ip(text: Any, field: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise Invalid(field, f"invalid IP address {text!r}") from None


def _container_ports(spec: Mapping[str, Any]) -> tuple[ContainerPort, ...]:
    out = []
    containers = spec.get("containers") or []
    if not isinstance(containers, list):
        raise Invalid("spec.containers", "must be a list")
    for i, c in enumerate(containers):
        ports = (c or {}).get("ports") or [] if isinstance(c, Mapping) else []
        for j, p in enumerate(ports if isinstance(ports, list) else []):
            field = f"spec.containers[{i}].ports[{j}]"
            if not isinstance(p, Mapping):
                raise Invalid(field, "must be an object")
            num = p.get("containerPort")
            if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= 65535:
                raise Invalid(f"{field}.containerPort", f"invalid port {num!r}")
            proto = p.get("protocol") or "TCP"
            if proto not in PROTOCOLS:
                raise Invalid(f"{field}.protocol", f"must be TCP, UDP or SCTP, got {proto!r}")
            name = p.get("name")
            out.append(ContainerPort(num, proto, str(name) if name else None))
    return tuple(out)


def parse_pod(body: Mapping[str, Any]) -> Endpoint | None:
    """The pod as an endpoint, or None when it is not one (no IP, finished, hostNetwork)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    if not all(isinstance(x, Mapping) for x in (meta, spec, status)):
        raise Invalid("metadata/spec/status", "must be objects")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise Invalid("metadata.name", "missing")
    labels = _labels(meta)
    ports = _container_ports(spec)
    if spec.get("hostNetwork") is True:
        return None
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    ips: list[IPAddress] = []
    pod_ips = status.get("podIPs") or []
    if not isinstance(pod_ips, list):
        raise Invalid("status.podIPs", "must be a list")
    for i, entry in enumerate(pod_ips):
        ip = _ip(entry.get("ip") if isinstance(entry, Mapping) else None, f"status.podIPs[{i}].ip")
        if ip not in ips:
            ips.append(ip)
    if status.get("podIP"):
        primary = _ip(status["podIP"], "status.podIP")
        if primary in ips:
            ips.remove(primary)
        ips.insert(0, primary)  # podIP is the primary address
    if not ips:
        return None
    return Endpoint(
        namespace=str(meta.get("namespace") or "default"),
        name=name,
        ips=tuple(ips),
        labels=labels,
        node=str(spec.get("nodeName") or ""),
        ports=ports,
    )


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
