"""The --dns-egress glue (agent/dns/egress.py) without a kernel: a fake daemon and hold."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from agent.dns.egress import DnsEgress, learner_rules
from agent.ir import Program
from agent.simulate import evaluate
from tests.kit.builders import BASE, snapshot_of
from tests.kit.dns_fakes import API, CNP, WEB, FakeHold, answer

CLI, OUT = "10.0.1.1", "192.0.2.7"  # BASE: b/cli (not a subject); an outside address


class FakeDaemon:
    def __init__(self) -> None:
        self.transform: Callable[[Program], Program] | None = None
        self.on_synced: list[Callable[[Any], None]] = []
        self.registry = CollectorRegistry()
        self.base: Program | None = None
        self.program: Program | None = None
        self.applies = 0

    def reapply(self) -> bool:
        assert self.transform is not None and self.base is not None
        self.program = self.transform(self.base)
        self.applies += 1
        return True


def allowed(prog: Program | None, src: str, dst: str) -> bool:
    assert prog is not None
    return evaluate(prog, ipaddress.ip_address(src), ipaddress.ip_address(dst), "tcp", 443).verdict == "accept"


def test_learns_applies_before_returning_and_expires() -> None:
    now = [1000.0]
    d = FakeDaemon()
    egress = DnsEgress(d, floor=60, clock=lambda: now[0], hold=FakeHold)  # type: ignore[arg-type]
    snap = snapshot_of([*BASE, CNP])
    d.base = snap.program
    for cb in d.on_synced:
        cb(snap)
    assert sorted(egress.rules) == ["a/api", "a/web"]
    assert sorted(egress.hold.attached) == [f"veth-{WEB}", f"veth-{API}"]  # type: ignore[attr-defined]

    egress.on_answer(ipaddress.ip_address(WEB), answer("www.example.test", OUT))
    assert d.applies == 1 and allowed(d.program, WEB, OUT) and not allowed(d.program, API, OUT)
    egress.on_answer(ipaddress.ip_address(WEB), answer("www.example.test", OUT))  # nothing new: no apply
    egress.on_answer(ipaddress.ip_address(WEB), answer("www.other.test", "192.0.2.8"))  # no rule's name
    egress.on_answer(ipaddress.ip_address(CLI), answer("www.example.test", OUT))  # not a subject
    assert d.applies == 1
    samples = {(s.name, tuple(s.labels.values())): s.value for m in d.registry.collect() for s in m.samples}
    assert samples[("stockade_dns_answers_total", ("learned",))] == 2
    assert samples[("stockade_dns_answers_total", ("nothing",))] == 1
    assert samples[("stockade_dns_answers_total", ("not_selected",))] == 1
    assert samples[("stockade_dns_learned_entries", ())] == 1

    now[0] += 100  # the TTL (100 s, above the floor) is over
    d.reapply()
    assert not allowed(d.program, WEB, OUT)
    samples = {(s.name, tuple(s.labels.values())): s.value for m in d.registry.collect() for s in m.samples}
    assert samples[("stockade_dns_expired_entries_total", ())] == 1


def test_learner_rules_of_an_inventory() -> None:
    snap = snapshot_of([*BASE, CNP])
    rules = learner_rules(snap.inventory, snap.program.endpoints)
    assert {k: [r.key for r in v] for k, v in rules.items()} == {
        "a/api": ["file:cnp:names/egress/0"], "a/web": ["file:cnp:names/egress/0"]}
    assert learner_rules(snapshot_of(BASE).inventory, ["a/web"]) == {}
