"""build_model with a memo (what the dataplane keeps across syncs) builds exactly what a
build without one builds, after every event of a random sequence driven through the
incremental compiler (which hands unchanged endpoints back as the same objects); the
diffs it yields, applied one after another to a real table, leave what a fresh load of
the last model leaves."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.dataplane.nftables import (
    Memo,
    Options,
    build_model,
    render_diff,
)
from agent.ir import Direction, DirectionProgram, EndpointProgram, Origin, PeerSet, Program, Rule
from tests.kit.nftns import throwaway_netns
from tests.kit.nftworld import World, replay, same_model

KINDS = ("pod_local", "pod_remote", "pod_labels", "pod_removed", "policy_changed", "policy_removed",
         "namespace_labels")
events = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 10_000)), min_size=1, max_size=12)
OPTS = (Options(), Options(audit=True, log_group=None))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 50), st.sampled_from(OPTS), events)
def test_memo_builds_what_a_full_build_builds_after_every_event(seed: int, opts: Options, evs: list) -> None:
    world = World(seed)
    memo = Memo()
    prev = build_model(world.program(), opts, None, memo)
    same_model(prev, build_model(world.program(), opts))
    for kind, n in evs:
        world.event(kind, n)
        prog = world.program()
        inc = build_model(prog, opts, prev, memo)
        ref = build_model(prog, opts, prev)  # the same history: names of shared sets follow it
        same_model(inc, ref)
        assert render_diff(prev, inc) == render_diff(prev, ref)
        assert set(memo.endpoints) == set(prog.endpoints)
        prev = inc


@pytest.fixture(scope="module")
def two() -> Iterator[tuple[str, str]]:
    with throwaway_netns("incA") as a, throwaway_netns("incB") as b:
        yield a, b


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 50), events)
def test_incremental_diffs_leave_what_a_fresh_load_leaves(two: tuple[str, str], seed: int, evs: list) -> None:
    applied, fresh = replay(two, seed, evs, lambda prog, prev, memo: build_model(prog, Options(), prev, memo))
    assert applied == fresh


def test_an_unchanged_endpoint_whose_set_was_renamed_is_rendered_again() -> None:
    """The same EndpointProgram object, but its peers' set is now named after another key
    (a build without history names sets after their smallest key): its lines change."""
    peers = PeerSet.of([ipaddress.ip_address("10.0.0.1")])

    def ep(name: str, key: str) -> EndpointProgram:
        rule = Rule(Origin("file", "a", name, Direction.INGRESS, 0), peers, key=key)
        return EndpointProgram(f"a/{name}", (ipaddress.ip_address(f"10.0.1.{len(key)}"),),
                               ingress=DirectionProgram(True, (rule,)))

    e = ep("e", "k2")
    memo = Memo()
    build_model(Program("file", {"a/e": e}), memo=memo)
    second = Program("file", {"a/e": e, "a/f": ep("f", "k1xx")})
    assert build_model(second, memo=memo) == build_model(second)
