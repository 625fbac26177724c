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


def _view(src: DirectorySource) -> tuple[tuple[dict, list], set | None]:
    objs, problems = src.read()
    delivered, changed = src.changes()
    assert {o.ref.key: o for o in objs} == delivered
    return ({k: (o.ref.location, o.body) for k, o in delivered.items()},
            sorted((p.ref.location, p.ref.key, p.field, p.message) for p in problems)), changed


def test_incremental_view_equals_a_fresh_read_through_duplicates(tmp_path: Path) -> None:
    """The compact per-key bookkeeping: after every change the delivered objects, their
    files and the duplicates reported are what a fresh source reads from the directory."""
    import random

    rng = random.Random(7)
    (tmp_path / "sub").mkdir()
    files = [tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "sub" / "c.yaml"]
    src = DirectorySource(tmp_path, settle=0)
    previous: dict = {}
    duplicated = 0
    for step in range(120):
        path = rng.choice(files)
        if rng.random() < 0.15:
            path.unlink(missing_ok=True)
        else:
            docs = [pod(f"ns/p{rng.randrange(3)}", "10.0.0.1", {"v": str(rng.randrange(3)), "s": str(step)})
                    for _ in range(rng.randrange(4))]
            tmp = path.with_name(".tmp")
            tmp.write_text(dump_manifests(docs))
            tmp.rename(path)  # a new inode: never mistaken for the previous version
        got, changed = _view(src)
        want, _ = _view(DirectorySource(tmp_path, settle=0))
        assert got == want, step
        delivered = got[0]
        duplicated += bool(got[1])
        if step:
            assert changed is not None
            assert {k for k in delivered.keys() | previous.keys() if delivered.get(k) != previous.get(k)} <= changed
        previous = delivered
    assert duplicated > 20  # the walk went through duplicates within and across files


def test_kubernetes_objects_share_their_strings(tmp_path: Path) -> None:
    """Objects from the API (a list, then a watch event) keep one copy of each repeated string."""
    import pytest

    pytest.importorskip("kubernetes")
    from agent.sources.kubernetes import KubernetesSource
    from tests.kit import expect
    from tests.kit.kubeapi import FakeKubeAPI

    api = FakeKubeAPI().start()
    try:
        api.put(pod("team-a/web-0", "10.0.0.1", {"app": "web", "tier": "front"}))
        src = KubernetesSource(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")), backoff_base=0.05,
                               backoff_cap=0.4, connect_timeout=2.0, read_slack=2.0)
        stop = src.watch(lambda: None)
        try:
            assert src.synced.wait(10)
            api.put(pod("team-a/web-1", "10.0.0.2", {"app": "web", "tier": "front"}))  # a watch event
            expect(lambda: len([o for o in src.read()[0] if o.ref.kind == "Pod"]) == 2, what="both pods")
            a, b = (o.body for o in src.read()[0] if o.ref.kind == "Pod")
            assert a["metadata"]["labels"]["app"] is b["metadata"]["labels"]["app"]
            assert a["metadata"]["namespace"] is b["metadata"]["namespace"]
            assert a["status"]["phase"] is b["status"]["phase"]
        finally:
            stop()
    finally:
        api.close()
