"""Fuzz (hypothesis): generated NetBird API answers, valid and invalid, through the real
NetBird source (fetch, partial-view check), admission and semantics. No crash; every
invalid object reported; no verdict wider than the same answers without the invalid
objects. `check(max_examples)` is also run at scale by `python -m bench.reliability`."""

from __future__ import annotations

from tests.kit.fuzz_netbird import check


def test_netbird_invalid_objects_are_reported_and_never_widen() -> None:
    check(150)
