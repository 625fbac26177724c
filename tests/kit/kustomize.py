"""A small `kustomize build` for this repository's deploy/ tree, so tests read what the
manifests say instead of repeating it.

It covers what deploy/ uses: resources (files and directories), patches (strategic merge
or JSON 6902, from a file or inline, with an optional kind/name target),
patchesStrategicMerge, namespace and images; labels are accepted and not applied (no test
reads them). Anything else in a kustomization raises: a field this renderer silently
ignored would make a test check the wrong thing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

# Strategic-merge keys of the list fields a DaemonSet patch touches (Kubernetes' patchMergeKey).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "volumeMounts": "mountPath",
              "env": "name", "ports": "containerPort", "volumeDevices": "devicePath"}
KNOWN = {"apiVersion", "kind", "resources", "patches", "patchesStrategicMerge", "namespace", "images", "labels",
         "commonLabels"}


class KustomizeError(ValueError):
    pass


def build(directory: Path) -> list[Doc]:
    """The objects `kustomize build directory` would print (for the fields above)."""
    return [doc for _, _, doc in render(directory)]


def render(directory: Path, top: Path | None = None) -> list[tuple[str, int, Doc]]:
    """`build`, each object with where it comes from: its file (relative to `top`, by
    default `directory`) and index in it, plus "+PATCH" for every patch file applied."""
    top = (top or directory).resolve()
    kfile = directory / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - KNOWN
    if unknown:
        raise KustomizeError(f"{kfile}: fields this renderer does not implement: {sorted(unknown)}")
    entries: list[list[Any]] = []  # [where, index, doc]
    for res in k.get("resources", []):
        path = directory / res
        if path.is_dir():
            entries.extend(list(e) for e in render(path, top))
        else:
            docs = yaml.safe_load_all(path.read_text())
            entries.extend([_relative(path, top), i, d] for i, d in enumerate(docs) if d)
    docs = [doc for *_, doc in entries]

    def applied(hits: list[Doc], source: str) -> None:
        for e in entries:
            if any(e[2] is d for d in hits):
                e[0] += f"+{source}"

    for entry in k.get("patchesStrategicMerge", []):
        inline = "\n" in entry
        patch = entry if inline else (directory / entry).read_text()
        for p in yaml.safe_load_all(patch):
            applied(_apply_smp(docs, p, kfile), "inline" if inline else _relative(directory / entry, top))
    for entry in k.get("patches", []):
        text = entry["patch"] if "patch" in entry else (directory / entry["path"]).read_text()
        source = _relative(directory / entry["path"], top) if "path" in entry else "inline"
        patch = yaml.safe_load(text)
        target = entry.get("target") or {}
        if isinstance(patch, list):  # JSON 6902
            hits = [d for d in docs if _matches(d, target)]
            if not hits:
                raise KustomizeError(f"{kfile}: patch target {target} matches nothing")
            for d in hits:
                _apply_json6902(d, patch)
            applied(hits, source)
        else:
            applied(_apply_smp(docs, patch, kfile, target), source)
    if "namespace" in k:
        for d in docs:
            if d.get("kind") not in {"ClusterRole", "ClusterRoleBinding", "Namespace"}:
                d.setdefault("metadata", {})["namespace"] = k["namespace"]
    for img in k.get("images", []):
        for d in docs:
            for c in _containers(d):
                name, _, _ = c.get("image", "").partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', 'latest')}"
    return [(where, index, doc) for where, index, doc in entries]


def _relative(path: Path, top: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(top)) if path.is_relative_to(top) else str(path)


def _containers(d: Doc) -> list[Doc]:
    spec = d.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _matches(d: Doc, target: dict[str, Any]) -> bool:
    return all(d.get(f) == target[f] for f in ("kind", "apiVersion") if f in target) and (
        "name" not in target or d.get("metadata", {}).get("name") == target["name"])


def _apply_smp(docs: list[Doc], patch: Doc, where: Path, target: dict[str, Any] | None = None) -> list[Doc]:
    sel = {"kind": patch.get("kind"), "name": patch.get("metadata", {}).get("name"), **(target or {})}
    hits = [d for d in docs if _matches(d, sel)]
    if not hits:
        raise KustomizeError(f"{where}: strategic-merge patch for {sel} matches nothing")
    for d in hits:
        merged = _merge(d, patch, "")
        d.clear()
        d.update(merged)
    return hits


def _merge(base: Any, patch: Any, field: str) -> Any:
    if isinstance(patch, dict) and isinstance(base, dict):
        if patch.get("$patch") == "replace":
            return {k: v for k, v in patch.items() if k != "$patch"}
        out = copy.deepcopy(base)
        for key, val in patch.items():
            if val is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], val, key)
            else:
                out[key] = copy.deepcopy(val)
        return out
    if isinstance(patch, list) and isinstance(base, list) and field in MERGE_KEYS:
        mk = MERGE_KEYS[field]
        out = copy.deepcopy(base)
        new: list[Doc] = []
        for item in patch:
            at = next((i for i, b in enumerate(out) if b.get(mk) == item.get(mk)), None)
            if item.get("$patch") == "delete":
                if at is not None:
                    del out[at]
            elif at is None:
                new.append(copy.deepcopy(item))
            else:
                out[at] = _merge(out[at], item, field)
        return new + out  # kustomize (kyaml, ListPrepend) puts new items first, in the patch's order
    return copy.deepcopy(patch)  # scalars and atomic lists (e.g. capabilities.add) are replaced


def _apply_json6902(doc: Doc, ops: list[Doc]) -> None:
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node: Any = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        kind = op["op"]
        if isinstance(node, list):
            idx = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[idx] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[idx]
            else:
                raise KustomizeError(f"JSON patch op {kind!r} not implemented")
        elif kind in ("add", "replace"):
            node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[last]
        else:
            raise KustomizeError(f"JSON patch op {kind!r} not implemented")
