"""nftmodel.update (the dataplane's event path: the new model from the previous one and what
changed) builds exactly what the full build_model builds, after every event of random
event sequences: driven through admission and the incremental compiler over a generated
cluster (unchanged endpoints and prefixes stay the same objects), and over hand-made
programs that hit its edges (an address two endpoints claim, devices, learned rules, the
unknown-endpoint guard, peer sets that move apart and back together). Its diffs, applied
one after another to a real table, leave what a fresh load of the last model leaves."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.dataplane import nftmodel
from agent.dataplane.base import DataplaneError
from agent.dataplane.nftables import render_diff
from agent.dataplane.nftmodel import Memo, Model, Options, build_model, update
from agent.ir import LEARNED_MARK, Direction, DirectionProgram, EndpointProgram, Origin, PeerSet, Program, Rule
from tests.kit.nftns import throwaway_netns
from tests.kit.nftworld import GUARDS, World, replay, same_model

KINDS = ("pod_local", "pod_remote", "pod_labels", "pod_removed", "policy_changed", "policy_removed",
         "policy_added", "namespace_labels", "guard")
events = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 10_000)), min_size=1, max_size=12)
OPTS = (Options(), Options(audit=True, log_group=None))


def _tallies_hold_what_is_used(memo: Memo) -> None:
    """Nothing leaks: the tallies name exactly the peer sets and rule keys in use."""
    t = memo.tally
    assert t is not None
    refs = [r for b in memo.endpoints.values() for r in b.refs]
    assert set(t.peers) == {id(p) for _, p in refs} == set(t.uses)
    assert set(t.keys) == {k for k, _ in refs} == set(t.last)
    assert all(n > 0 for n in (*t.uses.values(), *t.keys.values(), *t.claims.values()))


@pytest.fixture
def rebuilds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts update's full builds."""
    calls: list[int] = []
    full = nftmodel._rebuild

    def counted(*args: Any) -> Model:
        calls.append(1)
        return full(*args)

    monkeypatch.setattr(nftmodel, "_rebuild", counted)
    return calls


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 50), st.sampled_from(OPTS), events)
def test_update_builds_what_a_full_build_builds_after_every_event(
        rebuilds: list[int], seed: int, opts: Options, evs: list) -> None:
    rebuilds.clear()
    world = World(seed)
    memo = Memo()
    prev = update(world.program(), opts, None, memo)
    same_model(prev, build_model(world.program(), opts))
    for kind, n in evs:
        world.event(kind, n)
        prog = world.program()
        inc = update(prog, opts, prev, memo)
        ref = build_model(prog, opts, prev)  # the same history: names of shared sets follow it
        same_model(inc, ref)
        assert render_diff(prev, inc) == render_diff(prev, ref)
        assert set(memo.endpoints) == set(prog.endpoints)
        _tallies_hold_what_is_used(memo)
        prev = inc
    assert len(rebuilds) == 1  # the first build only: every event followed the change


# Hand-made programs: five endpoints on a few addresses (two may claim one), a few rule
# keys whose peers come from a small pool, some endpoints behind a device.
ADDRS = [ipaddress.ip_address(a) for a in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.1.0", "fd00::1", "fd00::2")]
NETS = [ipaddress.ip_network(n) for n in ("10.0.2.0/24", "10.0.0.0/30", "fd00::/120")]
KEYS = ("k0", "k1", "k2", "k3", "k4")  # k4: a domainNames rule (its key names its endpoint)
peers_st = st.lists(st.sampled_from(ADDRS + NETS), max_size=5)
endpoint_st = st.fixed_dictionaries({
    "ips": st.lists(st.sampled_from(ADDRS[:4] + ADDRS[4:5]), min_size=0, max_size=2, unique=True),
    "rules": st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(list(Direction))), max_size=4),
    "isolated": st.booleans(),
    "device": st.sampled_from([None, None, "wt0", "wt1"]),
})
step_st = st.one_of(
    st.tuples(st.just("endpoint"), st.integers(0, 4), st.none() | endpoint_st),
    st.tuples(st.just("peers"), st.sampled_from(KEYS[:4]), peers_st),
    st.tuples(st.just("guard"), st.integers(0, 1), st.none()),
)


class Hand:
    def __init__(self) -> None:
        self.peers: dict[str, PeerSet] = {k: PeerSet.of([]) for k in KEYS}
        self.specs: dict[int, dict[str, Any]] = {}
        self.eps: dict[str, EndpointProgram] = {}
        self.guard: tuple[Any, ...] = ()

    def _endpoint(self, i: int, spec: dict[str, Any]) -> EndpointProgram:
        key = f"a/e{i}"
        dirs = {}
        for d in Direction:
            rules = tuple(Rule(Origin("file", "a", f"p{j}", d, j), self.peers[k],
                               key=f"{k}{LEARNED_MARK}{key}" if k == "k4" else k)
                          for j, (k, rd) in enumerate(spec["rules"]) if rd is d)
            dirs[d] = DirectionProgram(spec["isolated"], rules)
        return EndpointProgram(key, tuple(spec["ips"]), dirs[Direction.INGRESS], dirs[Direction.EGRESS],
                               spec["device"])

    def step(self, what: str, a: Any, b: Any) -> None:
        if what == "endpoint":
            if b is None:
                self.specs.pop(a, None)
                self.eps.pop(f"a/e{a}", None)
            else:
                self.specs[a] = b
                self.eps[f"a/e{a}"] = self._endpoint(a, b)
        elif what == "peers":  # every endpoint with a rule of key `a` gets the new peers
            self.peers[a] = PeerSet.of(b)
            for i, spec in self.specs.items():
                if any(k == a for k, _ in spec["rules"]):
                    self.eps[f"a/e{i}"] = self._endpoint(i, spec)
        else:
            self.guard = GUARDS[a]

    def program(self) -> Program:
        return Program("file", dict(self.eps), self.guard)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(OPTS), st.lists(step_st, min_size=1, max_size=25))
def test_update_follows_hand_made_programs_to_their_edges(opts: Options, steps: list) -> None:
    hand = Hand()
    memo = Memo()
    prev = update(hand.program(), opts, None, memo)
    for step in steps:
        hand.step(*step)
        prog = hand.program()
        inc = update(prog, opts, prev, memo)
        same_model(inc, build_model(prog, opts, prev))
        _tallies_hold_what_is_used(memo)
        prev = inc


def test_an_address_two_endpoints_claim_goes_to_the_later_one_as_in_a_full_build() -> None:
    hand = Hand()
    spec = {"ips": [ADDRS[0]], "rules": [("k0", Direction.INGRESS)], "isolated": True, "device": None}
    hand.step("endpoint", 0, spec)
    hand.step("endpoint", 1, spec)
    memo = Memo()
    prev = update(hand.program(), Options(), None, memo)
    hand.step("endpoint", 1, None)  # the later claimant goes: the address is e0's again
    prog = hand.program()
    m = update(prog, Options(), prev, memo)
    assert m == build_model(prog, Options(), prev)
    assert m.maps["ingress4"]["10.0.0.1"] == f"jump {nftmodel.chain_name('a/e0', Direction.INGRESS)}"


@pytest.fixture(scope="module")
def two() -> Iterator[tuple[str, str]]:
    with throwaway_netns("updA") as a, throwaway_netns("updB") as b:
        yield a, b


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 50), events)
def test_updated_diffs_leave_what_a_fresh_load_leaves(two: tuple[str, str], seed: int, evs: list) -> None:
    applied, fresh = replay(two, seed, evs, lambda prog, prev, memo: update(prog, Options(), prev, memo))
    assert applied == fresh


def test_a_refused_device_name_leaves_the_next_update_right() -> None:
    hand = Hand()
    spec = {"ips": [ADDRS[0]], "rules": [("k0", Direction.INGRESS)], "isolated": True, "device": None}
    hand.step("endpoint", 0, spec)
    memo = Memo()
    prev = update(hand.program(), Options(), None, memo)
    hand.step("peers", "k0", [ADDRS[1]])
    hand.step("endpoint", 1, {**spec, "device": "x" * 40})  # longer than any device name
    with pytest.raises(DataplaneError, match="interface"):
        update(hand.program(), Options(), prev, memo)
    hand.step("endpoint", 1, {**spec, "device": "wt1"})
    prog = hand.program()
    same_model(update(prog, Options(), prev, memo), build_model(prog, Options(), prev))
