"""What the sources keep per object: repeated strings shared (interned), equal bodies, and
the directory source's per-key bookkeeping as small as its semantics allow."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from agent.sources.files import DirectorySource, load_yaml
from agent.sources.kubeobjects import INTERN_DEPTH, interned
from tests.kit.builders import dump_manifests, pod


def _pods(n: int) -> list[dict]:
    return [pod(f"team-a/web-{i}", f"10.0.0.{i + 1}", {"app": "web", "tier": "front"}) for i in range(n)]


def test_yaml_strings_are_interned_and_bodies_unchanged(tmp_path: Path) -> None:
    docs = _pods(3)
    text = dump_manifests(docs)
    loaded = load_yaml(text)
    assert loaded == list(yaml.safe_load_all(text))
    a, b = loaded[0], loaded[1]
    assert a["metadata"]["labels"]["app"] is b["metadata"]["labels"]["app"]
    assert a["metadata"]["namespace"] is b["metadata"]["namespace"]
    key_a = next(k for k in a["metadata"]["labels"] if k == "tier")
    key_b = next(k for k in b["metadata"]["labels"] if k == "tier")
    assert key_a is key_b


def test_strings_are_shared_across_files_and_formats(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(dump_manifests(_pods(2)))
    (tmp_path / "b.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        pod("team-a/api-0", "10.0.1.1", {"app": "web", "tier": "front"})]}))
    objs, problems = DirectorySource(tmp_path, settle=0).read()
    assert not problems and len(objs) == 3
    apps = {id(o.body["metadata"]["labels"]["app"]) for o in objs}
    assert len(apps) == 1
    by_name = {o.ref.name: o for o in objs}
    assert by_name["api-0"].body == pod("team-a/api-0", "10.0.1.1", {"app": "web", "tier": "front"})


def test_interned_keeps_values_and_stops_at_its_depth() -> None:
    value = {"a": [1, 2.5, True, None, "x", {"b": "y"}], "c": {}}
    assert interned(value) == value
    deep: object = "leaf"
    for _ in range(INTERN_DEPTH * 8):  # deeper than the walk goes: the rest is kept as it is
        deep = [deep]
    out = interned({"spec": deep})
    assert out == {"spec": deep}
