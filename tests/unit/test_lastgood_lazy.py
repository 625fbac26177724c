"""The state file read when first needed (LastGood._load), not at start: after any file and
any sequence of admissions, forgets, retains and saves, a store that reads it lazily
admits, falls back, reports and saves exactly what a store that read it at start does; in
the daemon's way (background, held until the kernel has the program) it is read only
after release, and not at all before when every object validates."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.admission import lastgood
from agent.admission.lastgood import LastGood
from agent.inventory import ObjectRef, RawObject
from agent.policy.errors import Invalid

NAMES = [f"p{i}" for i in range(5)]


def parse(obj: RawObject) -> Mapping[str, Any]:
    if obj.body.get("bad"):
        raise Invalid("spec.bad", "refused")
    return obj.body


def ref(name: str) -> ObjectRef:
    return ObjectRef("Pod", "ns", name)


def body(name: str, label: int, bad: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "Pod", "metadata": {"name": name, "labels": {"v": str(label)}}}
    if bad:
        out["bad"] = True
    return out


def eager(path: Path) -> LastGood:
    """The store as it was: the state file read at start."""
    store = LastGood(path)
    store._load()
    return store


FILE = st.dictionaries(st.sampled_from(NAMES), st.integers(0, 2))
OP = st.one_of(
    st.tuples(st.just("admit"), st.sampled_from(NAMES), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("forget"), st.sampled_from(NAMES)),
    st.tuples(st.just("retain"), st.sets(st.sampled_from(NAMES))),
    st.tuples(st.just("save")),
    st.tuples(st.just("get"), st.sampled_from(NAMES)),
)


def play(store: LastGood, ops: list[tuple[Any, ...]]) -> list[Any]:
    """What each operation answered (admitted entries and problems, bodies got)."""
    seen: list[Any] = []
    for op in ops:
        if op[0] == "admit":
            hit = store.admit_key(RawObject(ref(op[1]), body(op[1], op[2], op[3])), parse)
            seen.append((hit.entry[0].body if hit.entry else None, [str(p) for p in hit.problems]))
        elif op[0] == "forget":
            store.forget(ref(op[1]))
        elif op[0] == "retain":
            store.retain(ref(n) for n in op[1])
        elif op[0] == "save":
            store.save()
        else:
            seen.append(store.get(ref(op[1])))
    store.save()
    return seen


def write_file(path: Path, file: dict[str, int]) -> None:
    path.write_text(json.dumps({f"file|Pod|ns|{n}": body(n, v) for n, v in file.items()}))


@settings(max_examples=150, deadline=None)
@given(FILE, st.lists(OP, max_size=12))
def test_a_lazily_read_state_file_equals_one_read_at_start(tmp_path_factory: Any, file: dict[str, int],
                                                           ops: list[tuple[Any, ...]]) -> None:
    tmp = tmp_path_factory.mktemp("lazy")
    write_file(tmp / "a.json", file)
    write_file(tmp / "b.json", file)
    a, b = eager(tmp / "a.json"), LastGood(tmp / "b.json")
    assert play(a, ops) == play(b, ops)
    assert json.loads((tmp / "a.json").read_text()) == json.loads((tmp / "b.json").read_text())
    assert a._bodies == b._bodies


@settings(max_examples=80, deadline=None)
@given(FILE, st.lists(OP, max_size=12))
def test_the_daemons_way_reads_it_after_release_and_saves_the_same(tmp_path_factory: Any, file: dict[str, int],
                                                                   ops: list[tuple[Any, ...]]) -> None:
    tmp = tmp_path_factory.mktemp("held")
    write_file(tmp / "a.json", file)
    write_file(tmp / "b.json", file)
    a, b = eager(tmp / "a.json"), LastGood(tmp / "b.json")
    b.background = True
    delay, lastgood.WRITE_DELAY = lastgood.WRITE_DELAY, 0.0
    try:
        b.hold()
        assert play(a, ops) == play(b, ops)
        b.release()
        b.flush()
    finally:
        lastgood.WRITE_DELAY = delay
    assert json.loads((tmp / "a.json").read_text()) == json.loads((tmp / "b.json").read_text())


def test_a_restart_where_everything_validates_reads_nothing_before_release(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_file(path, {"p0": 1, "p1": 2})
    store = LastGood(path)
    store.background = True
    store.hold()
    for n, v in (("p0", 1), ("p1", 3)):
        store.admit_key(RawObject(ref(n), body(n, v)), parse)
    store.retain([ref("p0"), ref("p1")])
    store.save()
    assert store._unread is not None  # not read: nothing needed it
    store.release()  # read now, p1 found changed, written
    store.flush()
    assert json.loads(path.read_text())["file|Pod|ns|p1"] == body("p1", 3)


def test_an_invalid_object_reads_the_file_for_its_last_good_version(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_file(path, {"p0": 1})
    store = LastGood(path)
    hit = store.admit_key(RawObject(ref("p0"), body("p0", 2, bad=True)), parse)
    assert hit.entry is not None and hit.entry[0].body == body("p0", 1) and hit.problems
