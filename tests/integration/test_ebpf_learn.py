"""Destinations learned from DNS answers in the eBPF `learned` map, on real packets:
`EbpfDataplane.learn` makes a learned address reachable on its rule's ports only, with no
flip; an unlearned, removed or expired address is refused; an Admin Deny before the
domainNames Accept still wins; IPv6; a re-apply that gives the endpoint a new generation
keeps what was learned, and so does a restart over unchanged tables; a full map is refused
by name, then grown by the next apply."""

from __future__ import annotations

import ipaddress
import time

import pytest

from agent.dataplane.base import DataplaneError, LearnedEntry
from agent.dataplane.ebpf import EbpfDataplane, Sizes
from agent.dataplane.ebpf.layout import F_LEARNED
from agent.ir import Direction, DirectionProgram, EndpointProgram, Origin, PortMatch, Program, Rule, Tier, Verdict
from agent.policy.cluster.domains import learned_rule_key
from tests.kit import Lab, expect
from tests.kit.ebpf_lab import A6, B6, A, B, C, net

D = "10.30.0.4"
EG = Direction.EGRESS
RULE = learned_rule_key("cnp:allow-names:egress:1", "app/a")  # the IR key of a's domainNames rule


def _origin(i: int, verdict: str) -> Origin:
    return Origin("kubernetes", "", "allow-names", EG, i, name=verdict, tier=Tier.ADMIN,
                  kind="ClusterNetworkPolicy", priority=10)


def _program(extra: bool = False) -> Program:
    """a's egress: an Admin Deny of c on TCP 80, then the domainNames Accept on TCP 80 (its
    peers: learned in the kernel), isolated; `extra`: one more rule (a new generation)."""
    rules = [
        Rule(_origin(0, "deny-c"), net(C), (PortMatch("tcp", 80, 80),), Verdict.DROP, key="deny-c"),
        Rule(_origin(1, "names"), net(), (PortMatch("tcp", 80, 80),), Verdict.ACCEPT, key=RULE),
    ]
    if extra:
        rules.append(Rule(_origin(2, "docs"), net("192.0.2.0/24"), (PortMatch("tcp", 443, 443),), key="docs"))
    ip = ipaddress.ip_address
    return Program("file", {
        "app/a": EndpointProgram("app/a", (ip(A), ip(A6)), egress=DirectionProgram(True, tuple(rules))),
        "app/b": EndpointProgram("app/b", (ip(B), ip(B6))),
        "app/c": EndpointProgram("app/c", (ip(C),)),
        "app/d": EndpointProgram("app/d", (ip(D),)),
    })


def _build(lab: Lab) -> None:
    lab.add_pod("app/a", [A, A6], ports=(80,))
    lab.add_pod("app/b", [B, B6], ports=(80, 81))
    lab.add_pod("app/c", [C], ports=(80,))
    lab.add_pod("app/d", [D], ports=(80,))


def _entry(ip: str, ttl: float) -> LearnedEntry:
    return LearnedEntry(RULE, ipaddress.ip_address(ip), time.monotonic() + ttl)


def _reach(lab: Lab, *targets: str) -> dict[str, bool]:
    return lab.probe_many({"app/a": list(targets)})["app/a"]


def test_learned_addresses_connect_on_their_rule_only(lab: Lab, pin_root: str) -> None:
    _build(lab)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(_program())
        assert dp.eps is not None
        a, b = dp.eps["app/a"], dp.eps["app/b"]
        assert a.tables and a.tables[EG].flags & F_LEARNED
        assert b.tables and not b.tables[EG].flags & F_LEARNED  # no domainNames rule: no extra lookup
        # nothing learned yet: the domainNames rule matches nothing
        assert _reach(lab, f"tcp:{B}:80", f"tcp:{D}:80") == {f"tcp:{B}:80": False, f"tcp:{D}:80": False}

        gen = a.gen
        dp.learn([_entry(B, 600), _entry(B6, 600), _entry(C, 600)])
        assert a.gen == gen  # no new generation, no flip
        assert dp.fill()["learned"][0] == 3
        assert _reach(lab, f"tcp:{B}:80", f"tcp:{B}:81", f"tcp:{B6}:80", f"tcp:{C}:80", f"tcp:{D}:80") == {
            f"tcp:{B}:80": True,  # learned, on the rule's port
            f"tcp:{B}:81": False,  # another port
            f"tcp:{B6}:80": True,  # IPv6
            f"tcp:{C}:80": False,  # learned, but the Admin Deny before the Accept wins
            f"tcp:{D}:80": False,  # never learned
        }

        # an unrelated change to a's rules: a new generation, what was learned carried over
        dp.apply(_program(extra=True))
        assert a.gen == gen + 1
        assert _reach(lab, f"tcp:{B}:80", f"tcp:{B6}:80", f"tcp:{C}:80", f"tcp:{B}:81") == {
            f"tcp:{B}:80": True, f"tcp:{B6}:80": True, f"tcp:{C}:80": False, f"tcp:{B}:81": False}
        dp.apply(_program(extra=True))  # the replaced generation's entries go
        assert {k[4:8] for k in dp.maps["learned"].all_keys()} == {(a.gen).to_bytes(4, "little")}

        # removed: refused again (the other address stays)
        dp.learn([], [_entry(B, 0)])
        assert _reach(lab, f"tcp:{B}:80", f"tcp:{B6}:80") == {f"tcp:{B}:80": False, f"tcp:{B6}:80": True}

        # an entry expiring soon: allowed now, refused once its expiry passed (no call between)
        dp.learn([_entry(D, 3)])
        assert _reach(lab, f"tcp:{D}:80") == {f"tcp:{D}:80": True}
        expect(lambda: not _reach(lab, f"tcp:{D}:80")[f"tcp:{D}:80"], timeout=30, what="D refused after expiry")
        dp.learn([])  # the lazy sweep: the expired entry leaves the map
        assert dp.fill()["learned"][0] == 2

        # an entry of a rule the program does not hold is ignored
        dp.learn([LearnedEntry(learned_rule_key("cnp:other:egress:0", "app/a"), ipaddress.ip_address(D),
                               time.monotonic() + 600)])
        assert not _reach(lab, f"tcp:{D}:80")[f"tcp:{D}:80"]

        # the rule goes: its entries with it
        bare = _program()
        a_eg = bare.endpoints["app/a"].egress
        bare.endpoints["app/a"] = EndpointProgram("app/a", bare.endpoints["app/a"].ips, egress=DirectionProgram(
            True, a_eg.rules[:1]))
        dp.apply(bare)
        dp.apply(bare)
        assert dp.fill()["learned"][0] == 0 and not list(dp.maps["learned"].all_keys())
        assert not _reach(lab, f"tcp:{B6}:80")[f"tcp:{B6}:80"]
    finally:
        dp.cleanup()
        dp.close()


def test_a_full_learned_map_is_refused_by_name(lab: Lab, pin_root: str) -> None:
    _build(lab)
    dp = EbpfDataplane(sizes=Sizes(learned=2), pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(_program())
        dp.learn([_entry(B, 600)])
        with pytest.raises(DataplaneError, match="learned"):
            dp.learn([_entry(B6, 600), _entry(D, 600)])
        assert dp.fill()["learned"] == (1, 2)
        assert _reach(lab, f"tcp:{B}:80", f"tcp:{D}:80") == {f"tcp:{B}:80": True, f"tcp:{D}:80": False}
        dp.learn([_entry(B6, 600)])  # fits: full now
        # the next apply grows the map (room for both generations of what is learned),
        # what was learned copied into the new build
        dp.apply(_program())
        assert dp.growths == 1 and dp.fill()["learned"] == (2, 8)
        dp.learn([_entry(D, 600)])
        assert _reach(lab, f"tcp:{B}:80", f"tcp:{B6}:80", f"tcp:{D}:80", f"tcp:{C}:80") == {
            f"tcp:{B}:80": True, f"tcp:{B6}:80": True, f"tcp:{D}:80": True, f"tcp:{C}:80": False}
    finally:
        dp.cleanup()
        dp.close()


def test_a_restarted_agent_keeps_what_was_learned_when_its_tables_are_kept(lab: Lab, pin_root: str) -> None:
    _build(lab)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(_program())
        soon = _entry(D, 600)
        dp.learn([_entry(B, 600), _entry(B6, 600), soon])
        assert _reach(lab, f"tcp:{B}:80") == {f"tcp:{B}:80": True}
        dp._deferred = None  # as if the process died
        dp.close()
        dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
        dp.apply(_program())  # adopted, tables unchanged: the learned entries read back, kept
        dp.apply(_program())
        assert dp.memory.count() == 3 and len(list(dp.maps["learned"].all_keys())) == 3
        assert abs(dp.memory.held["app/a"][ipaddress.ip_address(D)][RULE] - soon.expires) < 1e-6
        assert _reach(lab, f"tcp:{B}:80", f"tcp:{B6}:80", f"tcp:{B}:81") == {
            f"tcp:{B}:80": True, f"tcp:{B6}:80": True, f"tcp:{B}:81": False}
        dp.learn([], [_entry(D, 0)])  # known again: removable
        assert not _reach(lab, f"tcp:{D}:80")[f"tcp:{D}:80"]
        dp.apply(_program(extra=True))  # and carried into a new generation
        assert _reach(lab, f"tcp:{B}:80", f"tcp:{B6}:80") == {f"tcp:{B}:80": True, f"tcp:{B6}:80": True}

        # a restart over changed tables rewrites the endpoint: what it learned is dropped
        dp._deferred = None
        dp.close()
        dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
        dp.apply(_program())
        dp.apply(_program())
        assert not list(dp.maps["learned"].all_keys()) and dp.memory.count() == 0
        assert _reach(lab, f"tcp:{B}:80") == {f"tcp:{B}:80": False}
        dp.learn([_entry(B, 600)])  # learned again
        assert _reach(lab, f"tcp:{B}:80", f"tcp:{B6}:80") == {f"tcp:{B}:80": True, f"tcp:{B6}:80": False}
    finally:
        dp.cleanup()
        dp.close()
