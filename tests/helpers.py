"""Shared test helpers (pure: no kernel, no namespaces)."""

from __future__ import annotations

from typing import Any

from agent.admission import LastGood, kubernetes_inventory
from agent.pipeline import Snapshot
from agent.policy.kubernetes import compile_inventory
from agent.sources.kubeobjects import RawObject, expand, ref_of


def snapshot_of(docs: list[dict[str, Any]], node: str | None = None) -> Snapshot:
    """Objects -> admission -> semantics, as the directory source would deliver them."""
    objs = [RawObject(ref_of(b, "file", "test"), b) for d in docs for b in expand(d)]
    inv = kubernetes_inventory(objs, LastGood())
    return Snapshot(inv, compile_inventory(inv, node))
