"""The state file written in the background (the daemon's way): the first write, which
encodes every object, runs in the writer thread and only once the kernel has the sync's
program (LastGood.hold / release); what ends on disk is what a synchronous writer writes,
after any sequence of changes, and a write held is never lost."""

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
from tests.kit import until


def parse(obj: RawObject) -> Mapping[str, Any]:
    if obj.body.get("bad"):
        raise Invalid("spec.bad", "refused")
    return obj.body


def raw(name: str, body: dict[str, Any]) -> RawObject:
    return RawObject(ObjectRef("Pod", "ns", name), body)


def body(name: str, label: int, bad: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "Pod", "metadata": {"name": name, "labels": {"v": str(label)}}}
    if bad:
        out["bad"] = True
    return out


# one event: (object index, label, bad) or (object index, None, False) = deleted
EVENT = st.tuples(st.integers(0, 5), st.one_of(st.none(), st.integers(0, 3)), st.booleans())


def play(store: LastGood, events: list[tuple[int, int | None, bool]]) -> None:
    for i, label, bad in events:
        if label is None:
            store.forget(raw(f"p{i}", {}).ref)
        else:
            store.admit_key(raw(f"p{i}", body(f"p{i}", label, bad)), parse)
        store.save()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(EVENT, min_size=1, max_size=6), min_size=1, max_size=5))
def test_background_writes_equal_synchronous_ones(tmp_path_factory: Any, syncs: list[list[Any]]) -> None:
    tmp = tmp_path_factory.mktemp("bg")
    fg, bg = LastGood(tmp / "fg.json"), LastGood(tmp / "bg.json")
    bg.background = True
    delay, lastgood.WRITE_DELAY = lastgood.WRITE_DELAY, 0.0  # no wait between examples' writes
    try:
        _syncs(tmp, fg, bg, syncs)
    finally:
        lastgood.WRITE_DELAY = delay


def _syncs(tmp: Path, fg: LastGood, bg: LastGood, syncs: list[list[Any]]) -> None:
    for events in syncs:
        bg.hold()  # as the daemon: held from the sync's start ...
        play(fg, events)
        play(bg, events)
        bg.release()  # ... until the kernel has it
        bg.flush()
        if (tmp / "fg.json").exists():
            assert json.loads((tmp / "bg.json").read_text()) == json.loads((tmp / "fg.json").read_text())
        else:
            assert not (tmp / "bg.json").exists()


def test_the_first_write_waits_for_the_kernel_then_is_written(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = LastGood(path)
    store.background = True
    store.hold()
    for i in range(3):
        store.admit_key(raw(f"p{i}", body(f"p{i}", i)), parse)
    store.save()
    assert store._writer is not None and store._writer._pending is not None  # handed over, held
    assert not path.exists()
    store.release()
    until(path.exists)
    store.flush()
    assert len(json.loads(path.read_text())) == 3
    # the texts it encoded are taken over: a change re-encodes only that object
    store.admit_key(raw("p1", body("p1", 9)), parse)
    store.save()
    store.flush()
    assert store._complete and not store._unencoded
    assert json.loads(path.read_text())["file|Pod|ns|p1"]["metadata"]["labels"] == {"v": "9"}
