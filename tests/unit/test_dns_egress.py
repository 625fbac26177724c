"""The --dns-egress glue (agent/dns/egress.py) without a kernel: a fake daemon and hold."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import dns.message
import dns.rrset
from prometheus_client import CollectorRegistry

from agent.dns.egress import DnsEgress, learner_rules
from agent.ir import Program
from agent.simulate import evaluate
from tests.kit.builders import BASE, snapshot_of

WEB, API, CLI, OUT = "10.0.0.1", "10.0.0.2", "10.0.1.1", "192.0.2.7"  # BASE: a/web, a/api (team=red), b/cli
CNP = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
       "metadata": {"name": "names"},
       "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchLabels": {"team": "red"}}},
                "egress": [{"action": "Accept", "to": [{"domainNames": ["*.example.test"]}]},
                           {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}]}}


class FakeHold:
    def __init__(self, on_answer: Callable[..., None], **kw: Any) -> None:
        self.on_answer, self.attached = on_answer, []

    def device_for(self, ip: Any) -> str:
        return f"veth-{ip}"

    def attach(self, dev: str) -> None:
        self.attached.append(dev)


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


def answer(name: str, ip: str, ttl: int = 100) -> bytes:
    r = dns.message.make_response(dns.message.make_query(name, "A"))
    r.answer.append(dns.rrset.from_text(name + ".", ttl, "IN", "A", ip))
    return r.to_wire()


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
