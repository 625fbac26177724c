"""What the hold reads from its TAP device (pure): Ethernet frames carrying DNS answers, UDP
datagrams from port 53 and TCP segments from port 53, and the per-flow reassembly of TCP's
length-prefixed DNS messages (RFC 1035 4.2.2: each message preceded by its 2-byte length,
a message free to span segments and a segment free to carry several).

TCP reassembly is bounded and in order only: bpf/dnshold.c sends every segment of a flow
from port 53 through the agent, one reader, so they arrive in the order the kernel sent
them. A segment that continues the flow's bytes is appended; a retransmission adds only
what is new; a gap (a segment lost before the agent saw it) desynchronises the flow, whose
state is dropped: its later messages teach nothing (their addresses stay denied; the
segments still pass unchanged). A flow the agent did not see open (it started mid-flow)
teaches nothing either. At most `MAX_FLOWS` flows and `MAX_BYTES` buffered bytes: beyond
that the least recently active flow's state goes first (a DNS message is at most 65,535
bytes, so one flow never buffers more than 65,537).
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict
from dataclasses import dataclass

from agent.inventory import IPAddress

ETH_IP, ETH_IP6 = 0x0800, 0x86DD
UDP, TCP = 17, 6
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
MAX_FLOWS = 1024
MAX_BYTES = 8 << 20
SEQ = 1 << 32


@dataclass(frozen=True)
class Packet:
    """A UDP datagram or TCP segment from port 53 (`seq`, `flags` 0 for UDP)."""

    proto: int
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    payload: bytes
    seq: int = 0
    flags: int = 0

    @property
    def flow(self) -> tuple[IPAddress, int, IPAddress, int]:
        return self.src, self.sport, self.dst, self.dport


def parse(frame: bytes) -> Packet | None:
    """The UDP datagram or TCP segment from port 53 in an Ethernet frame, else None (what
    the classifier redirects, read back in user space; Ethernet padding is cut off by the
    IP length)."""
    if len(frame) < 14:
        return None
    eth = struct.unpack_from("!H", frame, 12)[0]
    src: IPAddress
    dst: IPAddress
    if eth == ETH_IP and len(frame) >= 34:
        ihl = (frame[14] & 0x0F) * 4
        if ihl < 20 or struct.unpack_from("!H", frame, 20)[0] & 0x1FFF:
            return None  # a non-first fragment
        proto = frame[23]
        src, dst = ipaddress.IPv4Address(frame[26:30]), ipaddress.IPv4Address(frame[30:34])
        l4, end = 14 + ihl, 14 + struct.unpack_from("!H", frame, 16)[0]
    elif eth == ETH_IP6 and len(frame) >= 54:
        proto = frame[20]
        src, dst = ipaddress.IPv6Address(frame[22:38]), ipaddress.IPv6Address(frame[38:54])
        l4, end = 54, 54 + struct.unpack_from("!H", frame, 18)[0]
    else:
        return None
    end = min(end, len(frame))
    if proto == UDP and end >= l4 + 8:
        sport, dport = struct.unpack_from("!HH", frame, l4)
        if sport != 53:
            return None
        length = struct.unpack_from("!H", frame, l4 + 4)[0]
        return Packet(UDP, src, dst, sport, dport, frame[l4 + 8: min(end, l4 + max(length, 8))])
    if proto == TCP and end >= l4 + 20:
        sport, dport, seq = struct.unpack_from("!HHI", frame, l4)
        off = (frame[l4 + 12] >> 4) * 4
        if sport != 53 or off < 20 or l4 + off > end:
            return None
        return Packet(TCP, src, dst, sport, dport, frame[l4 + off: end], seq, frame[l4 + 13])
    return None


class _Flow:
    __slots__ = ("buf", "next")

    def __init__(self, nxt: int) -> None:
        self.next = nxt
        self.buf = bytearray()


class Reassembly:
    """The DNS messages TCP segments complete, flow by flow (see the module doc)."""

    def __init__(self, max_flows: int = MAX_FLOWS, max_bytes: int = MAX_BYTES) -> None:
        self.max_flows, self.max_bytes = max_flows, max_bytes
        self.flows: OrderedDict[tuple[IPAddress, int, IPAddress, int], _Flow] = OrderedDict()
        self.buffered = 0
        self.desynced = 0  # flows dropped for a gap (their later messages teach nothing)
        self.evicted = 0   # flows dropped for the bounds

    def segment(self, p: Packet) -> list[bytes]:
        """The messages this segment completes (in order; [] for most segments)."""
        key = p.flow
        if p.flags & RST:
            self._drop(key)
            return []
        if p.flags & SYN:  # the server's SYN-ACK: the flow's first byte follows
            self._drop(key)
            self.flows[key] = _Flow((p.seq + 1) % SEQ)
            self._bound()
            return []
        f = self.flows.get(key)
        if f is None:
            return []
        self.flows.move_to_end(key)
        out: list[bytes] = []
        if p.payload:
            ahead = (f.next - p.seq) % SEQ  # bytes of this segment the flow already has
            if ahead >= SEQ // 2:  # it starts past what the flow has: a gap
                self.desynced += 1
                self._drop(key)
                return []
            new = p.payload[ahead:]
            if new:
                f.buf += new
                self.buffered += len(new)
                f.next = (f.next + len(new)) % SEQ
                out = self._messages(f)
        if p.flags & FIN:
            self._drop(key)
        else:
            self._bound()
        return out

    def _messages(self, f: _Flow) -> list[bytes]:
        out, pos, buf = [], 0, f.buf
        while len(buf) - pos >= 2:
            n = struct.unpack_from("!H", buf, pos)[0]
            if len(buf) - pos - 2 < n:
                break
            if n:
                out.append(bytes(buf[pos + 2: pos + 2 + n]))
            pos += 2 + n
        if pos:
            del buf[:pos]
            self.buffered -= pos
        return out

    def _drop(self, key: tuple[IPAddress, int, IPAddress, int]) -> None:
        f = self.flows.pop(key, None)
        if f is not None:
            self.buffered -= len(f.buf)

    def _bound(self) -> None:
        while self.flows and (len(self.flows) > self.max_flows or self.buffered > self.max_bytes):
            key = next(iter(self.flows))
            self._drop(key)
            self.evicted += 1
