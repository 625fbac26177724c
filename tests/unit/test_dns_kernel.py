"""The --dns-egress learner with a dataplane that `learns_in_kernel` (nftables): what
reaches `Dataplane.learn`, per burst, and that nothing is re-applied. A fake daemon,
dataplane and hold; the real learner."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from agent.dataplane.base import DataplaneError, LearnedEntry
from agent.dns.egress import DnsEgress
from agent.ir import Program
from agent.policy.cluster.domains import learned_rule_key
from tests.kit.builders import BASE, snapshot_of
from tests.kit.dns_fakes import API, CNP, WEB, FakeHold, answer


class FakeDataplane:
    learns_in_kernel = True

    def __init__(self) -> None:
        self.calls: list[tuple[list[LearnedEntry], list[LearnedEntry]]] = []
        self.fail = False

    def learn(self, add: list[LearnedEntry], remove: list[LearnedEntry] = ()) -> None:  # type: ignore[assignment]
        if self.fail:
            raise DataplaneError("refused")
        self.calls.append((list(add), list(remove)))


class FakeDaemon:
    def __init__(self) -> None:
        self.transform: Callable[[Program], Program] | None = None
        self.on_synced: list[Callable[[Any], None]] = []
        self.registry = CollectorRegistry()
        self.dataplane = FakeDataplane()
        self.apply_lock = threading.Lock()
        self.applies = 0

    def reapply(self) -> bool:
        self.applies += 1
        return True


def setup(cap: int = 4096) -> tuple[FakeDaemon, DnsEgress, list[float], Program]:
    now = [1000.0]
    d = FakeDaemon()
    egress = DnsEgress(d, floor=60, cap=cap, clock=lambda: now[0], hold=FakeHold)  # type: ignore[arg-type]
    snap = snapshot_of([*BASE, CNP])
    assert d.transform is not None and d.transform(snap.program) is snap.program  # no addresses injected
    for cb in d.on_synced:
        cb(snap)
    return d, egress, now, snap.program


def rule_of(prog: Program, endpoint: str) -> str:
    return next(r.key for r in prog.endpoints[endpoint].egress.rules if r.learned)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def value(egress: DnsEgress, name: str, **labels: str) -> float:
    v = egress.daemon.registry.get_sample_value(name, labels or None)
    return 0.0 if v is None else v


def test_a_burst_is_one_learn_call_with_its_new_entries_and_no_reapply() -> None:
    d, egress, _now, prog = setup()
    assert d.dataplane.calls == []  # nothing learned yet: nothing re-sent after the sync
    assert egress.learn(ip(WEB), answer("www.example.test", "192.0.2.7", "192.0.2.8"))
    assert egress.learn(ip(API), answer("api.example.test", "192.0.2.9", ttl=300))
    assert not egress.learn(ip(WEB), answer("www.other.test", "192.0.2.10"))  # no rule's name
    egress.commit()
    (add, remove), = d.dataplane.calls
    web, api = rule_of(prog, "a/web"), rule_of(prog, "a/api")
    assert web == learned_rule_key(egress.rules["a/web"][0].key, "a/web")
    assert sorted((e.rule, str(e.address), e.expires) for e in add) == sorted(
        [(web, "192.0.2.7", 1100.0), (web, "192.0.2.8", 1100.0), (api, "192.0.2.9", 1300.0)])
    assert remove == [] and d.applies == 0
    assert value(egress, "stockade_dns_kernel_updates_total") == 1
    egress.commit()  # nothing pending: an empty update
    assert d.dataplane.calls[-1] == ([], [])


def test_a_refresh_sends_only_a_later_expiry() -> None:
    d, egress, now, _prog = setup()
    egress.learn(ip(WEB), answer("www.example.test", "192.0.2.7", ttl=200))
    egress.commit()
    now[0] += 10
    assert not egress.learn(ip(WEB), answer("www.example.test", "192.0.2.7", ttl=100))  # ends sooner: nothing
    now[0] += 150
    assert egress.learn(ip(WEB), answer("www.example.test", "192.0.2.7", ttl=100))  # ends later: re-timed
    egress.commit()
    add, remove = d.dataplane.calls[-1]
    assert [(str(e.address), e.expires) for e in add] == [("192.0.2.7", 1260.0)] and remove == []


def test_entries_the_per_pod_cap_evicts_are_removed_in_the_same_update() -> None:
    d, egress, _now, prog = setup(cap=2)
    egress.learn(ip(WEB), answer("a.example.test", "192.0.2.1", ttl=100))
    egress.learn(ip(WEB), answer("b.example.test", "192.0.2.2", ttl=200))
    egress.commit()
    egress.learn(ip(WEB), answer("c.example.test", "192.0.2.3", ttl=300))  # evicts .1 (soonest)
    egress.learn(ip(API), answer("d.example.test", "192.0.2.4", ttl=300))  # another pod: its own cap
    egress.commit()
    add, remove = d.dataplane.calls[-1]
    assert sorted(str(e.address) for e in add) == ["192.0.2.3", "192.0.2.4"]
    assert [(e.rule, str(e.address)) for e in remove] == [(rule_of(prog, "a/web"), "192.0.2.1")]
    # evicted then learned again before the commit: an add, not a removal
    egress.learn(ip(WEB), answer("e.example.test", "192.0.2.5", ttl=400))  # evicts .2
    egress.learn(ip(WEB), answer("b.example.test", "192.0.2.2", ttl=500))  # back, evicts .3
    egress.commit()
    add, remove = d.dataplane.calls[-1]
    assert sorted(str(e.address) for e in add) == ["192.0.2.2", "192.0.2.5"]
    assert [str(e.address) for e in remove] == ["192.0.2.3"]


def test_every_live_entry_is_sent_again_after_each_sync_and_expiry_needs_no_update() -> None:
    d, egress, now, _prog = setup()
    egress.learn(ip(WEB), answer("www.example.test", "192.0.2.7", ttl=100))
    egress.learn(ip(API), answer("www.example.test", "192.0.2.8", ttl=300))
    egress.commit()
    calls = len(d.dataplane.calls)
    now[0] += 150  # WEB's entry is past its expiry
    snap = snapshot_of([*BASE, CNP])
    for cb in d.on_synced:
        cb(snap)
    add, remove = d.dataplane.calls[calls]
    assert [(str(e.address), e.expires) for e in add] == [("192.0.2.8", 1300.0)] and remove == []
    # the rule is gone from the program: nothing of it is sent
    snap = snapshot_of(BASE)
    for cb in d.on_synced:
        cb(snap)
    assert len(d.dataplane.calls) == calls + 1
    assert d.transform is not None
    d.transform(snap.program)  # the table forgets what expired, and counts it
    assert value(egress, "stockade_dns_expired_entries_total") == 1 and d.applies == 0


def test_a_failed_kernel_update_is_counted_and_never_raised() -> None:
    d, egress, _now, _prog = setup()
    d.dataplane.fail = True
    egress.on_answer(ip(WEB), answer("www.example.test", "192.0.2.7"))  # learn + commit: no exception
    assert value(egress, "stockade_dns_kernel_update_failures_total") == 1
    d.dataplane.fail = False
    snap = snapshot_of([*BASE, CNP])
    for cb in d.on_synced:
        cb(snap)  # the next sync sends it again
    assert [str(e.address) for e in d.dataplane.calls[-1][0]] == ["192.0.2.7"]


def test_a_sync_resends_only_what_it_may_have_emptied() -> None:
    """After a diff sync only the entries of rules new to the kernel go again (an unrelated
    event costs nothing); after a full load or a failed update every live entry does."""
    from agent.dataplane.base import ApplyStats

    d, egress, _now, _prog = setup()
    egress.learn(ip(WEB), answer("www.example.test", "192.0.2.7"))
    egress.learn(ip(API), answer("www.example.test", "192.0.2.8"))
    egress.commit()
    calls = len(d.dataplane.calls)

    def sync(objs: list[dict[str, Any]], full: bool) -> list[str]:
        d.last_stats = ApplyStats(full=full, commands=1)  # type: ignore[attr-defined]
        snap = snapshot_of(objs)
        for cb in d.on_synced:
            cb(snap)
        new = d.dataplane.calls[calls:]
        del d.dataplane.calls[calls:]
        return sorted(str(e.address) for add, _ in new for e in add)

    assert sync([*BASE, CNP], full=False) == []  # the same rules: nothing to send
    assert sync([*BASE, CNP], full=True) == ["192.0.2.7", "192.0.2.8"]  # a table rebuilt whole
    assert sync(BASE, full=False) == []  # the rules went
    assert sync([*BASE, CNP], full=False) == ["192.0.2.7", "192.0.2.8"]  # back: new sets, filled again
    d.dataplane.fail = True
    egress.learn(ip(WEB), answer("www.example.test", "192.0.2.9"))
    egress.commit()  # refused
    d.dataplane.fail = False
    assert sync([*BASE, CNP], full=False) == ["192.0.2.7", "192.0.2.8", "192.0.2.9"]
    assert sync([*BASE, CNP], full=False) == []


def test_drops_are_labelled_not_learned_only_past_the_domain_names_rule() -> None:
    """With learning in the kernel the program's domainNames rules carry no addresses, so a
    drop is labelled `not a learned address` only when the packet got past that rule: by a
    later Deny or the default deny, never by a Deny before it (which decides whatever the
    pod learned)."""
    from agent.dataplane.base import DropEvent
    from agent.drops import describe
    from agent.ir import Direction

    first = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
             "metadata": {"name": "first"},
             "spec": {"tier": "Admin", "priority": 0, "subject": {"namespaces": {"matchLabels": {"team": "red"}}},
                      "egress": [{"action": "Deny", "to": [{"networks": ["192.0.2.66/32"]}]}]}}
    prog = snapshot_of([*BASE, CNP, first]).program
    rules = prog.endpoints["a/web"].egress.rules
    before, after = (r for r in rules if r.verdict.value == "drop")
    assert rules.index(before) < rules.index(next(r for r in rules if r.learned)) < rules.index(after)

    def labels(rule_id: str | None) -> list[str]:
        ev = DropEvent("a/web", Direction.EGRESS, rule_id, "tcp", WEB, "192.0.2.66", 40000, 443)
        return describe(ev, prog)["not_learned"]

    assert labels(before.id) == []
    assert len(labels(after.id)) == 1
