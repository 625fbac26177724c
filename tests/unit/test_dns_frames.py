"""agent/dns/frames.py: the frames the hold reads (UDP and TCP from port 53, IPv4 and IPv6,
Ethernet padding cut off) and TCP reassembly of length-prefixed DNS messages: a message is
returned exactly once, by the segment that completes it, however the stream is cut; the
state stays bounded; gaps, flows seen mid-stream and resets teach nothing."""

from __future__ import annotations

import ipaddress
import itertools
import struct

from hypothesis import given
from hypothesis import strategies as st

from agent.dns.frames import ACK, FIN, RST, SYN, TCP, UDP, Packet, Reassembly, parse

POD, SERVER = ipaddress.ip_address("10.1.0.1"), ipaddress.ip_address("10.1.0.53")
POD6, SERVER6 = ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd00::53")
ISN = 0xFFFFFFF0  # the flow's sequence numbers wrap around within a few bytes


def eth(l3: bytes, ether: int) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", ether) + l3


def ipv4(proto: int, l4: bytes, src: str = "10.1.0.53", dst: str = "10.1.0.1", frag: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return eth(hdr + l4, 0x0800)


def ipv6(proto: int, l4: bytes) -> bytes:
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, SERVER6.packed, POD6.packed)
    return eth(hdr + l4, 0x86DD)


def udp(payload: bytes, sport: int = 53) -> bytes:
    return struct.pack("!HHHH", sport, 40000, 8 + len(payload), 0) + payload


def tcp(payload: bytes, seq: int = 1, flags: int = ACK, sport: int = 53) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, 40000, seq, 0, 5 << 4, flags, 1000, 0, 0) + payload


def test_parse_udp_and_tcp_from_53_over_ipv4_and_ipv6() -> None:
    p = parse(ipv4(UDP, udp(b"answer")))
    assert p == Packet(UDP, SERVER, POD, 53, 40000, b"answer")
    p = parse(ipv6(UDP, udp(b"answer6")))
    assert p is not None and (p.src, p.dst, p.payload) == (SERVER6, POD6, b"answer6")
    p = parse(ipv4(TCP, tcp(b"\x00\x01x", seq=7, flags=ACK | FIN)))
    assert p == Packet(TCP, SERVER, POD, 53, 40000, b"\x00\x01x", 7, ACK | FIN)
    p = parse(ipv6(TCP, tcp(b"", seq=9, flags=SYN | ACK)))
    assert p is not None and (p.proto, p.dst, p.seq, p.flags, p.payload) == (TCP, POD6, 9, SYN | ACK, b"")


def test_parse_cuts_ethernet_padding_and_refuses_the_rest() -> None:
    frame = ipv4(TCP, tcp(b""))
    assert len(frame) < 60
    p = parse(frame.ljust(60, b"\0"))  # a short frame padded on the wire: no payload
    assert p is not None and p.payload == b""
    assert parse(ipv4(UDP, udp(b"x", sport=54))) is None
    assert parse(ipv4(TCP, tcp(b"x", sport=54))) is None
    assert parse(ipv4(UDP, udp(b"x"), frag=3)) is None  # a non-first fragment
    assert parse(ipv4(1, b"\0" * 8)) is None  # ICMP
    assert parse(b"\0" * 13) is None
    assert parse(ipv4(TCP, tcp(b"x"))[:40]) is None  # truncated TCP header


def msg(i: int, size: int) -> bytes:
    return bytes([i % 251]) * size


def stream(messages: list[bytes]) -> bytes:
    return b"".join(struct.pack("!H", len(m)) + m for m in messages)


def seg(payload: bytes, seq: int, flags: int = ACK, src: ipaddress.IPv4Address = SERVER) -> Packet:
    return Packet(TCP, src, POD, 53, 40000, payload, seq % (1 << 32), flags)


def feed(r: Reassembly, data: bytes, cuts: list[int], src: ipaddress.IPv4Address = SERVER) -> list[list[bytes]]:
    """Open a flow, send `data` cut at `cuts`; what each data segment completed."""
    assert r.segment(seg(b"", ISN, SYN | ACK, src)) == []
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    return [r.segment(seg(data[a:b], ISN + 1 + a, src=src)) for a, b in itertools.pairwise(bounds)]


@given(st.lists(st.integers(1, 600), min_size=1, max_size=6), st.lists(st.integers(0, 4000), max_size=12))
def test_each_message_once_by_the_segment_that_completes_it(sizes: list[int], cuts: list[int]) -> None:
    messages = [msg(i, n) for i, n in enumerate(sizes)]
    data = stream(messages)
    r = Reassembly()
    got = feed(r, data, cuts)
    assert [m for out in got for m in out] == messages
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    ends = [sum(2 + n for n in sizes[: i + 1]) for i in range(len(sizes))]
    for (a, b), out in zip(itertools.pairwise(bounds), got, strict=True):
        assert len(out) == sum(1 for e in ends if a < e <= b)  # completed here, not before, not after
    assert r.buffered == 0


def test_retransmissions_add_only_what_is_new() -> None:
    data = stream([msg(1, 10), msg(2, 10)])
    r = Reassembly()
    r.segment(seg(b"", ISN, SYN | ACK))
    assert r.segment(seg(data[:8], ISN + 1)) == []
    assert r.segment(seg(data[:8], ISN + 1)) == []  # the same again
    assert r.segment(seg(data[:14], ISN + 1)) == [msg(1, 10)]  # overlaps: its new part completes 1
    assert r.segment(seg(data[:14], ISN + 1)) == []  # 1 is not learned twice
    assert r.segment(seg(data[14:], ISN + 15, ACK | FIN)) == [msg(2, 10)]
    assert r.flows == {}


def test_gaps_midstream_flows_and_resets_teach_nothing() -> None:
    data = stream([msg(1, 10), msg(2, 10)])
    r = Reassembly()
    r.segment(seg(b"", ISN, SYN | ACK))
    assert r.segment(seg(data[5:12], ISN + 6)) == []  # bytes 1..5 never seen: desynchronised
    assert r.desynced == 1 and not r.flows
    assert r.segment(seg(data[:12], ISN + 1)) == []  # the flow's state is gone: nothing
    r2 = Reassembly()
    assert r2.segment(seg(data, ISN + 1)) == []  # a flow never seen opening (the agent started late)
    r2.segment(seg(b"", ISN, SYN | ACK))
    r2.segment(seg(data[:5], ISN + 1))
    assert r2.segment(seg(b"", ISN + 6, RST)) == [] and r2.buffered == 0 and not r2.flows
    assert r2.segment(seg(b"", ISN, SYN | ACK)) == []  # a new flow on the same ports starts afresh
    assert r2.segment(seg(data[:12], ISN + 1)) == [msg(1, 10)]


def test_flows_and_buffered_bytes_are_bounded() -> None:
    r = Reassembly(max_flows=3, max_bytes=100)
    sources = [ipaddress.ip_address(f"10.1.1.{i}") for i in range(5)]
    for src in sources:  # each flow buffers 40 bytes of an unfinished message
        feed(r, struct.pack("!H", 500) + b"x" * 38, [], src)
        assert len(r.flows) <= 3 and r.buffered <= 100
    assert r.evicted == 3 and r.buffered == 80
    # the most recent flows kept theirs: one completes; an evicted one teaches nothing
    assert r.segment(seg(b"y" * 462, ISN + 41, src=sources[4])) == [b"x" * 38 + b"y" * 462]
    assert r.segment(seg(b"y" * 462, ISN + 41, src=sources[0])) == []
