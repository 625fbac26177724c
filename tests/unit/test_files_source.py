"""The manifest-directory source and admission's last-good rule."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import yaml

from agent.pipeline import DirectoryPipeline
from agent.sources.files import DirectorySource
from tests.kit import until

POD = """
apiVersion: v1
kind: Pod
metadata: {name: %(name)s, namespace: a, labels: {app: %(name)s}}
spec: {nodeName: n1}
status: {phase: Running, podIP: %(ip)s}
"""
POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: a}
spec:
  podSelector: {}
  ingress: [{ports: [{port: %(port)s}]}]
"""


def test_reads_multidoc_yaml_lists_and_json(tmp_path: Path) -> None:
    (tmp_path / "pods.yaml").write_text(POD % {"name": "x", "ip": "10.0.0.1"} + "---\n"
                                        + POD % {"name": "y", "ip": "10.0.0.2"})
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.yml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "PodList", "items": [
        {"metadata": {"name": "z", "namespace": "b"}, "status": {"podIP": "10.0.0.3"}}]}))
    (tmp_path / "ns.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a", "labels": {"t": "1"}}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ignored"}}]}))
    (tmp_path / "notes.txt").write_text("not a manifest")
    snap = DirectoryPipeline(tmp_path, None).snapshot()
    assert not snap.problems
    assert sorted(snap.inventory.endpoints) == ["a/x", "a/y", "b/z"]
    assert snap.inventory.namespaces["a"].labels == {"t": "1", "kubernetes.io/metadata.name": "a"}


def test_unparsable_file_keeps_its_previous_objects(tmp_path: Path) -> None:
    (tmp_path / "pods.yaml").write_text(POD % {"name": "x", "ip": "10.0.0.1"})
    (tmp_path / "policy.yaml").write_text(POLICY % {"port": 80})
    pipe = DirectoryPipeline(tmp_path, None)
    assert pipe.snapshot().program.endpoints["a/x"].ingress.isolated
    (tmp_path / "policy.yaml").write_text("spec: [unclosed")  # half-written
    snap = pipe.snapshot()
    assert [p.field for p in snap.problems] == ["(file)"]
    assert "policy.yaml" in str(snap.problems[0])
    assert snap.program.endpoints["a/x"].ingress.rules[0].ports[0].first == 80


def test_invalid_object_keeps_last_good_version_across_processes(tmp_path: Path) -> None:
    src, state = tmp_path / "src", tmp_path / "state" / "last-good.json"
    src.mkdir()
    (src / "pods.yaml").write_text(POD % {"name": "x", "ip": "10.0.0.1"})
    (src / "policy.yaml").write_text(POLICY % {"port": 80})
    DirectoryPipeline(src, None, state).snapshot()
    (src / "policy.yaml").write_text(POLICY % {"port": 99999})
    snap = DirectoryPipeline(src, None, state).snapshot()  # a new process: state from disk
    assert [(p.ref.name, p.field) for p in snap.problems] == [("p", "spec.ingress[0].ports[0].port")]
    assert snap.program.endpoints["a/x"].ingress.rules[0].ports[0].first == 80
    (src / "policy.yaml").unlink()  # deleting the object removes it, last good or not
    assert not DirectoryPipeline(src, None, state).snapshot().program.endpoints["a/x"].ingress.isolated


def test_duplicate_objects_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(POD % {"name": "x", "ip": "10.0.0.1"})
    (tmp_path / "b.yaml").write_text(POD % {"name": "x", "ip": "10.0.0.2"})
    snap = DirectoryPipeline(tmp_path, None).snapshot()
    assert len(snap.problems) == 1 and "duplicate" in snap.problems[0].message
    assert [str(i) for i in snap.inventory.endpoints["a/x"].ips] == ["10.0.0.1"]


def test_file_changed_moments_ago_keeps_its_previous_version_until_it_settles(tmp_path: Path) -> None:
    (tmp_path / "pods.yaml").write_text(POD % {"name": "x", "ip": "10.0.0.1"})
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY % {"port": 80})
    old = time.time() - 10
    for f in tmp_path.iterdir():
        os.utime(f, (old, old))
    source = DirectorySource(tmp_path, settle=5.0)
    assert len(source.read()[0]) == 2 and not source.unsettled
    # An in-place writer is half way: what is there parses, and would allow every port.
    policy_file.write_text(POLICY.split("  ingress")[0] + "  ingress: [{}]\n")
    objects, _ = source.read()
    assert source.unsettled > 0
    body = next(o.body for o in objects if o.ref.kind == "NetworkPolicy")
    assert body["spec"]["ingress"][0]["ports"][0]["port"] == 80  # the previous version
    os.utime(policy_file, (old, old))  # quiet for long enough
    objects, _ = source.read()
    assert not source.unsettled
    assert next(o.body for o in objects if o.ref.kind == "NetworkPolicy")["spec"]["ingress"] == [{}]


def _settled_source(tmp_path: Path) -> DirectorySource:
    (tmp_path / "policy.yaml").write_text(POLICY % {"port": 80})
    old = time.time() - 10
    os.utime(tmp_path / "policy.yaml", (old, old))
    source = DirectorySource(tmp_path, settle=0.0)
    assert len(source.read()[0]) == 1
    return source


def test_file_truncated_in_place_keeps_its_objects_until_written(tmp_path: Path) -> None:
    source = _settled_source(tmp_path)
    with open(tmp_path / "policy.yaml", "r+") as f:
        f.truncate(0)  # the writer has opened it with O_TRUNC and not written yet
        objects, problems = source.read()
    assert len(objects) == 1 and "empty file" in problems[0].message


def test_file_replaced_by_an_empty_one_is_empty(tmp_path: Path) -> None:
    """Write-then-rename of an empty file is a deliberate "no objects", not a writer mid-way."""
    source = _settled_source(tmp_path)
    (tmp_path.parent / "staged.yaml").write_text("")
    os.replace(tmp_path.parent / "staged.yaml", tmp_path / "policy.yaml")
    assert source.read() == ([], [])


def test_file_deleted_and_created_empty_between_reads_is_empty(tmp_path: Path) -> None:
    """Even when the filesystem hands the new file the old inode number, the watcher saw the
    delete, so the empty file is not mistaken for one truncated in place."""
    source = _settled_source(tmp_path)
    changed = threading.Event()
    stop = source.watch(changed.set)
    try:
        (tmp_path / "policy.yaml").unlink()
        assert changed.wait(5)
        (tmp_path / "policy.yaml").write_text("")
        objects, problems = source.read()
    finally:
        stop()
    assert (objects, problems) == ([], [])


def test_file_written_in_place_keeps_its_previous_version_until_closed(tmp_path: Path) -> None:
    """A writer that pauses mid-file, however long, holding the file open: what is there
    parses (and would open every port) but is not taken until the writer closes it."""
    source = _settled_source(tmp_path)  # settle 0: only the open-for-write rule is at work
    events = threading.Event()
    stop = source.watch(events.set)
    try:
        with open(tmp_path / "policy.yaml", "w") as f:
            f.write(POLICY.split("  ingress")[0] + "  ingress: [{}]\n")
            f.flush()
            assert events.wait(5)
            time.sleep(0.3)  # the watcher has seen the write
            objects, _ = source.read()
            assert objects[0].body["spec"]["ingress"][0]["ports"][0]["port"] == 80  # the previous version
            events.clear()
            f.write("  policyTypes: [Ingress]\n")
        assert until(lambda: source.read()[0][0].body["spec"]["ingress"] == [{}], 5)
    finally:
        stop()


def _watched(tmp_path: Path, settle: float) -> tuple[Path, DirectorySource]:
    """A watched directory holding policy.yaml (port 80), settled long ago; `settle` so long
    that only a watcher's "complete" can let a fresh file be read within a test's deadline."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "policy.yaml").write_text(POLICY % {"port": 80})
    old = time.time() - 2 * settle
    os.utime(src / "policy.yaml", (old, old))
    source = DirectorySource(src, settle=settle)
    assert len(source.read()[0]) == 1
    return src, source


def _port(objects: list) -> object:
    body = next(o.body for o in objects if o.ref.kind == "NetworkPolicy")
    return body["spec"]["ingress"][0]["ports"][0]["port"]


def test_file_renamed_into_place_is_read_at_once(tmp_path: Path) -> None:
    """Renamed in (here from outside the directory) means complete: no settle wait."""
    src, source = _watched(tmp_path, settle=3600.0)
    (tmp_path / "staged.yaml").write_text(POLICY % {"port": 81})
    changed = threading.Event()
    stop = source.watch(changed.set)
    try:
        os.replace(tmp_path / "staged.yaml", src / "policy.yaml")
        assert changed.wait(10)  # the watcher handled the move before calling back
        objects, problems = source.read()
    finally:
        stop()
    assert not problems and not source.unsettled
    assert _port(objects) == 81


def test_file_renamed_within_the_directory_is_read_at_once(tmp_path: Path) -> None:
    """The usual atomic writer: a hidden temp file beside the target, then rename."""
    src, source = _watched(tmp_path, settle=3600.0)
    stop = source.watch(lambda: None)
    try:
        (src / ".policy.yaml.tmp").write_text(POLICY % {"port": 82})
        os.replace(src / ".policy.yaml.tmp", src / "policy.yaml")
        assert until(lambda: _port(source.read()[0]) == 82, 10)
        assert not source.unsettled
    finally:
        stop()


def test_new_file_created_and_closed_is_read_at_once(tmp_path: Path) -> None:
    src, source = _watched(tmp_path, settle=3600.0)
    stop = source.watch(lambda: None)
    try:
        (src / "pods.yaml").write_text(POD % {"name": "x", "ip": "10.0.0.1"})
        assert until(lambda: len(source.read()[0]) == 2, 10)
        assert not source.unsettled
    finally:
        stop()


def test_file_rewritten_in_place_still_settles_while_watched(tmp_path: Path) -> None:
    """An existing file opened, written and closed (no create, no rename) may be one step of
    several: it keeps its previous version until it has been quiet for `settle`."""
    src, source = _watched(tmp_path, settle=3600.0)
    stop = source.watch(lambda: None)
    try:
        with open(src / "policy.yaml", "r+") as f:  # in place: no IN_CREATE
            f.truncate(0)
            f.write(POLICY.split("  ingress")[0] + "  ingress: [{}]\n")
        # A file renamed in after it: once that is read, the watcher has handled the write.
        (tmp_path / "marker.yaml").write_text(POD % {"name": "m", "ip": "10.0.0.9"})
        os.replace(tmp_path / "marker.yaml", src / "marker.yaml")
        assert until(lambda: any(o.ref.kind == "Pod" for o in source.read()[0]), 10)
        objects, _ = source.read()
        assert _port(objects) == 80 and source.unsettled > 0  # the previous version
    finally:
        stop()


def test_renamed_in_file_then_written_in_place_settles_again(tmp_path: Path) -> None:
    """Complete is a property of the version renamed in: an in-place write after it is not."""
    src, source = _watched(tmp_path, settle=3600.0)
    (tmp_path / "staged.yaml").write_text(POLICY % {"port": 81})
    stop = source.watch(lambda: None)
    try:
        os.replace(tmp_path / "staged.yaml", src / "policy.yaml")
        assert until(lambda: _port(source.read()[0]) == 81, 10)
        with open(src / "policy.yaml", "a") as f:
            f.write("  policyTypes: [Ingress, Egress]\n")
        (tmp_path / "marker.yaml").write_text(POD % {"name": "m", "ip": "10.0.0.9"})
        os.replace(tmp_path / "marker.yaml", src / "marker.yaml")
        assert until(lambda: any(o.ref.kind == "Pod" for o in source.read()[0]), 10)
        objects, _ = source.read()
        body = next(o.body for o in objects if o.ref.kind == "NetworkPolicy")
        assert "policyTypes" not in body["spec"] and source.unsettled > 0
    finally:
        stop()


def test_hidden_temp_file_calls_back_only_when_renamed_in(tmp_path: Path) -> None:
    """A writer's hidden temp file beside the target is never read, so writing it must not
    cost a sync; the rename that puts it in place calls back (and is read at once)."""
    src, source = _watched(tmp_path, settle=3600.0)
    calls: list[float] = []
    stop = source.watch(lambda: calls.append(time.monotonic()))
    try:
        (src / ".policy.yaml.tmp").write_text(POLICY % {"port": 83})
        (src / ".policy.yaml.tmp").write_text(POLICY % {"port": 84})  # written twice
        os.replace(src / ".policy.yaml.tmp", src / "policy.yaml")
        assert until(lambda: calls, 10)
        assert _port(source.read()[0]) == 84
        # A marker renamed in from outside: once its call came, every earlier event was handled.
        (tmp_path / "marker.yaml").write_text(POD % {"name": "m", "ip": "10.0.0.9"})
        os.replace(tmp_path / "marker.yaml", src / "marker.yaml")
        assert until(lambda: len(calls) >= 2, 10)
        assert len(calls) == 2  # the rename and the marker: nothing for the temp file's writes
    finally:
        stop()


def test_hidden_file_read_through_a_link_still_calls_back(tmp_path: Path) -> None:
    src, source = _watched(tmp_path, settle=0.0)
    (src / ".real.yaml").write_text(POD % {"name": "x", "ip": "10.0.0.1"})
    (src / "pods.yaml").symlink_to(".real.yaml")
    assert len(source.read()[0]) == 2
    called = threading.Event()
    stop = source.watch(called.set)
    try:
        (src / ".real.yaml").write_text(POD % {"name": "y", "ip": "10.0.0.2"})
        assert called.wait(10)
    finally:
        stop()
