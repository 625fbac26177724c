"""Tiers (ClusterNetworkPolicy Admin and Baseline around NetworkPolicy) by real packets on
both dataplanes: hand-built tiered IR programs (no CNP parser involved) applied through
each dataplane in the namespace lab.

What the packets show (b's ingress is isolated by a NetworkPolicy; a's is not):
- an Admin Deny beats a NetworkPolicy accept (c -> b:80, TCP and UDP);
- an Admin Accept beats the NetworkPolicy default deny (a -> b:81);
- an Admin Pass skips the rest of the Admin tier, and the isolation then denies
  (a -> b:8000, which a later Admin Accept would have allowed);
- under isolation the Baseline tier is never reached (a -> b:8001);
- with no NetworkPolicy, after an Admin Pass, a Baseline Deny drops (c -> a:80), a
  Baseline Pass allows with nothing further applying (c -> a:81, before a Baseline
  deny-all) and a Baseline Accept allows (b -> a:80);
- an Admin Deny on egress (a -> b:82) wins over b's ingress accept.
Counters count the deciding rule (and `stockade counters` and /metrics name its tier), a
drop by an Admin Deny is sampled naming its rule (as `stockade drops` prints it),
an update from one tiered program to another (nftables: render_diff) and a restarted
dataplane (eBPF: adopting the pinned maps; nftables: replacing the table) enforce the
same, audit mode passes tiered drops and reports them, and the simulator agrees with every
probe, also for seeded random tiered programs applied one after another.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator
from typing import Any

import pytest

from agent.drops import describe, drop_text
from agent.inventory import Inventory
from agent.ir import (
    Direction,
    DirectionProgram,
    EndpointProgram,
    Origin,
    PeerSet,
    PortMatch,
    Program,
    Rule,
    Tier,
    Verdict,
)
from agent.metrics import KernelCollector, counter_text
from agent.pipeline import Snapshot
from agent.query import counters as counter_table
from agent.simulate import evaluate
from tests.kit import Lab, until
from tests.kit.planes import Plane, check_probes

A, B, C = "10.31.0.1", "10.31.0.2", "10.31.0.3"
A6, B6, C6 = "fd00:31::1", "fd00:31::2", "fd00:31::3"
IN, EG = Direction.INGRESS, Direction.EGRESS
CNP = "ClusterNetworkPolicy"


def admin(policy: str, priority: int, d: Direction, index: int = 0, name: str = "") -> Origin:
    return Origin("file", "", policy, d, index, name, tier=Tier.ADMIN, kind=CNP, priority=priority)


def baseline(index: int, name: str = "") -> Origin:
    return Origin("file", "", "default", IN, index, name, tier=Tier.BASELINE, kind=CNP)


def np(policy: str, index: int = 0) -> Origin:
    return Origin("file", "app", policy, IN, index)


def net(*xs: str) -> PeerSet:
    return PeerSet.of(ipaddress.ip_network(x) for x in xs)


def tcp(*ports: int) -> tuple[PortMatch, ...]:
    return tuple(PortMatch("tcp", p, p) for p in ports)


def both(*ports: int) -> tuple[PortMatch, ...]:
    return tuple(PortMatch(proto, p, p) for proto in ("tcp", "udp") for p in ports)


OPEN = DirectionProgram()  # not enforced


def ep(key: str, ips: tuple[str, ...], ingress: DirectionProgram = OPEN,
       egress: DirectionProgram = OPEN) -> EndpointProgram:
    return EndpointProgram(key, tuple(map(ipaddress.ip_address, ips)), ingress, egress)


DENY_C = Rule(admin("deny-c", 10, IN, name="no-c"), net(C, C6), both(80), Verdict.DROP, key="deny-c")
ALLOW_A_81 = Rule(admin("allow-a", 20, IN), net(A, A6), tcp(81), key="allow-a")
PASS_ALL = Rule(admin("pass-all", 30, IN), None, (), Verdict.PASS, key="pass-all")
SKIPPED = Rule(admin("pass-all", 30, IN, 1), None, tcp(8000), key="skipped")  # after the Pass: never reached
NP_WEB = Rule(np("web"), net(A, A6, C, C6), (*both(80), *tcp(82)), key="np-web")
UNREACHED = Rule(baseline(0, "open-8001"), None, tcp(8001), key="b-open-8001")  # under isolation


def b_ingress() -> DirectionProgram:
    return DirectionProgram(True, (DENY_C, ALLOW_A_81, PASS_ALL, SKIPPED, NP_WEB, UNREACHED), ("app/web",))


PASS_C = Rule(admin("pass-c", 5, IN), net(C, C6), (), Verdict.PASS, key="pass-c")
DENY_C_80 = Rule(admin("deny-c-80", 50, IN), net(C, C6), tcp(80), Verdict.DROP, key="deny-c-80")  # skipped
BASE_DENY_C = Rule(baseline(1, "no-c-80"), net(C, C6), tcp(80), Verdict.DROP, key="b-deny-c")
BASE_PASS_C = Rule(baseline(2), net(C, C6), tcp(81), Verdict.PASS, key="b-pass-c")
BASE_ALLOW_B = Rule(baseline(3), net(B, B6), tcp(80), key="b-allow-b")
BASE_DENY_ALL = Rule(baseline(4, "deny-all"), None, (), Verdict.DROP, key="b-deny-all")
NO_82 = Rule(admin("no-82", 1, EG), net(B, B6), tcp(82), Verdict.DROP, key="no-82")


def program() -> Program:
    a_in = DirectionProgram(False, (PASS_C, DENY_C_80, BASE_DENY_C, BASE_PASS_C, BASE_ALLOW_B, BASE_DENY_ALL))
    return Program("file", {
        "app/a": ep("app/a", (A, A6), a_in, DirectionProgram(False, (NO_82,))),
        "app/b": ep("app/b", (B, B6), b_ingress()),
        "app/c": ep("app/c", (C, C6)),
    })


def program2() -> Program:
    """The update: c is no longer denied by an Admin rule on b (the NetworkPolicy allows it
    again), a loses its Admin Accept to 81, a's ingress loses the Pass (so the Admin Deny
    of c:80 applies) and a's egress the Admin Deny of 82."""
    b_in = DirectionProgram(True, (PASS_ALL, SKIPPED, NP_WEB, UNREACHED), ("app/web",))
    a_in = DirectionProgram(False, (DENY_C_80, BASE_PASS_C, BASE_ALLOW_B, BASE_DENY_ALL))
    return Program("file", {
        "app/a": ep("app/a", (A, A6), a_in),
        "app/b": ep("app/b", (B, B6), b_in),
        "app/c": ep("app/c", (C, C6)),
    })


PROBES = {
    "app/a": [f"tcp:{B}:80", f"udp:{B}:80", f"tcp:{B}:81", f"tcp:{B6}:81", f"tcp:{B}:8000", f"tcp:{B}:8001",
              f"tcp:{B}:82", f"tcp:{B6}:82"],
    "app/c": [f"tcp:{B}:80", f"udp:{B}:80", f"tcp:{B6}:80", f"tcp:{B}:81", f"tcp:{B}:82", f"tcp:{A}:80",
              f"tcp:{A6}:80", f"tcp:{A}:81", f"tcp:{A}:82"],
    "app/b": [f"tcp:{A}:80", f"tcp:{A6}:80", f"tcp:{A}:81"],
}
WANT1 = {
    "app/a": {f"tcp:{B}:80": True, f"udp:{B}:80": True,  # NetworkPolicy accept
              f"tcp:{B}:81": True, f"tcp:{B6}:81": True,  # Admin Accept beats the default deny
              f"tcp:{B}:8000": False,  # Pass skipped the Admin Accept of 8000; isolation denies
              f"tcp:{B}:8001": False,  # Baseline not reached under isolation
              f"tcp:{B}:82": False, f"tcp:{B6}:82": False},  # Admin Deny on a's egress
    "app/c": {f"tcp:{B}:80": False, f"udp:{B}:80": False, f"tcp:{B6}:80": False,  # Admin Deny beats NP accept
              f"tcp:{B}:81": False,  # default deny
              f"tcp:{B}:82": True,  # NetworkPolicy accept
              f"tcp:{A}:80": False, f"tcp:{A6}:80": False,  # Pass, no NP, Baseline Deny
              f"tcp:{A}:81": True,  # Baseline Pass: allowed, the deny-all after it not applied
              f"tcp:{A}:82": False},  # Baseline deny-all
    "app/b": {f"tcp:{A}:80": True, f"tcp:{A6}:80": True,  # Baseline Accept
              f"tcp:{A}:81": False},  # Baseline deny-all
}
WANT2 = {
    "app/a": {**WANT1["app/a"], f"tcp:{B}:81": False, f"tcp:{B6}:81": False, f"tcp:{B}:82": True,
              f"tcp:{B6}:82": True},
    "app/c": {**WANT1["app/c"], f"tcp:{B}:80": True, f"udp:{B}:80": True, f"tcp:{B6}:80": True},
    "app/b": WANT1["app/b"],
}
SRC = {"app/a": (A, A6), "app/b": (B, B6), "app/c": (C, C6)}


def pods(lab: Lab) -> None:
    lab.add_pod("app/a", [A, A6], ports=(80, 81, 82))
    lab.add_pod("app/b", [B, B6], ports=(80, 81, 82, 8000, 8001))
    lab.add_pod("app/c", [C, C6], ports=(80, 81))


@pytest.fixture
def plane(lab: Lab, dataplane: str) -> Iterator[Plane]:
    pods(lab)
    p = Plane(lab, dataplane)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def audit_plane(lab: Lab, dataplane: str) -> Iterator[Plane]:
    pods(lab)
    p = Plane(lab, dataplane, audit=True)
    try:
        yield p
    finally:
        p.close()


def check(lab: Lab, prog: Program, want: dict[str, dict[str, bool]]) -> None:
    check_probes(lab, prog, PROBES, SRC, want)


def test_tiers_decide_count_and_log(lab: Lab, plane: Plane) -> None:
    prog = program()
    plane.apply(prog)
    plane.open_log()  # NFLOG delivers only to a bound listener: bind before the probes
    check(lab, prog, WANT1)

    c = plane.counters(prog)

    def n(key: str, rule: Rule, d: Direction = IN) -> int:
        got = c.rules.get((key, rule.id, d))
        return 0 if got is None else got.packets

    # the deciding rules counted
    for key, rule, d in (("app/b", DENY_C, IN), ("app/b", ALLOW_A_81, IN), ("app/b", NP_WEB, IN),
                         ("app/a", BASE_DENY_C, IN), ("app/a", BASE_PASS_C, IN), ("app/a", BASE_ALLOW_B, IN),
                         ("app/a", BASE_DENY_ALL, IN), ("app/a", NO_82, EG)):
        assert n(key, rule, d) > 0, (key, rule.origin)
    # rules never reached count nothing: after a Pass, below a Pass, under isolation
    for key, rule in (("app/b", SKIPPED), ("app/b", UNREACHED), ("app/a", DENY_C_80)):
        assert n(key, rule) == 0, (key, rule.origin)
    assert c.drops[("app/b", IN)].packets > 0  # a -> b:8000 and :8001, c -> b:81
    if plane.name == "nftables":  # the Pass line counts what it passed on (not on eBPF: docs/ebpf.md)
        assert n("app/b", PASS_ALL) > 0 and n("app/a", PASS_C) > 0

    # /metrics labels the Admin rule with its tier and kind
    collector = KernelCollector(plane.dp, lambda: prog)
    samples = {s.labels["policy"]: s for fam in plane.call(lambda: list(collector.collect()))
               if fam.name == "stockade_rule_packets" for s in fam.samples if s.name.endswith("_total")}
    deny = samples["deny-c"].labels
    assert (deny["tier"], deny["kind"], deny["verdict"], deny["rule"]) == ("admin", CNP, "drop", "0")
    assert samples["web"].labels["tier"] == "policy" and samples["web"].labels["kind"] == ""
    assert samples["default"].labels["tier"] == "baseline"

    # `stockade counters` names the tier (text and JSON)
    rows = plane.call(lambda: counter_table(Snapshot(Inventory(), prog), plane.dp))
    (row,) = [r for r in rows if r["endpoint"] == "app/b" and "deny-c" in r["policy"]]
    assert (row["tier"], row["kind"], row["verdict"]) == ("admin", CNP, "drop") and row["packets"] > 0
    assert counter_text(row).endswith(f"app/b ingress: drop by {CNP} deny-c (Admin, priority 10) ingress rule 0 (no-c)")

    # the Admin Deny's drop is sampled naming its rule, tier and priority
    got: list[dict[str, Any]] = []

    def sampled() -> bool:
        got.extend(describe(ev, prog) for ev in plane.drops())
        return any(d["src"] == C and d["dst"] == B and d["dport"] == 80 and d["reason"] == "drop-rule"
                   for d in got)

    def by_baseline() -> bool:  # nftables: logged from a's tail chain (a's ingress has an Admin Pass)
        return any(d["src"] == C and d["dst"] == A and d["dport"] == 80 for d in got)

    assert until(lambda: sampled() and by_baseline(), timeout=20), got
    b = next(d for d in got if d["src"] == C and d["dst"] == A and d["dport"] == 80)
    assert (b["endpoint"], b["tier"], b["policies"]) == (
        "app/a", "baseline", [f"{CNP} default (Baseline) ingress rule 1 (no-c-80)"])
    d = next(d for d in got if d["src"] == C and d["dst"] == B and d["dport"] == 80)
    assert d["endpoint"] == "app/b" and d["direction"] == "ingress" and d["tier"] == "admin"
    assert d["policies"] == [f"{CNP} deny-c (Admin, priority 10) ingress rule 0 (no-c)"]
    assert drop_text({**d, "time": 0}).endswith(  # as `stockade drops` prints it
        f"app/b ingress: deny by {CNP} deny-c (Admin, priority 10) ingress rule 0 (no-c)")


def test_tiered_update_and_restart(lab: Lab, plane: Plane) -> None:
    plane.apply(program())
    check(lab, program(), WANT1)
    prog2 = program2()
    # nftables: diffs (a's chain joined and split again, its tail chain deleted and added)
    assert not plane.apply(prog2).full
    check(lab, prog2, WANT2)
    assert not plane.apply(program()).full  # and back
    check(lab, program(), WANT1)

    # A new agent takes over what the old one left and converges (eBPF: adopting the pinned
    # maps and filters; nftables: replacing the table in one transaction).
    plane.restart()
    plane.apply(prog2)
    check(lab, prog2, WANT2)
    c = plane.counters(prog2)  # counters of the adopted state still name the rules
    assert c.rules.get(("app/b", NP_WEB.id, IN)) is not None
    assert c.rules.get(("app/a", BASE_DENY_ALL.id, IN)) is not None


def test_audit_passes_tiered_drops_and_reports_them(lab: Lab, audit_plane: Plane) -> None:
    """Audit mode: an Admin Deny, a Baseline Deny and the default deny are counted and
    sampled as would-be drops and pass (replies too); an Admin Pass still skips the rest
    of the Admin tier."""
    prog = program()
    audit_plane.apply(prog)
    audit_plane.open_log()
    seen = lab.probe_many(PROBES, timeout=1.0)
    assert all(ok for results in seen.values() for ok in results.values()), seen
    c = audit_plane.counters(prog)
    for key, rule in (("app/b", DENY_C), ("app/a", BASE_DENY_C)):
        got = c.rules.get((key, rule.id, IN))
        assert got is not None and got.packets > 0, rule.origin
    for key, rule in (("app/b", SKIPPED), ("app/a", DENY_C_80)):  # skipped by a Pass, audit or not
        got = c.rules.get((key, rule.id, IN))
        assert got is None or got.packets == 0, rule.origin
    samples: list[dict[str, Any]] = []

    def sampled() -> bool:
        samples.extend(describe(ev, prog) for ev in audit_plane.drops())
        return {(d["protocol"], d["dst"], d["dport"], d["tier"]) for d in samples if d["src"] == C and d["audit"]} \
            >= {("tcp", B, 80, "admin"), ("tcp", A, 80, "baseline")}

    assert until(sampled, timeout=20), samples
    d = next(d for d in samples if d["src"] == C and d["dst"] == B and d["dport"] == 80 and d["protocol"] == "tcp")
    assert drop_text({**d, "time": 0}).endswith(
        f"would drop (audit) tcp {C} -> {B} {d['sport']} -> 80  app/b ingress: "
        f"deny by {CNP} deny-c (Admin, priority 10) ingress rule 0 (no-c)")


def random_program(rng: random.Random) -> Program:
    """A seeded random tiered program over the three pods: every endpoint direction gets up
    to 3 Admin (Accept/Deny/Pass), 2 NetworkPolicy and 2 Baseline (Accept/Deny/Pass) rules
    with random peers and ports, isolated or not."""
    addrs = {"a": (A, A6), "b": (B, B6), "c": (C, C6)}
    portsets = [(), tcp(80), tcp(81), (PortMatch("tcp", 80, 81),), both(80), (PortMatch("udp"),)]
    verdicts = {Tier.ADMIN: list(Verdict), Tier.POLICY: [Verdict.ACCEPT, Verdict.ACCEPT, Verdict.DROP],
                Tier.BASELINE: list(Verdict)}
    counts = {Tier.ADMIN: 3, Tier.POLICY: 2, Tier.BASELINE: 2}
    eps = {}
    for name, ips in addrs.items():
        dirs = {}
        for d in Direction:
            rules = []
            for tier in Tier:
                for i in range(rng.randint(0, counts[tier])):
                    who = rng.sample(sorted(addrs), rng.randint(1, 2))
                    peers = None if rng.random() < 0.3 else net(*(ip for w in who for ip in addrs[w]))
                    o = Origin("file", "" if tier is not Tier.POLICY else "app", f"{tier}-{name}", d, i,
                               tier=tier, kind="" if tier is Tier.POLICY else CNP)
                    rules.append(Rule(o, peers, rng.choice(portsets), rng.choice(verdicts[tier]),
                                      key=f"{name}-{d}-{tier}-{i}"))
            dirs[d] = DirectionProgram(rng.random() < 0.4, tuple(rules), ("app/np",))
        eps[f"app/{name}"] = ep(f"app/{name}", ips, dirs[IN], dirs[EG])
    return Program("file", eps)


def test_random_tiered_programs_agree_with_the_simulator(lab: Lab, plane: Plane) -> None:
    """Seeded random tiered programs, one after another (nftables: diffs between them): every
    probe between the pods (TCP 80/81, UDP 80, IPv4 and IPv6) gets the simulator's verdict."""
    targets = {"a": (A, A6), "b": (B, B6), "c": (C, C6)}
    specs = {f"app/{src}": [f"{proto}:{ip}:{port}" for dst, ips in targets.items() if dst != src
                            for ip in ips for proto, port in (("tcp", 80), ("tcp", 81), ("udp", 80))]
             for src in targets}
    for seed in range(8):  # together: every tier deciding with every verdict, ~80 decisions after a Pass
        prog = random_program(random.Random(seed))
        plane.apply(prog)
        seen = lab.probe_many(specs, timeout=1.0)
        wrong = []
        for src, results in seen.items():
            for spec, ok in results.items():
                proto, rest = spec.split(":", 1)
                addr, port = rest.rsplit(":", 1)
                s = targets[src[4:]][1] if ":" in addr else targets[src[4:]][0]
                v = evaluate(prog, ipaddress.ip_address(s), ipaddress.ip_address(addr), proto, int(port))
                if (v.verdict is Verdict.ACCEPT) != ok:
                    wrong.append((src, spec, ok, v.reason))
        assert not wrong, (seed, wrong)
