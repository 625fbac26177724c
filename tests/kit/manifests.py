"""deploy/ as rendered by the kit's kustomize: the base (with monitoring) and the eBPF
overlay, each object with where it comes from; shared by the manifest checks and the
tests that run the agent under the DaemonSet's container settings."""

from __future__ import annotations

from typing import Any

from tests.kit import ROOT
from tests.kit.kustomize import render

DEPLOY = ROOT / "deploy"
# (file relative to deploy/, plus "+PATCH" per patch applied; index in the file; object)
Rendered = tuple[str, int, dict[str, Any]]


def manifests() -> list[Rendered]:
    return render(DEPLOY, DEPLOY) + render(DEPLOY / "monitoring", DEPLOY)


MANIFESTS = manifests()
EBPF = render(DEPLOY / "overlays" / "ebpf", DEPLOY)


def objects(docs: list[Rendered]) -> dict[tuple[str, str], dict[str, Any]]:
    """The rendered objects by (kind, name)."""
    return {(d["kind"], d["metadata"]["name"]): d for *_, d in docs}


def container(docs: list[Rendered]) -> dict[str, Any]:
    """The agent's container in the DaemonSet."""
    return objects(docs)[("DaemonSet", "stockade")]["spec"]["template"]["spec"]["containers"][0]
