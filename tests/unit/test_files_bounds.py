"""Bounded work per input in the manifest directory: YAML aliases, sizes, depth, links.

Every hostile file is reported with its path, costs a bounded amount of work, never
writes more than the valid objects into the state directory, and never takes away the
objects the file held before (a vanished default deny would open traffic).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import yaml

from agent.pipeline import DirectoryPipeline
from agent.sources.files import MAX_DEPTH, DirectorySource, load_yaml
from tests.kit.builders import ns, pod
from tests.kit.hostile_files import BOMB, DENY, SELF_ALIAS

GOOD = yaml.safe_dump_all([ns("a"), pod("a/x", "10.0.0.1", nodeName="n1")])


def isolated(pipe: DirectoryPipeline) -> tuple[bool, list[str]]:
    snap = pipe.snapshot()
    return snap.program.endpoints["a/x"].ingress.isolated, [str(p) for p in snap.problems]


def state_dir_files(state: Path) -> list[str]:
    return sorted(p.name for p in state.parent.iterdir())


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    (d / "pods.yaml").write_text(GOOD)
    return d


def test_the_bomb_is_small(src: Path) -> None:
    assert 550 < len(BOMB) < 700 and BOMB.count("*x") == 81


@pytest.mark.parametrize("text", [BOMB, SELF_ALIAS], ids=["billion-laughs", "self-alias"])
def test_aliases_are_refused_with_file_and_line(src: Path, tmp_path: Path, text: str) -> None:
    """Beside a valid default deny: the bad file is reported, the deny enforced, and
    the state directory holds only the valid objects (no blow-up, no temp files)."""
    state = tmp_path / "state" / "last-good.json"
    (src / "deny.yaml").write_text(DENY)
    (src / "evil.yaml").write_text(text)
    pipe = DirectoryPipeline(src, None, state)
    for _ in range(2):  # every sync, not just the first
        iso, problems = isolated(pipe)
        assert iso
        assert len(problems) == 1 and "evil.yaml" in problems[0] and "aliases are not accepted" in problems[0]
        assert f'"{src / "evil.yaml"}", line' in problems[0]
    assert state.stat().st_size < 2000
    assert state_dir_files(state) == ["last-good.files.json", "last-good.json"]


def test_anchor_without_alias_is_fine() -> None:
    assert load_yaml("a: &x 1\n") == [{"a": 1}]


@pytest.mark.parametrize("text", [BOMB, SELF_ALIAS, "{}\n" + "kind: [unclosed"], ids=["bomb", "self-alias", "broken"])
def test_good_file_turned_bad_keeps_its_objects_in_this_and_a_new_process(
    src: Path, tmp_path: Path, text: str
) -> None:
    state = tmp_path / "state" / "last-good.json"
    (src / "deny.yaml").write_text(DENY)
    assert isolated(DirectoryPipeline(src, None, state)) == (True, [])
    pipe = DirectoryPipeline(src, None, state)
    pipe.snapshot()
    (src / "deny.yaml").write_text(text)
    iso, problems = isolated(pipe)
    assert iso and len(problems) == 1 and "deny.yaml" in problems[0]
    # A one-shot `apply` after the edit: the file never parsed in this process.
    iso, problems = isolated(DirectoryPipeline(src, None, state))
    assert iso and len(problems) == 1 and "deny.yaml" in problems[0]
    # Also for the simulator (read-only), and again after that.
    assert isolated(DirectoryPipeline(src, None, state, readonly=True))[0]
    assert isolated(DirectoryPipeline(src, None, state))[0]
    # Fixed, then deleted: the policy goes, as deleting a file always did.
    (src / "deny.yaml").write_text(DENY)
    assert isolated(DirectoryPipeline(src, None, state)) == (True, [])
    (src / "deny.yaml").unlink()
    assert isolated(DirectoryPipeline(src, None, state)) == (False, [])
    assert state_dir_files(state) == ["last-good.files.json", "last-good.json"]


def test_a_file_bad_from_the_start_holds_nothing(src: Path, tmp_path: Path) -> None:
    (src / "deny.yaml").write_text(BOMB)
    iso, problems = isolated(DirectoryPipeline(src, None, tmp_path / "state" / "last-good.json"))
    assert not iso and len(problems) == 1


def test_oversize_file_and_object(src: Path) -> None:
    source = DirectorySource(src, settle=0)
    big_file = src / "big.yaml"
    with big_file.open("w") as f:  # comments only: it would hold nothing, but is never read whole
        f.write(("#" * 1023 + "\n") * 4096 + "#\n")
    assert big_file.stat().st_size > 4 << 20
    big_object = yaml.safe_load(DENY)
    big_object["metadata"]["annotations"] = {"note": "x" * (1 << 20)}
    (src / "deny.yaml").write_text(yaml.safe_dump(big_object))
    objects, problems = source.read()
    assert sorted(o.ref.name for o in objects) == ["a", "x"]
    by_file = {p.ref.name: p.message for p in problems}
    assert by_file.keys() == {"big.yaml", "deny.yaml"}
    assert "larger than 4194304 bytes" in by_file["big.yaml"]
    assert "NetworkPolicy a/default-deny is" in by_file["deny.yaml"]
    assert "over the 1048576-byte limit" in by_file["deny.yaml"]


def test_limits_come_from_the_environment(src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKADE_MAX_FILE_BYTES", "100")
    _, problems = DirectorySource(src, settle=0).read()
    assert [p.ref.name for p in problems] == ["pods.yaml"] and "larger than 100 bytes" in problems[0].message
    monkeypatch.setenv("STOCKADE_MAX_FILE_BYTES", "lots")
    with pytest.raises(SystemExit, match="STOCKADE_MAX_FILE_BYTES"):
        DirectorySource(src, settle=0)


def test_deep_nesting_is_refused_in_yaml_and_json(src: Path) -> None:
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    (src / "deep.yaml").write_text(f"kind: Pod\nmetadata: {{name: d}}\nspec: {deep}\n")
    (src / "deep.json").write_text('{"kind": "Pod", "spec": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (src / "ok.json").write_text('{"kind": "Pod", "metadata": {"name": "ok"}, "spec": ' + "[" * 50 + "]" * 50 + "}")
    objects, problems = DirectorySource(src, settle=0).read()
    assert sorted(o.ref.name for o in objects) == ["a", "ok", "x"]
    assert sorted(p.ref.name for p in problems) == ["deep.json", "deep.yaml"]
    assert all("deeper than" in p.message or "recursion" in p.message for p in problems)


def test_values_are_json(src: Path, tmp_path: Path) -> None:
    """A timestamp stays a string (as in the API); a type JSON cannot hold is refused,
    naming the object, before it could reach the state file."""
    (src / "pods.yaml").write_text(GOOD.replace("metadata:", "metadata:\n  creationTimestamp: 2024-01-01T00:00:00Z", 1))
    (src / "bin.yaml").write_text(DENY.replace("name: default-deny", "name: bin\n  uid: !!binary aGVsbG8="))
    state = tmp_path / "state" / "last-good.json"
    snap = DirectoryPipeline(src, None, state).snapshot()
    assert [str(p) for p in snap.problems] == [
        f"{src / 'bin.yaml'}: File bin.yaml: field (file): cannot parse: NetworkPolicy a/bin: not JSON data:"
        " Object of type bytes is not JSON serializable"]
    assert "2024-01-01T00:00:00Z" in state.read_text()


def test_a_fifo_does_not_stall_the_read(src: Path) -> None:
    os.mkfifo(src / "pipe.yaml")
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(DirectorySource(src, settle=0).read()), daemon=True)
    reader.start()
    reader.join(30)  # generous: the point is that it returns at all
    assert result, "read() blocked on a FIFO"
    objects, problems = result[0]  # type: ignore[misc]
    assert len(objects) == 2 and [p.message for p in problems] == ["cannot parse: not a regular file"]


def test_links_to_dot_are_read_once(src: Path) -> None:
    (src / "sub").mkdir()
    (src / "sub" / "deny.yaml").write_text(DENY)
    for name in ("here", "again"):
        (src / name).symlink_to(".")
    (src / "sub" / "up").symlink_to("..")
    source = DirectorySource(src, settle=0)
    assert source.files() == [src / "pods.yaml", src / "sub" / "deny.yaml"]
    objects, problems = source.read()
    assert len(objects) == 3 and not problems


def test_link_loop_is_harmless(src: Path) -> None:
    for a, b in (("a", "b"), ("b", "a"), ("a.yaml", "b.yaml"), ("b.yaml", "a.yaml")):
        (src / a).symlink_to(b)
    objects, problems = DirectorySource(src, settle=0).read()
    assert len(objects) == 2
    assert sorted(p.ref.name for p in problems) == ["a.yaml", "b.yaml"]
    assert all("Too many levels of symbolic links" in p.message for p in problems)


def test_links_leading_out_are_reported_not_read(src: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "deny.yaml").write_text(DENY)
    (src / "elsewhere").symlink_to(outside)
    (src / "deny.yaml").symlink_to(outside / "deny.yaml")
    (src / "passwd.yaml").symlink_to("/etc/passwd")
    objects, problems = DirectorySource(src, settle=0).read()
    assert len(objects) == 2
    assert sorted(p.ref.name for p in problems) == ["deny.yaml", "elsewhere", "passwd.yaml"]
    assert all("links outside" in p.message for p in problems)


def test_links_inside_are_followed_as_a_configmap_mount_needs(src: Path) -> None:
    """A ConfigMap volume: name.yaml -> ..data/name.yaml, ..data -> ..2024_01_01 (hidden)."""
    (src / "..2024_01_01").mkdir()
    (src / "..2024_01_01" / "deny.yaml").write_text(DENY)
    (src / "..data").symlink_to("..2024_01_01")
    (src / "deny.yaml").symlink_to("..data/deny.yaml")
    (src / "linked").symlink_to("..data")
    objects, problems = DirectorySource(src, settle=0).read()
    assert [o.ref.location for o in objects if o.ref.kind == "NetworkPolicy"] == [str(src / "deny.yaml")]
    # The same file again through the directory link: read, and reported as a duplicate.
    assert [p.ref.location for p in problems] == [str(src / "linked" / "deny.yaml")]
    assert "duplicate" in problems[0].message


def test_a_directory_that_cannot_be_listed_keeps_its_files_objects(src: Path, tmp_path: Path) -> None:
    (src / "sub").mkdir()
    (src / "sub" / "deny.yaml").write_text(DENY)
    source = DirectorySource(src, settle=0)
    assert len(source.read()[0]) == 3
    src.rename(tmp_path / "moved")  # the whole directory gone (a remount, say)
    objects, problems = source.read()
    assert len(objects) == 3
    assert problems[0].ref.location == str(src) and "cannot read directory" in problems[0].message
    assert {p.ref.name for p in problems[1:]} == {"pods.yaml", "deny.yaml"}


def test_a_file_being_written_when_a_new_process_starts_keeps_its_objects(src: Path, tmp_path: Path) -> None:
    state = tmp_path / "state" / "last-good.json"
    (src / "deny.yaml").write_text(DENY)
    assert isolated(DirectoryPipeline(src, None, state)) == (True, [])
    (src / "deny.yaml").write_text(DENY.split("policyTypes")[0])  # half written
    pipe = DirectoryPipeline(src, None, state)
    pipe.source.settle = 60.0  # still settling: not read yet
    objects, _ = pipe.source.read()
    assert pipe.source.unsettled > 0
    assert [o.body["spec"]["policyTypes"] for o in objects if o.ref.kind == "NetworkPolicy"] == [["Ingress"]]
