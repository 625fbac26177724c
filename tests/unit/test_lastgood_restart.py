"""LastGood across a restart: re-admitting what the state file already holds writes nothing
(a restart at 10k pods rewrote the whole file, ~0.15 s, before it could be ready), while
saved state stays admitted state: a changed body is written, an invalid one never is."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.admission.lastgood import LastGood
from agent.inventory import ObjectRef, RawObject
from agent.policy.errors import Invalid


def parse(obj: RawObject) -> Mapping[str, Any]:
    if obj.body.get("bad"):
        raise Invalid("spec.bad", "refused")
    return obj.body


def raw(name: str, body: dict[str, Any]) -> RawObject:
    return RawObject(ObjectRef("Pod", "ns", name), body)


def bodies(n: int, extra: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Fresh, equal dicts on every call: what a restarted source delivers."""
    return {f"p{i}": {"kind": "Pod", "metadata": {"name": f"p{i}", "labels": {"i": str(i)}}, **(extra or {})}
            for i in range(n)}


def run(path: Path, delivered: dict[str, dict[str, Any]]) -> LastGood:
    """One agent process: admits each object one at a time (the daemon's way) and saves."""
    store = LastGood(path)
    for name, body in delivered.items():
        store.admit_key(raw(name, body), parse)
    store.save()
    return store


def saved(path: Path) -> dict[str, Any]:
    return {k.rsplit("|", 1)[1]: v for k, v in json.loads(path.read_text()).items()}


def test_a_restart_over_an_unchanged_state_does_not_rewrite_it(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    run(path, bodies(5))
    first = path.stat().st_ino  # the state file is replaced by rename on every write
    run(path, bodies(5))
    assert path.stat().st_ino == first
    assert saved(path) == bodies(5)


def test_a_restart_writes_what_changed_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    run(path, bodies(5))
    changed = bodies(5)
    changed["p2"]["metadata"]["labels"]["i"] = "two"
    store = run(path, changed)
    assert saved(path) == changed
    # a later change in the same process is written from the kept texts: still complete
    again = dict(changed, p4={"kind": "Pod", "metadata": {"name": "p4"}})
    store.admit_key(raw("p4", again["p4"]), parse)
    store.save()
    assert saved(path) == again


def test_an_invalid_body_after_a_restart_keeps_the_last_good_one_saved(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    run(path, bodies(3))
    first = path.stat().st_ino
    broken = bodies(3)
    broken["p1"] = {**broken["p1"], "bad": True}
    store = run(path, broken)
    assert path.stat().st_ino == first  # the last good version is what the file holds
    assert saved(path) == bodies(3)
    assert store.get(ObjectRef("Pod", "ns", "p1")) == bodies(3)["p1"]
