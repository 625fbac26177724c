"""A small generated cluster driven event by event through admission and the incremental
compiler, as the nft model tests need it (tests/unit/test_nft_incremental.py, the memoised
full build; test_nft_model_update.py, `nftmodel.update`): one World, one model comparison
and one replay of a model's diffs into a real table, shared by both."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from typing import Any

from agent.admission import LastGood, kubernetes_inventory
from agent.dataplane.nftables import FAMILY, TABLE, render_diff, render_full, render_staged
from agent.dataplane.nftmodel import Memo, Model
from agent.ir import Program
from agent.policy.kubernetes.incremental import IncrementalCompiler
from agent.sources.kubeobjects import RawObject, ref_of
from tests.kit.generate import generate
from tests.kit.nftns import nft_file, table_objects

GUARDS = ((), (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")))


class World:
    """A small generated cluster as a source holds it (unchanged objects stay the same
    objects) and one incremental compiler kept across events."""

    def __init__(self, seed: int) -> None:
        self.cl = generate(120, 14, seed=seed)
        self.objects: dict[tuple[str, str, str], RawObject] = {}
        for body in self.cl.objects():
            self.put(body)
        self.store = LastGood()
        self.compiler = IncrementalCompiler(self.cl.node, "kubernetes")
        self.guard: tuple[Any, ...] = ()
        self.added = 0

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
        elif kind in ("policy_changed", "policy_removed", "policy_added") and cl.policy_objs:
            i = n % len(cl.policy_objs)
            if kind == "policy_removed":
                self.drop(cl.policy_objs.pop(i))
            elif kind == "policy_added":
                body = dict(cl.policy_objs[i], metadata={**cl.policy_objs[i]["metadata"], "name": f"x{self.added}"})
                self.added += 1
                cl.policy_objs.append(body)
                self.put(body)
            else:
                cl.policy_objs[i] = cl.change_policy(cl.policy_objs[i])
                self.put(cl.policy_objs[i])
        elif kind == "namespace_labels":
            i = n % len(cl.namespaces)
            cl.namespaces[i] = cl.relabel_namespace(cl.namespaces[i])
            self.put(cl.namespaces[i])
        elif kind == "guard":
            self.guard = GUARDS[n % 2]

    def program(self) -> Program:
        prog = self.compiler.compile(kubernetes_inventory(list(self.objects.values()), self.store))
        return dataclasses.replace(prog, guard=self.guard) if self.guard else prog


def same_model(inc: Model, ref: Model) -> None:
    assert inc == ref  # sets, chains, maps, owners, learned
    assert inc.shared == ref.shared and inc.by_content == ref.by_content
    assert render_full(inc) == render_full(ref)


Build = Callable[[Program, "Model | None", Memo], Model]
"""(program, previous model, memo) -> the new model: what the dataplane builds per event."""


def replay(two: tuple[str, str], seed: int, evs: list, build: Build) -> tuple[Any, Any]:
    """A World's first model loaded staged into one namespace's table, then each event's
    diff applied to it; the last model loaded whole into the other's. Both tables' objects."""
    applied, fresh = two
    for ns in two:
        nft_file(ns, f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")
    world = World(seed)
    memo = Memo()
    m = build(world.program(), None, memo)
    for text in render_staged(m):
        nft_file(applied, text)
    for kind, n in evs:
        world.event(kind, n)
        new = build(world.program(), m, memo)
        text, _ = render_diff(m, new)
        if text:
            nft_file(applied, text)
        m = new
    nft_file(fresh, render_full(m))
    return table_objects(applied, FAMILY, TABLE), table_objects(fresh, FAMILY, TABLE)
