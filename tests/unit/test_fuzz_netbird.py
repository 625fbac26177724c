"""Fuzz (hypothesis): generated NetBird API answers polled twice through the real source;
never more permissive (nor stricter) than an independent fail-closed reference, and a
restart from the state file enforces the same program (tests.kit.fuzz_netbird)."""

from __future__ import annotations

from tests.kit.fuzz_netbird import check


def test_netbird_answers_never_more_permissive_than_the_fail_closed_reference() -> None:
    check(200)
