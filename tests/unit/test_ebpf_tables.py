"""The eBPF map contents, looked up the way the kernel does (LPM), agree with the
simulator's first-match decision on every flow."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dataplane.ebpf import ALL_PROTOS, PROTO, PROTO_NAME, V_CODE, compile_direction, port_prefixes
from agent.dataplane.ebpf.layout import k_peer, u32
from agent.dataplane.ebpf.tables import DIR_CODE, entry_keys
from agent.dataplane.ebpf.tables import entries as map_items
from agent.ir import Direction, DirectionProgram, Origin, PeerSet, PortMatch, Rule, Tier, Verdict
from agent.simulate import decide


def lookup(dp: DirectionProgram, peer, proto: int, port: int | None):  # type: ignore[no-untyped-def]
    """Emulate the classifier's two LPM lookups on compiled tables; None = no entry."""
    t = compile_direction(dp)
    width = 32 if peer.version == 4 else 128
    best = None
    for fam, addr, plen, cls in t.peers:
        if fam != peer.version:
            continue
        mask = ((1 << plen) - 1) << (width - plen) if plen else 0
        if int(peer) & mask == addr and (best is None or plen > best[0]):
            best = (plen, cls)
    if best is None:
        return None
    entries = dict(t.ports)[best[1]]
    if port is None:
        return entries.get((proto, 0, 0, 16))
    hits = [(plen, v) for (p, hp, base, plen), v in entries.items()
            if p == proto and hp == 1 and (port >> (16 - plen)) == (base >> (16 - plen))]
    return max(hits)[1] if hits else None


def kernel_verdict(dp: DirectionProgram, peer, proto_name: str, port: int | None) -> Verdict:  # type: ignore[no-untyped-def]
    hit = lookup(dp, peer, PROTO[proto_name], port)
    if hit is None:
        return Verdict.DROP if dp.isolated else Verdict.ACCEPT
    return Verdict.ACCEPT if hit[0] == V_CODE[Verdict.ACCEPT] else Verdict.DROP


def test_port_prefixes_cover_exactly() -> None:
    for a, b in [(0, 65535), (1024, 65535), (80, 80), (8000, 8003), (1, 65534), (1000, 1999)]:
        blocks = port_prefixes(a, b)
        covered = []
        for base, plen in blocks:
            size = 1 << (16 - plen)
            assert base % size == 0
            covered += range(base, base + size)
        assert covered == list(range(a, b + 1))
        assert len(blocks) <= 30
    assert port_prefixes(1024, 65535) == [(1024, 6), (2048, 5), (4096, 4), (8192, 3), (16384, 2), (32768, 1)]


NETS4 = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.168.0.0/16", "0.0.0.0/0"]
NETS6 = ["fd00::/8", "fd00:1::/32", "fd00:1::5/128"]
PROBES = [ipaddress.ip_address(a) for a in
          ["10.1.2.3", "10.1.2.4", "10.1.9.9", "10.9.9.9", "192.168.1.1", "8.8.8.8", "fd00:1::5", "fd00:1::6",
           "fd00:2::1", "2001:db8::1"]]

ports = st.one_of(
    st.builds(lambda p: PortMatch(p), st.sampled_from(["tcp", "udp", "sctp", "icmp"])),
    st.builds(lambda p, a, n: PortMatch(p, a, min(65535, a + n)), st.sampled_from(["tcp", "udp"]),
              st.sampled_from([0, 1, 53, 80, 1023, 1024, 8000, 65535]), st.sampled_from([0, 1, 3, 100, 65535])),
)
VERDICTS = {  # the verdicts each tier's rules may carry (Pass only in the ClusterNetworkPolicy tiers)
    Tier.ADMIN: [Verdict.ACCEPT, Verdict.DROP, Verdict.PASS],
    Tier.POLICY: [Verdict.ACCEPT, Verdict.ACCEPT, Verdict.DROP],
    Tier.BASELINE: [Verdict.ACCEPT, Verdict.DROP, Verdict.PASS],
}


def rules_of(tier: Tier) -> st.SearchStrategy[Rule]:
    return st.builds(
        lambda i, peers, pts, v: Rule(Origin("file", "ns", "p", Direction.INGRESS, i, tier=tier),
                                      None if peers is None else PeerSet.of(ipaddress.ip_network(n) for n in peers),
                                      tuple(pts), v, key=f"{tier}{i}-{peers}"),
        st.integers(0, 1000),
        st.one_of(st.none(), st.lists(st.sampled_from(NETS4 + NETS6), max_size=3)),
        st.lists(ports, max_size=3),
        st.sampled_from(VERDICTS[tier]),
    )


rules = rules_of(Tier.POLICY)
# A direction's rules in tier order (the IR's invariant): ADMIN, POLICY, BASELINE.
tiered = st.builds(lambda a, p, b: [*a, *p, *b], st.lists(rules_of(Tier.ADMIN), max_size=3),
                   st.lists(rules, max_size=3), st.lists(rules_of(Tier.BASELINE), max_size=3))


def agree(rs: list[Rule], isolated: bool) -> None:
    dp = DirectionProgram(isolated, tuple(rs))
    if not dp.enforced:
        return
    for peer in PROBES:
        for proto in ("tcp", "udp", "sctp", "icmp"):
            for port in ([None] if proto == "icmp" else [None, 0, 53, 80, 1023, 1024, 1025, 8001, 8100, 65535]):
                want = decide("e", Direction.INGRESS, dp, peer, proto, port).verdict
                assert kernel_verdict(dp, peer, proto, port) is want, (peer, proto, port)
    # An ADMIN Pass never decides, so it never appears as a port entry's rule (nor is counted).
    for _, entries in compile_direction(dp).ports:
        for _, idx in entries.values():
            assert not (rs[idx].verdict is Verdict.PASS and rs[idx].tier is Tier.ADMIN)


@settings(max_examples=300, deadline=None)
@given(st.lists(rules, max_size=5), st.booleans())
def test_tables_agree_with_simulator(rs: list[Rule], isolated: bool) -> None:
    agree(rs, isolated)


@settings(max_examples=300, deadline=None)
@given(tiered, st.booleans())
def test_tiered_tables_agree_with_simulator(rs: list[Rule], isolated: bool) -> None:
    """Admin Accept/Deny/Pass, NetworkPolicy rules, Baseline Accept/Deny/Pass, isolated or not."""
    agree(rs, isolated)


@settings(max_examples=200, deadline=None)
@given(tiered, st.booleans(), st.integers(1, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_packed_peers_make_the_keys_layout_makes(rs: list[Rule], isolated: bool, ep_id: int, gen: int) -> None:
    """DirTables keeps its peers packed: the items and keys it makes from them are the
    bytes layout.k_peer / u32 make from (family, address, prefixlen, class), which
    `peers` gives back in the order they were compiled (IPv4 first, ascending)."""
    t = compile_direction(DirectionProgram(isolated, tuple(rs)))
    fams = [f for f, *_ in t.peers]
    assert fams == sorted(fams) and t.peers == tuple(sorted(t.peers))
    assert t.entries[0] == len(t.peers)
    for d in Direction:
        dc = DIR_CODE[d]
        want = [(k_peer(ep_id, gen, dc, fam, addr, plen), u32(cls)) for fam, addr, plen, cls in t.peers]
        assert t.peer_items(ep_id, gen, dc) == want
        assert t.peer_keys(ep_id, gen, dc) == [k for k, _ in want]
    counters = {(dc, rid): n for n, (dc, rid) in enumerate((dc, rid) for dc in (0, 1) for rid in t.rule_ids)}
    tables = {Direction.INGRESS: t, Direction.EGRESS: t}
    peers, ports = map_items(ep_id, counters, tables, gen)
    assert entry_keys(ep_id, tables, gen) == [("peers", k) for k, _ in peers] + [("ports", k) for k, _ in ports]
    again = compile_direction(DirectionProgram(isolated, tuple(rs)))
    assert again == t and hash(again) == hash(t)


def test_admin_pass_skips_admin_and_isolation_precedes_baseline() -> None:
    def o(tier: Tier, i: int) -> Origin:
        return Origin("file", "", "cnp", Direction.INGRESS, i, tier=tier, kind="ClusterNetworkPolicy")
    rs = (Rule(o(Tier.ADMIN, 0), None, (PortMatch("tcp", 80, 80),), Verdict.PASS, key="pass"),
          Rule(o(Tier.ADMIN, 1), None, (), Verdict.DROP, key="deny-all"),
          Rule(o(Tier.BASELINE, 0), None, (PortMatch("tcp", 80, 80),), Verdict.ACCEPT, key="b"))
    peer = ipaddress.ip_address("10.1.2.3")
    assert kernel_verdict(DirectionProgram(False, rs), peer, "tcp", 80) is Verdict.ACCEPT  # Pass, then Baseline
    assert kernel_verdict(DirectionProgram(False, rs), peer, "tcp", 81) is Verdict.DROP  # the Admin Deny
    assert kernel_verdict(DirectionProgram(True, rs), peer, "tcp", 80) is Verdict.DROP  # isolation first


def test_other_protocols_match_only_all_protocol_rules() -> None:
    o = Origin("file", "ns", "p", Direction.INGRESS, 0)
    dp = DirectionProgram(True, (Rule(o, None, (PortMatch("tcp", 22, 22),), Verdict.DROP, key="a"),
                                 Rule(o, None, (), Verdict.ACCEPT, key="b")))
    t = compile_direction(dp)
    entries = dict(t.ports)[1]
    assert entries[(0, 0, 0, 16)][0] == V_CODE[Verdict.ACCEPT]  # "other" protocols: accept-all rule
    assert all(p in ALL_PROTOS for p, *_ in entries)
    assert PROTO_NAME[0] == "other"


def test_render_prints_map_contents_without_touching_the_kernel() -> None:
    from agent.dataplane.ebpf import EbpfDataplane
    from agent.ir import EndpointProgram, Program

    o = Origin("file", "ns", "p", Direction.INGRESS, 0)
    ep = EndpointProgram("ns/b", (ipaddress.ip_address("10.0.0.2"),), ingress=DirectionProgram(True, (
        Rule(o, PeerSet.of([ipaddress.ip_network("10.0.0.0/24")]), (PortMatch("tcp", 1024, 65535),), key="k"),)))
    text = EbpfDataplane(pin_root="/nonexistent/stockade").render(Program("file", {"ns/b": ep}))
    assert "addrs 10.0.0.2 -> 1" in text
    assert "peers ingress 10.0.0.0/24 -> class 1" in text
    assert "ports ingress class 1 tcp 32768/1 -> accept" in text and "tcp 1024/6" in text


def test_flow_keys_and_drop_samples_decode() -> None:
    import struct

    from agent.dataplane.ebpf import NO_COUNTER as NO_SLOT
    from agent.dataplane.ebpf import S_AUDIT, S_PORTS, EbpfDropLog, k_flow
    from agent.dataplane.ebpf.flows import flow_tuple as _flow_tuple
    from agent.dataplane.ebpf.flows import unordered as _unordered

    a, b = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("fd00::2")
    k = k_flow(7, 1, 4, 6, a.packed, 40000, ipaddress.ip_address("10.0.0.2").packed, 80)
    assert len(k) == 44 and _flow_tuple(k) == (4, 6, a.packed, 40000, bytes([10, 0, 0, 2]), 80)
    assert _unordered((4, 6, b"x", 1, b"y", 2)) == _unordered((4, 6, b"y", 2, b"x", 1))

    class FakeMap:
        def __init__(self, d: dict[bytes, bytes]) -> None:
            self.d = d

        def lookup(self, key: bytes) -> bytes | None:
            return self.d.get(key)

    log = EbpfDropLog("/nonexistent")
    log.maps = {"epkeys": FakeMap({struct.pack("<I", 3): b"app/b".ljust(256, b"\0")}),
                "counterinfo": FakeMap({struct.pack("<I", 9): struct.pack("<IB", 3, 0) + bytes.fromhex("a1b2c3d4e5f6")
                                     + b"\0"})}

    def sample(slot: int, d: int, flags: int) -> bytes:
        return (struct.pack("<IIBBBB", 3, slot, d, 6, 17, flags) + struct.pack(">HH", 5353, 53)
                + b.packed + ipaddress.ip_address("fd00::3").packed)

    ev = log._event(sample(NO_SLOT, 0, S_PORTS | S_AUDIT))
    assert ev is not None and (ev.endpoint, ev.direction, ev.rule_id, ev.protocol) == ("app/b", Direction.INGRESS,
                                                                                        None, "udp")
    assert (ev.src, ev.dst, ev.sport, ev.dport, ev.audit) == ("fd00::2", "fd00::3", 5353, 53, True)
    ev = log._event(sample(9, 0, 0))
    assert ev is not None and ev.rule_id == "a1b2c3d4e5f6" and ev.sport is None and not ev.audit
    assert log._event(sample(9, 1, 0)) is None  # slot belongs to the other direction: never misattributed


def test_device_bound_endpoint_without_addresses() -> None:
    """NetBird's bootstrap endpoint has no addresses: it is found through its device's
    `ifcfg` entry (which carries its id), with the node's directions (tc ingress = ingress)."""
    import struct

    from agent.dataplane.ebpf import EbpfDataplane, v_ifcfg
    from agent.policy.netbird import bootstrap_program

    assert v_ifcfg(True, True, 7) == struct.pack("<BBBxI", 1, 0, 1, 7)
    assert v_ifcfg(False, False) == struct.pack("<BBBxI", 0, 1, 0, 0)  # pod veth: found by address only
    text = EbpfDataplane(pin_root="/nonexistent/stockade").render(bootstrap_program("wt0"))
    assert "endpoint 1 netbird-bootstrap:wt0 interface=wt0 ingress=enforced,isolated egress=open" in text
    assert "ifcfg wt0 -> 1" in text and "addrs" not in text


def reference_peers(rs: list[Rule]) -> list[tuple[int, int, int, tuple[int, ...]]]:
    """Every prefix a rule holds (and /0 when a rule matches anyone) with its class members:
    the rules holding it or a prefix around it, one prefix at a time."""
    anyone = {i for i, r in enumerate(rs) if r.peers is None}
    out = []
    for fam in (4, 6):
        nets = {n for r in rs if r.peers is not None for n in r.peers.family(fam)}
        if anyone:
            nets.add(ipaddress.ip_network("0.0.0.0/0" if fam == 4 else "::/0"))
        for n in sorted(nets, key=lambda n: (int(n.network_address), n.prefixlen)):
            members = anyone | {i for i, r in enumerate(rs) if r.peers is not None
                                and any(n.subnet_of(m) for m in r.peers.family(fam))}
            out.append((fam, int(n.network_address), n.prefixlen, tuple(sorted(members))))
    return out


HOSTS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.1.1", "192.168.0.9", "fd00::1", "fd00::2", "fd00:1::1"]
host_rules = st.builds(
    lambda i, peers, v: Rule(Origin("file", "ns", "p", Direction.INGRESS, i),
                             None if peers is None else PeerSet.of(ipaddress.ip_address(a) for a in peers),
                             (), v, key=f"h{i}-{peers}"),
    st.integers(0, 1000), st.one_of(st.none(), st.lists(st.sampled_from(HOSTS), max_size=6)),
    st.sampled_from([Verdict.ACCEPT, Verdict.ACCEPT, Verdict.DROP]))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(host_rules, max_size=6), st.lists(st.one_of(host_rules, rules), max_size=5)),
       st.booleans())
def test_classes_are_the_rules_around_each_prefix(rs: list[Rule], isolated: bool) -> None:
    """Prefixes of one length per family (pods: compiled by whole sets) and of many
    (ipBlocks: a prefix at a time) alike: each prefix's class is the rules holding it or a
    prefix around it, classes numbered in prefix order."""
    dp = DirectionProgram(isolated, tuple(rs))
    if not dp.enforced:
        return
    t = compile_direction(dp)
    want = reference_peers(rs)
    numbers: dict[tuple[int, ...], int] = {}
    for _, _, _, members in want:
        numbers.setdefault(members, len(numbers) + 1)
    assert t.peers == tuple((fam, a, p, numbers[m]) for fam, a, p, m in want)
    assert t.members == tuple(numbers)
    assert compile_direction(dp, {}) == t
    agree(rs, isolated)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(host_rules, rules), max_size=5), st.integers(1, 2**32 - 1))
def test_trie_order_puts_the_default_prefix_after_the_others(rs: list[Rule], ep_id: int) -> None:
    """peer_blob(trie=True): the same entries, a family's /0 (a rule matching anyone)
    after the prefixes inside it, as the kernel's LPM trie lists them (postorder)."""
    t = compile_direction(DirectionProgram(True, tuple(rs)))
    keys, values = t.peer_blob(ep_id, 1, 0, trie=True)
    items = [(keys[i * 30:(i + 1) * 30], values[i * 4:(i + 1) * 4]) for i in range(len(values) // 4)]
    assert sorted(items) == sorted(t.peer_items(ep_id, 1, 0))
    for fam in (4, 6):
        plens = [k[0] - 80 for k, _ in items if k[13] == fam]
        assert 0 not in plens[:-1] or len(set(plens)) > 2  # /0 last unless prefixes nest otherwise
