"""The event path costs what changed: the directory source's delta, admission's last good
versions kept per key, the daemon's frozen heap.

The directory source keeps its delivered view between reads (`changes()`): after any
sequence of file edits it must deliver exactly what a fresh source reads, report every key
whose object changed, and keep every other object as the same object.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.admission import KubernetesAdmission, LastGood
from agent.daemon import Heap
from agent.sources.files import DirectorySource
from agent.sources.kubeobjects import RawObject, ref_of
from tests.kit.builders import ns, pod

FILES = ("a.yaml", "b.json", "sub/c.yaml")
PODS = ("x/p0", "x/p1", "y/p0")


def _doc(key: str, app: str) -> dict[str, Any]:
    return pod(key, "10.0.0.1", {"app": app})


file_body = st.lists(st.tuples(st.sampled_from(PODS), st.sampled_from(["web", "db"])), max_size=4)
edit = st.one_of(st.tuples(st.sampled_from(FILES), file_body),  # written (renamed in)
                 st.tuples(st.sampled_from(FILES), st.none()),  # deleted
                 st.tuples(st.sampled_from(FILES), st.just("garbage")))  # does not parse


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(edit, min_size=1, max_size=15))
def test_directory_changes_equal_a_fresh_read(edits: list[tuple[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "sub").mkdir()
        source = DirectorySource(root, settle=0)
        before: dict[Any, RawObject] = {}
        for i, (name, content) in enumerate(edits, start=1):
            path = root / name
            if content is None:
                path.unlink(missing_ok=True)
            else:
                text = content if isinstance(content, str) else json.dumps(
                    {"kind": "List", "items": [_doc(k, app) for k, app in content]})
                tmp_file = root / f".{i}.tmp"
                tmp_file.write_text(text)
                os.utime(tmp_file, ns=(i * 10**9, i * 10**9))  # never the stamp of an earlier version
                os.replace(tmp_file, path)
            _, problems = source.read()
            objects, changed = source.changes()
            fresh = DirectorySource(root, settle=0)
            fresh._cache = {p: v for p, v in source._cache.items()}  # unparsable files keep what they held
            fresh_objects, fresh_problems = fresh.read()
            assert {k: (o.ref, o.body) for k, o in objects.items()} == {
                o.ref.key: (o.ref, o.body) for o in fresh_objects}
            assert sorted(map(str, problems)) == sorted(map(str, fresh_problems))
            if i > 1:
                assert changed is not None
                for key, obj in objects.items():
                    if key not in changed:
                        assert before.get(key) is obj, key
                assert all(k in changed for k in before.keys() - objects.keys())
            before = dict(objects)


def test_duplicates_are_reported_and_the_first_file_wins(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(json.dumps(_doc("x/p0", "web")))
    (tmp_path / "b.yaml").write_text(json.dumps(_doc("x/p0", "db")))
    source = DirectorySource(tmp_path, settle=0)
    _, problems = source.read()
    objects, changed = source.changes()
    assert changed is None
    assert objects[("Pod", "x", "p0")].body["metadata"]["labels"] == {"app": "web"}
    assert [p.field for p in problems] == ["metadata.name"] and "duplicate of" in problems[0].message
    (tmp_path / "a.yaml").unlink()
    _, problems = source.read()
    objects, changed = source.changes()
    assert changed == {("Pod", "x", "p0")} and not problems
    assert objects[("Pod", "x", "p0")].body["metadata"]["labels"] == {"app": "db"}


def test_an_invalid_object_delivered_again_is_never_kept_as_good(tmp_path: Path) -> None:
    """An invalid namespace without a last good version is read fail-closed; delivered again
    as an equal body (a relist, a file read again) it must still not become a last good
    version, in memory or in the state file."""
    state = tmp_path / "state.json"
    bad = ns("x")
    bad["metadata"]["labels"] = {"bad key!": "v"}
    admission = KubernetesAdmission(LastGood(state))
    for _ in range(3):
        body = json.loads(json.dumps(bad))  # equal, another object
        raw = RawObject(ref_of(body, "file", "t"), body)
        inv = admission.update({raw.ref.key: raw}, None if _ == 0 else {raw.ref.key})
        assert inv.namespaces["x"].labels_invalid and inv.problems
        assert admission.store.get(raw.ref) is None
    assert not state.exists() or json.loads(state.read_text()) == {}  # nothing kept: nothing to write


def test_state_file_is_written_only_when_a_kept_body_changes(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    admission = KubernetesAdmission(LastGood(state))
    objs = {o.ref.key: o for o in (RawObject(ref_of(b, "file", "t"), b) for b in (ns("x"), _doc("x/p0", "web")))}
    admission.update(objs, None)
    stamp = state.stat().st_ino
    admission.update(objs, set(objs))  # the same objects again: nothing to write
    assert state.stat().st_ino == stamp
    relabelled = _doc("x/p0", "db")
    objs[("Pod", "x", "p0")] = RawObject(ref_of(relabelled, "file", "t"), relabelled)
    admission.update(objs, {("Pod", "x", "p0")})
    assert state.stat().st_ino != stamp
    saved = json.loads(state.read_text())
    assert saved["file|Pod|x|p0"]["metadata"]["labels"] == {"app": "db"} and "file|Namespace||x" in saved


def test_heap_is_frozen_after_the_first_sync_and_refrozen_when_due() -> None:
    heap = Heap(every=3600)
    try:
        heap.after_sync()
        frozen = gc.get_freeze_count()
        assert frozen > 0 and heap.frozen_at is not None
        first = heap.frozen_at
        heap.after_sync()  # not due: nothing done
        assert heap.frozen_at == first
        heap.frozen_at = first - 3601  # due: thawed, collected, frozen again
        heap.after_sync()
        assert heap.frozen_at > first and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_failed_admission_starts_afresh(tmp_path: Path) -> None:
    """An update that fails half-way (the source's delta is spent) makes the next one admit
    every object again, whatever delta it is given."""
    admission = KubernetesAdmission(LastGood())
    objs = {o.ref.key: o for o in (RawObject(ref_of(b, "file", "t"), b) for b in (ns("x"), _doc("x/p0", "web")))}
    admission.update(objs, None)
    relabelled = _doc("x/p0", "db")
    objs[("Pod", "x", "p0")] = RawObject(ref_of(relabelled, "file", "t"), relabelled)
    store_admit = admission.store.admit_key

    def broken(*_: Any) -> Any:
        raise RuntimeError("boom")

    admission.store.admit_key = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        admission.update(objs, {("Pod", "x", "p0")})
    admission.store.admit_key = store_admit  # type: ignore[method-assign]
    inv = admission.update(objs, set())  # an empty delta: still everything, after the failure
    assert inv.endpoints["x/p0"].labels == {"app": "db"} and "x" in inv.namespaces
    assert admission.touched is None  # and the compiler is told to compare everything


def test_a_watching_pipeline_writes_the_state_off_the_event_path(tmp_path: Path) -> None:
    """In the daemon (background) the state file is written by a writer thread: the newest
    admitted state, complete, once flushed; a new process loads exactly it."""
    state = tmp_path / "state.json"
    store = LastGood(state)
    store.background = True
    admission = KubernetesAdmission(store)
    objs = {o.ref.key: o for o in (RawObject(ref_of(b, "file", "t"), b) for b in (ns("x"), _doc("x/p0", "web")))}
    admission.update(objs, None)  # the first write (every text encoded) goes to the writer too
    store.flush()
    assert "file|Pod|x|p0" in json.loads(state.read_text())
    for app in ("db", "api", "web2"):
        body = _doc("x/p0", app)
        objs[("Pod", "x", "p0")] = RawObject(ref_of(body, "file", "t"), body)
        admission.update(objs, {("Pod", "x", "p0")})
    store.flush()
    saved = json.loads(state.read_text())
    assert saved["file|Pod|x|p0"]["metadata"]["labels"] == {"app": "web2"} and "file|Namespace||x" in saved
    assert LastGood(state, readonly=True).get(objs[("Pod", "x", "p0")].ref) == saved["file|Pod|x|p0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left
