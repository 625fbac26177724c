"""The eBPF dataplane's vouching mark (bpf/stockade.c `vouch`, docs/ebpf.md "The vouching
mark") on real packets: the source pod's hook marks packets of a known pod-to-pod flow for
the destination pod's device only, and that device's hook passes them without a lookup.

- a known flow's packets are marked (an nft counter in the node namespace sees the bit in
  forward) and pass both ways;
- a mark forged in a pod (nft `meta mark set` on its output) is scrubbed at the veth: it never
  reaches the node, denied pairs stay denied, allowed ones pass, traffic to the node and from a
  namespace that is no endpoint ("outside") is judged as before;
- a marked packet DNATed to another local pod after the source's hook is judged by that pod's
  hook (the mark is bound to the device it was meant for);
- audit mode still counts the destination's would-be drop.

Privileged: fails (not skips) without root, bpffs, bcc or kernel headers.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from agent.dataplane.base import DataplaneError
from agent.dataplane.ebpf import EbpfDataplane
from agent.dataplane.ebpf.layout import DEFAULT_MARK, DELIVER_ENV, MARK_ENV, Config, parse_mark, v_config
from agent.ir import Direction, DirectionProgram, EndpointProgram, PortMatch, Program, Rule
from tests.kit import Lab, expect, until
from tests.kit.ebpf_lab import NODE4, net, origin
from tests.kit.netns import call_in
from tests.kit.nftns import counter_packets, nft_file

A, B, C, X = "10.31.0.1", "10.31.0.2", "10.31.0.3", "10.31.0.9"
MARK = DEFAULT_MARK
UDP_PORT, OPEN_PORT, NODE_PORT = 8000, 1024, 9100


@pytest.fixture(autouse=True)
def stack_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mark is what "stack" delivery does (with "peer", these packets skip the node)."""
    monkeypatch.delenv(DELIVER_ENV, raising=False)


def program(c_allows_a: bool = False) -> Program:
    """b: ingress allows a (UDP 8000, TCP 80) and anyone from the /24 on TCP 1024; c: ingress
    isolated (allows a on UDP 8000 only when asked); a: ingress isolated, egress open."""
    b_in = DirectionProgram(True, (
        Rule(origin(0), net(A), (PortMatch("udp", UDP_PORT, UDP_PORT), PortMatch("tcp", 80, 80)), key="a"),
        Rule(origin(1), net("10.31.0.0/24"), (PortMatch("tcp", OPEN_PORT, OPEN_PORT),), key="open"),
    ))
    c_rules = (Rule(origin(0, pol="c"), net(A), (PortMatch("udp", UDP_PORT, UDP_PORT),), key="ca"),)
    ep = ipaddress.ip_address
    return Program("file", {
        "app/a": EndpointProgram("app/a", (ep(A),), ingress=DirectionProgram(True)),
        "app/b": EndpointProgram("app/b", (ep(B),), ingress=b_in),
        "app/c": EndpointProgram("app/c", (ep(C),),
                                 ingress=DirectionProgram(True, c_rules if c_allows_a else ())),
    })


def build(lab: Lab) -> None:
    lab.add_pod("app/a", [A], ports=(80,))
    lab.add_pod("app/b", [B], ports=(80, OPEN_PORT, UDP_PORT))
    lab.add_pod("app/c", [C], ports=(80, OPEN_PORT, UDP_PORT))
    lab.add_pod("ext/x", [X], ports=(80,))  # no endpoint: its device is not judged ("outside")
    lab.node_sh("ip", "addr", "add", f"{NODE4}/32", "dev", "lo")
    lab.serve_on_node([NODE_PORT])


def count_marked_on_node(lab: Lab, mark: int = MARK) -> None:
    """Named counters in the node namespace: marked packets forwarded to b, to c, and any marked
    packet arriving for a node address (prerouting runs after the pods' tc ingress)."""
    bit = mark or DEFAULT_MARK
    nft_file(lab.node, f"""
table ip stkmark {{
  counter to_b {{}}
  counter to_c {{}}
  counter to_node {{}}
  chain forwarded {{
    type filter hook forward priority 0;
    meta mark & {bit:#x} != 0 ip daddr {B} counter name to_b
    meta mark & {bit:#x} != 0 ip daddr {C} counter name to_c
  }}
  chain arriving {{
    type filter hook prerouting priority 0;
    meta mark & {bit:#x} != 0 ip daddr {NODE4} counter name to_node
  }}
}}""")


class Udp:
    """A connected UDP socket in a pod's namespace: one 5-tuple for the whole test."""

    def __init__(self, lab: Lab, pod: str, src: str, sport: int, dst: str, dport: int) -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((src, sport))
            s.connect((dst, dport))
            return s

        self.s = call_in(lab.pods[pod].netns, make)
        self.s.settimeout(0.5)

    def ping(self) -> bool:
        try:
            self.s.send(b"hi")
            return self.s.recv(64).startswith(b"pong")
        except OSError:
            return False

    def close(self) -> None:
        self.s.close()


def test_the_mark_is_one_bit_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_mark("0x1000") == 0x1000 and parse_mark("131072") == 0x20000 and parse_mark("0") == 0
    for bad in ("0x3000", "-1", "0x100000000", "mark", ""):
        with pytest.raises(ValueError):
            parse_mark(bad)
    monkeypatch.setenv(MARK_ENV, "0x6000")
    with pytest.raises(DataplaneError, match=MARK_ENV):
        v_config(False, 10, 20)
    monkeypatch.setenv(MARK_ENV, "0x2000")
    assert Config.from_buffer_copy(v_config(False, 10, 20)).mark == 0x2000
    monkeypatch.delenv(MARK_ENV)
    assert Config.from_buffer_copy(v_config(False, 10, 20)).mark == DEFAULT_MARK


@pytest.mark.parametrize("mark", [None, 0x20000, 0])
def test_known_flows_are_marked_for_the_destination_and_pass(lab: Lab, pin_root: str, mark: int | None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if mark is not None:
        monkeypatch.setenv(MARK_ENV, hex(mark))
    build(lab)
    count_marked_on_node(lab, MARK if mark is None else mark)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    u = None
    try:
        dp.apply(program())
        u = Udp(lab, "app/a", A, 40001, B, UDP_PORT)
        assert expect(u.ping, what="a -> b UDP")
        # first packet: judged for both ends; b's hook learns its device; the reply teaches a's;
        # later packets each way are vouched for (marked at the source's hook); mark 0: none is
        assert all(u.ping() for _ in range(20))
        assert (counter_packets(lab.node, "ip", "stkmark", "to_b") > 0) == (mark != 0)
        # TCP, both ways, over one connection
        conn = lab.hold("app/a", B, 80)
        assert all(conn.ping() for _ in range(10))
        # denied pairs stay denied; node traffic untouched
        assert lab.probe_many({"app/c": [f"udp:{B}:{UDP_PORT}", f"tcp:{B}:80", f"tcp:{B}:{OPEN_PORT}"],
                               "app/b": [f"udp:{C}:{UDP_PORT}", f"tcp:{A}:80"]}) == {
            "app/c": {f"udp:{B}:{UDP_PORT}": False, f"tcp:{B}:80": False, f"tcp:{B}:{OPEN_PORT}": True},
            "app/b": {f"udp:{C}:{UDP_PORT}": False, f"tcp:{A}:80": False}}
        assert lab.probe_from_node(f"tcp:{B}:80") and lab.probe_from_node(f"tcp:{C}:80")
    finally:
        if u:
            u.close()
        dp.cleanup()


def test_a_mark_forged_in_a_pod_is_scrubbed_and_the_packet_judged(lab: Lab, pin_root: str) -> None:
    build(lab)
    count_marked_on_node(lab)
    forge = f"""
table ip forge {{
  counter forged {{}}
  chain out {{
    type route hook output priority 0;
    meta mark set {MARK:#x} counter name forged
  }}
}}"""
    for pod in ("app/a", "app/c", "ext/x"):
        nft_file(lab.pods[pod].netns, forge)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(program())
        want = {
            # denied pairs stay denied, with the forged mark and with a known flow's tuple nearby
            "app/c": {f"udp:{B}:{UDP_PORT}": False, f"tcp:{B}:80": False, f"udp:{A}:80": False,
                      f"tcp:{B}:{OPEN_PORT}": True, f"tcp:{NODE4}:{NODE_PORT}": True},
            "app/a": {f"udp:{B}:{UDP_PORT}": True, f"tcp:{B}:{OPEN_PORT}": True, f"udp:{C}:{UDP_PORT}": False,
                      f"tcp:{NODE4}:{NODE_PORT}": True},
            # from outside the node's endpoints: b's ingress judges it (the /24 rule on 1024 only)
            "ext/x": {f"tcp:{B}:{OPEN_PORT}": True, f"tcp:{B}:80": False, f"udp:{C}:{UDP_PORT}": False},
        }
        seen = lab.probe_many({src: list(specs) for src, specs in want.items()})
        assert seen == want
        for pod in ("app/a", "app/c", "ext/x"):
            assert counter_packets(lab.pods[pod].netns, "ip", "forge", "forged") > 0  # the pods did set the mark
        # ... and none of it arrived on the node: the veth scrubbed it (pod -> node packets
        # are never vouched for, so any mark seen here would be the pod's)
        assert counter_packets(lab.node, "ip", "stkmark", "to_node") == 0
    finally:
        dp.cleanup()


def test_a_marked_packet_moved_to_another_pod_is_judged_there(lab: Lab, pin_root: str) -> None:
    build(lab)
    count_marked_on_node(lab)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    u = Udp(lab, "app/a", A, 40002, B, UDP_PORT)
    try:
        dp.apply(program())
        assert expect(u.ping, what="a -> b UDP")
        assert all(u.ping() for _ in range(10))
        marked = counter_packets(lab.node, "ip", "stkmark", "to_b")
        assert marked > 0  # the flow's packets to b are vouched for
        # Now the node DNATs this flow to c after the source's hook (new conntrack entry)
        nft_file(lab.node, f"""
table ip stknat {{
  counter moved {{}}
  chain pre {{
    type nat hook prerouting priority -100;
    ip daddr {B} udp dport {UDP_PORT} counter name moved dnat to {C}
  }}
}}""")
        lab.node_sh("conntrack", "-F", check=False)  # "0 flow entries" exits 0; a race exits 1
        # c's ingress denies a: the packet, marked for b's device, is judged at c's hook and
        # dropped there, counted as c's default deny (trusting the mark, c's hook would pass it
        # and the drop would be counted nowhere at c)
        assert not until(u.ping, timeout=2)
        assert counter_packets(lab.node, "ip", "stknat", "moved") > 0
        assert counter_packets(lab.node, "ip", "stkmark", "to_c") > 0  # it did arrive marked (for b's device)
        assert dp.counters().drops[("app/c", Direction.INGRESS)].packets > 0
        # positive control: once c allows a, the same moved flow is answered by c
        dp.apply(program(c_allows_a=True))
        assert expect(u.ping, what="a -> c through the DNAT, allowed")
    finally:
        u.close()
        dp.cleanup()


def test_audit_counts_at_the_destination(lab: Lab, pin_root: str) -> None:
    build(lab)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node, audit=True)
    u = Udp(lab, "app/a", A, 40003, C, UDP_PORT)
    try:
        dp.apply(program())
        # c's ingress would drop a: audit passes it, and counts it as c's default deny
        assert expect(u.ping, what="a -> c UDP, audited")
        assert all(u.ping() for _ in range(10))
        drops = dp.counters().drops[("app/c", Direction.INGRESS)].packets
        assert drops >= 1
        # a new flow is judged (and counted) again; known ones are not, as before
        v = Udp(lab, "app/a", A, 40004, C, UDP_PORT)
        try:
            assert expect(v.ping, what="a second audited flow")
        finally:
            v.close()
        assert dp.counters().drops[("app/c", Direction.INGRESS)].packets > drops
    finally:
        u.close()
        dp.cleanup()
