"""build_model with a memo (what the dataplane keeps across syncs) builds exactly what a
build without one builds, after every event of a random sequence driven through the
incremental compiler (which hands unchanged endpoints back as the same objects); the
diffs it yields, applied one after another to a real table, leave what a fresh load of
the last model leaves."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.admission import LastGood, kubernetes_inventory
from agent.dataplane.nftables import (
    FAMILY,
    TABLE,
    Memo,
    Model,
    Options,
    build_model,
    render_diff,
    render_full,
    render_staged,
)
from agent.ir import Direction, DirectionProgram, EndpointProgram, Origin, PeerSet, Program, Rule
from agent.policy.kubernetes.incremental import IncrementalCompiler
from agent.sources.kubeobjects import RawObject, ref_of
from tests.kit.generate import generate
from tests.kit.nftns import nft_file, table_objects, throwaway_netns

KINDS = ("pod_local", "pod_remote", "pod_labels", "pod_removed", "policy_changed", "policy_removed",
         "namespace_labels")
events = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 10_000)), min_size=1, max_size=12)
OPTS = (Options(), Options(audit=True, log_group=None))


class World:
    """A small generated cluster, its objects as a source holds them (unchanged objects stay
    the same objects) and one incremental compiler kept across events."""

    def __init__(self, seed: int) -> None:
        self.cl = generate(120, 14, seed=seed)
        self.objects: dict[tuple[str, str, str], RawObject] = {}
        for body in self.cl.objects():
            self.put(body)
        self.store = LastGood()
        self.compiler = IncrementalCompiler(self.cl.node, "kubernetes")

    def put(self, body: dict[str, Any]) -> None:
        obj = RawObject(ref_of(body, "kubernetes"), body)
        self.objects[(obj.ref.kind, obj.ref.namespace, obj.ref.name)] = obj

    def drop(self, body: dict[str, Any]) -> None:
        ref = ref_of(body, "kubernetes")
        self.objects.pop((ref.kind, ref.namespace, ref.name), None)

    def event(self, kind: str, n: int) -> None:
        cl = self.cl
        if kind in ("pod_local", "pod_remote"):
            body = cl.new_pod(local=kind == "pod_local")
            cl.pod_objs.append(body)
            self.put(body)
        elif kind in ("pod_labels", "pod_removed") and cl.pod_objs:
            i = n % len(cl.pod_objs)
            if kind == "pod_removed":
                self.drop(cl.pod_objs.pop(i))
            else:
                cl.pod_objs[i] = cl.relabel_pod(cl.pod_objs[i])
                self.put(cl.pod_objs[i])
        elif kind in ("policy_changed", "policy_removed") and cl.policy_objs:
            i = n % len(cl.policy_objs)
            if kind == "policy_removed":
                self.drop(cl.policy_objs.pop(i))
            else:
                cl.policy_objs[i] = cl.change_policy(cl.policy_objs[i])
                self.put(cl.policy_objs[i])
        elif kind == "namespace_labels":
            i = n % len(cl.namespaces)
            cl.namespaces[i] = cl.relabel_namespace(cl.namespaces[i])
            self.put(cl.namespaces[i])

    def program(self) -> Program:
        return self.compiler.compile(kubernetes_inventory(list(self.objects.values()), self.store))


def _same(inc: Model, ref: Model) -> None:
    assert inc == ref  # sets, chains, maps, owners
    assert inc.shared == ref.shared and inc.by_content == ref.by_content
    assert render_full(inc) == render_full(ref)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 50), st.sampled_from(OPTS), events)
def test_memo_builds_what_a_full_build_builds_after_every_event(seed: int, opts: Options, evs: list) -> None:
    world = World(seed)
    memo = Memo()
    prev = build_model(world.program(), opts, None, memo)
    _same(prev, build_model(world.program(), opts))
    for kind, n in evs:
        world.event(kind, n)
        prog = world.program()
        inc = build_model(prog, opts, prev, memo)
        ref = build_model(prog, opts, prev)  # the same history: names of shared sets follow it
        _same(inc, ref)
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
    applied, fresh = two
    for ns in two:
        nft_file(ns, f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")
    world = World(seed)
    memo = Memo()
    m = build_model(world.program(), Options(), None, memo)
    for text in render_staged(m):
        nft_file(applied, text)
    for kind, n in evs:
        world.event(kind, n)
        new = build_model(world.program(), Options(), m, memo)
        text, _ = render_diff(m, new)
        if text:
            nft_file(applied, text)
        m = new
    nft_file(fresh, render_full(m))
    assert table_objects(applied, FAMILY, TABLE) == table_objects(fresh, FAMILY, TABLE)


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
