"""Learned destinations' classes on eBPF (agent/dataplane/ebpf/tables.py, learning.py): the
verdict the kernel's lookups give a destination an endpoint learned -- its `learned` entry's
first stage not yet expired, else the `peers` LPM class, then the `ports` LPM -- equals
`ir.first_match` with the learned addresses injected as the rules' peers (`with_learned`,
which replaces whatever peers a domainNames rule carried: the dataplane ignores them), at
every instant after the entry was written."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataplane.ebpf.layout import LEARN_STAGES, P_OTHER, V_ACCEPT
from agent.dataplane.ebpf.learning import Memory, learned_index
from agent.dataplane.ebpf.tables import (
    PROTO,
    DirTables,
    PortEntries,
    compile_direction,
    learned_class_ports,
    learned_stages,
    membership,
)
from agent.ir import (
    Direction,
    DirectionProgram,
    EndpointProgram,
    IPAddress,
    Origin,
    PeerSet,
    PortMatch,
    Program,
    Rule,
    Tier,
    Verdict,
    first_match,
)
from agent.policy.cluster.domains import Learned, learned_rule_key, with_learned

EP = "ns/client"
NETS = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "192.0.2.0/24", "fd00::/64", "fd00::5/128"]
ADDRS = ["10.1.2.3", "10.1.9.9", "10.200.0.1", "192.0.2.7", "198.51.100.1", "fd00::5", "fd00::6", "2001:db8::1"]
PROBES = [("tcp", 80), ("tcp", 443), ("tcp", 8080), ("udp", 53), ("icmp", None), ("sctp", 80)]


def _origin(i: int, tier: Tier) -> Origin:
    return Origin("kubernetes", "", f"p{i}", Direction.EGRESS, i, tier=tier, kind="ClusterNetworkPolicy")


PORTS = st.lists(st.sampled_from([PortMatch("tcp", 80, 80), PortMatch("tcp", 443, 8080), PortMatch("udp"),
                                  PortMatch("icmp"), PortMatch("tcp", 1, 79)]), max_size=2)


@st.composite
def rule_lists(draw: st.DrawFn) -> tuple[tuple[Rule, ...], bool]:
    rules: list[Rule] = []
    for tier in (Tier.ADMIN, Tier.POLICY, Tier.BASELINE):
        for _ in range(draw(st.integers(0, 3))):
            i = len(rules)
            if draw(st.booleans()):  # a domainNames Accept (Admin or Baseline in the API; any tier here)
                name = draw(st.sampled_from(["r0", "r1", "r2"]))
                # peers of its own (e.g. injected by an older learner): ignored on eBPF
                junk = PeerSet.of(ipaddress.ip_network(n) for n in draw(st.lists(st.sampled_from(NETS), max_size=2)))
                rules.append(Rule(_origin(i, tier), junk, tuple(draw(PORTS)), Verdict.ACCEPT,
                                  key=learned_rule_key(name, EP)))
                continue
            verdicts = [Verdict.ACCEPT, Verdict.DROP] + ([Verdict.PASS] if tier is not Tier.POLICY else [])
            peers = None if draw(st.booleans()) and draw(st.booleans()) else PeerSet.of(
                ipaddress.ip_network(n) for n in draw(st.lists(st.sampled_from(NETS), max_size=3)))
            rules.append(Rule(_origin(i, tier), peers, tuple(draw(PORTS)), draw(st.sampled_from(verdicts)),
                              key=f"k{i}"))
    return tuple(rules), draw(st.booleans())


def _peer_class(t: DirTables, ip: IPAddress) -> int | None:
    width = 32 if ip.version == 4 else 128
    best: tuple[int, int] | None = None
    for fam, addr, plen, cls in t.peers:
        holds = fam == ip.version and (plen == 0 or int(ip) >> (width - plen) == addr >> (width - plen))
        if holds and (best is None or plen > best[0]):
            best = (plen, cls)
    return None if best is None else best[1]


def _port_lookup(entries: PortEntries, proto: str, port: int | None) -> tuple[int, int] | None:
    code = PROTO.get(proto, P_OTHER)
    if port is None:
        return entries.get((code, 0, 0, 16))
    for plen in range(16, -1, -1):
        start = port & (((1 << 16) - 1) ^ ((1 << (16 - plen)) - 1))
        if (hit := entries.get((code, 1, start, plen))) is not None:
            return hit
    return None


def _kernel(rules: tuple[Rule, ...], isolated: bool, t: DirTables, stages: list[tuple[float, tuple[int, ...]]],
            ip: IPAddress, proto: str, port: int | None, at: float) -> bool:
    """What the program's lookups decide at time `at` (True: accept)."""
    by_cls = dict(t.ports)
    entries: PortEntries | None = None
    stage = next((m for exp, m in stages if exp > at), None)
    if stage is not None:
        known = {m: i + 1 for i, m in enumerate(t.members)}
        entries = by_cls[known[stage]] if stage in known else learned_class_ports(rules, stage, isolated)
    elif (cls := _peer_class(t, ip)) is not None:
        entries = by_cls[cls]
    hit = _port_lookup(entries, proto, port) if entries is not None else None
    if hit is not None:
        return hit[0] == V_ACCEPT
    return not isolated


def _ir(rules: tuple[Rule, ...], isolated: bool, learned: Learned, ip: IPAddress, proto: str,
        port: int | None) -> bool:
    prog = Program("file", {EP: EndpointProgram(EP, (), egress=DirectionProgram(isolated, rules))})
    injected = with_learned(prog, learned).endpoints[EP].egress.rules
    i = first_match(injected, isolated, lambda j: injected[j].matches(ip, proto, port))[0]
    return not isolated if i is None else injected[i].effect is Verdict.ACCEPT


@settings(max_examples=300, deadline=None)
@given(rule_lists(), st.sampled_from(ADDRS), st.dictionaries(st.sampled_from(["r0", "r1", "r2"]),
                                                             st.sampled_from([5.0, 10.0, 20.0]), max_size=3))
def test_learned_verdict_is_first_match_with_the_address_injected(
        case: tuple[tuple[Rule, ...], bool], addr: str, learned: dict[str, float]) -> None:
    rules, isolated = case
    ip = ipaddress.ip_address(addr)
    t = compile_direction(DirectionProgram(isolated, rules))
    index = learned_index(rules)
    held = {index[learned_rule_key(r, EP)]: e for r, e in learned.items() if learned_rule_key(r, EP) in index}
    stages = learned_stages(rules, ip, held, now=0.0)
    assert len(stages) <= LEARN_STAGES and [e for e, _ in stages] == sorted(e for e, _ in stages)
    for at in (0.0, 5.0, 7.0, 10.0, 15.0, 20.0, 25.0):  # the kernel reads the stages written at 0
        table = Learned.of((EP, r, ip, e) for r, e in learned.items()).expire(at)
        for proto, port in PROBES:
            assert _kernel(rules, isolated, t, stages, ip, proto, port, at) == _ir(
                rules, isolated, table, ip, proto, port), (at, proto, port)


@settings(max_examples=100, deadline=None)
@given(rule_lists(), st.sampled_from(ADDRS))
def test_the_lpm_class_is_the_rules_holding_the_address(case: tuple[tuple[Rule, ...], bool], addr: str) -> None:
    rules, isolated = case
    ip = ipaddress.ip_address(addr)
    t = compile_direction(DirectionProgram(isolated, rules))
    cls = _peer_class(t, ip)
    members = membership(rules, ip)
    assert (cls is None and not members) or (cls is not None and set(t.members[cls - 1]) == members)


def test_more_stages_than_the_map_holds_expire_rules_early_never_late() -> None:
    ip = ipaddress.ip_address("192.0.2.7")
    rules = tuple(Rule(_origin(i, Tier.ADMIN), PeerSet(), (PortMatch("tcp", 80 + i, 80 + i),), Verdict.ACCEPT,
                       key=learned_rule_key(f"r{i}", EP)) for i in range(6))
    held = {(i,): float(10 * (i + 1)) for i in range(6)}  # expiries 10 .. 60
    stages = learned_stages(rules, ip, held, now=0.0)
    assert len(stages) == LEARN_STAGES
    assert [e for e, _ in stages] == [10.0, 40.0, 50.0, 60.0]
    for at in range(0, 70, 5):
        stage = next((m for e, m in stages if e > at), ())
        for i, e in enumerate(held.values()):
            if i in stage:
                assert at < e  # a rule counts only before its expiry
    assert stages[0][1] == tuple(range(6))


def test_memory_sweeps_what_expired_not_what_was_refreshed() -> None:
    m = Memory()
    a, b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("fd00::1")
    m.put(EP, a, "r", 10.0)
    m.put(EP, b, "r", 10.0)
    m.put(EP, a, "r", 30.0)  # refreshed
    assert m.expire(5.0) == {}
    assert m.expire(10.0) == {EP: {b}}
    assert m.held == {EP: {a: {"r": 30.0}}}
    assert m.expire(30.0) == {EP: {a}} and m.held == {} and m.count() == 0


def test_memory_refreshes_do_not_grow_its_heap() -> None:
    """Pods resolving the same names again: each refresh moves the expiry, not the heap's
    size; an entry goes at its latest expiry, an earlier one given later counts too."""
    m = Memory()
    ips = [ipaddress.ip_address(f"192.0.2.{i}") for i in range(1, 51)]
    for k in range(1, 21):
        for ip in ips:
            m.put(EP, ip, "r", 10.0 * k)
    assert len(m._heap) == len(ips)
    assert m.expire(150.0) == {} and m.count() == len(ips) and len(m._heap) == len(ips)
    m.put(EP, ips[0], "r", 160.0)  # earlier than its 200: it now expires at 160
    m.put(EP, ips[1], "s", 300.0)  # a second rule for the same address
    assert m.expire(160.0) == {EP: {ips[0]}}
    assert m.expire(200.0) == {EP: set(ips[1:])} and m.held == {EP: {ips[1]: {"s": 300.0}}}
    assert m.expire(300.0) == {EP: {ips[1]}} and m.count() == 0


def test_learned_key_and_value_bytes_match_the_ctypes_layout() -> None:
    from ctypes import c_uint8

    from agent.dataplane.ebpf.layout import (
        Addr16,
        LearnKey,
        LearnStage,
        LearnValue,
        k_learn,
        learn_owner,
        learn_stages,
        v_learn,
    )

    for text in ("192.0.2.7", "fd00::5"):
        ip = ipaddress.ip_address(text)
        key = bytes(LearnKey(7, 3, ip.version, (c_uint8 * 3)(), Addr16.from_buffer_copy(ip.packed.ljust(16, b"\0"))))
        assert k_learn(7, 3, ip) == key and learn_owner(key) == (7, 3)
    stages = (LearnStage * LEARN_STAGES)(LearnStage(10**9, 4, 3), LearnStage(2 * 10**9, 9, 1))
    assert v_learn([(10**9, 4, 3), (2 * 10**9, 9, 1)]) == bytes(LearnValue(stages))
    assert learn_stages(bytes(LearnValue(stages))) == [(10**9, 4, 3), (2 * 10**9, 9, 1)]


def test_forgetting_rules_that_are_gone_keeps_the_others() -> None:
    m = Memory()
    a, b = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    m.put(EP, a, "r1", 10.0)
    m.put(EP, a, "r2", 10.0)
    m.put(EP, b, "r2", 10.0)
    m.forget(EP, {"r1": (0,)})
    assert m.held == {EP: {a: {"r1": 10.0}}} and m.count() == 1
    m.forget(EP)
    assert m.held == {} and m.count() == 0
    rules = (Rule(_origin(0, Tier.ADMIN), PeerSet(), key=learned_rule_key("x", EP)),
             Rule(_origin(1, Tier.ADMIN), None, key="plain"),
             Rule(_origin(2, Tier.ADMIN), PeerSet(), (PortMatch("udp"),), key=learned_rule_key("x", EP)))
    assert learned_index(rules) == {learned_rule_key("x", EP): (0, 2)}


@settings(max_examples=100, deadline=None)
@given(rule_lists(), st.sampled_from(ADDRS), st.dictionaries(st.sampled_from(["r0", "r1", "r2"]),
                                                             st.sampled_from([5.0, 10.0, 20.0]), max_size=3))
def test_a_restart_reads_back_what_was_learned(case: tuple[tuple[Rule, ...], bool], addr: str,
                                               learned: dict[str, float]) -> None:
    from agent.dataplane.ebpf.layout import learn_stages
    from agent.dataplane.ebpf.learning import LearnGen, compute, restore

    rules, isolated = case
    ip = ipaddress.ip_address(addr)
    t = compile_direction(DirectionProgram(isolated, rules))
    index = learned_index(rules)
    held = {learned_rule_key(r, EP): e for r, e in learned.items() if learned_rule_key(r, EP) in index}
    counters = {(1, rid): n for n, rid in enumerate(t.rule_ids)}
    _, items, gone = compute(1, LearnGen.of(1, t), t, rules, isolated, counters, index, {ip: held}, now=0.0)
    assert bool(gone) == (not held)
    m = Memory()
    restore(LearnGen.of(1, t), index, [(ip, learn_stages(v)) for _, v in items], m, EP)
    assert m.held == ({EP: {ip: held}} if held else {})
