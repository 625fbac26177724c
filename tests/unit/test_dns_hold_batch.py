"""Hold.handle_batch (agent/dns/hold.py) without a kernel: the frames read together are
learned in order and released at once while nothing new was learned; from the first
answer that taught something new on they wait, `commit()` runs once after all were
learned, then they are released in the order read, answers or not; an answer whose
learning fails is released all the same."""

from __future__ import annotations

import ipaddress
import struct
from collections import deque
from typing import Any

from agent.dns.frames import ACK, SYN, Reassembly
from agent.dns.hold import Hold

POD = ipaddress.ip_address("10.1.0.1")


def frame(proto: int, l4: bytes) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                     ipaddress.IPv4Address("10.1.0.53").packed, POD.packed)
    return b"\x02" * 12 + b"\x08\x00" + ip + l4


def udp(payload: bytes) -> bytes:
    return frame(17, struct.pack("!HHHH", 53, 40000, 8 + len(payload), 0) + payload)


def tcp(payload: bytes, seq: int, flags: int = ACK) -> bytes:
    return frame(6, struct.pack("!HHIIBBHHH", 53, 40000, seq, 0, 5 << 4, flags, 1000, 0, 0) + payload)


class Out:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.log.append(("release", data))


def hold(log: list[Any], learns: dict[bytes, bool]) -> Hold:
    h = object.__new__(Hold)  # no kernel: only what handle_batch uses

    def on_answer(dst: Any, payload: bytes) -> bool:
        log.append(("learn", payload))
        if payload == b"boom":
            raise ValueError("unparsable")
        return learns.get(payload, False)

    h.on_answer, h.commit, h.commits = on_answer, lambda: log.append(("commit",)), 0
    h.on_released, h.latencies, h.released = None, deque(), 0
    h.tcp, h.out, h._devices = Reassembly(), Out(log), {POD: "veth0"}
    h._dirty = False
    return h


def test_one_commit_after_learning_and_before_any_later_release() -> None:
    log: list[Any] = []
    h = hold(log, {b"new": True})
    frames = [udp(b"old"), udp(b"new"), udp(b"boom"), udp(b"new")]
    h.handle_batch([(f, 0.0) for f in frames])
    assert log == [("learn", b"old"), ("release", frames[0]),  # nothing new yet: released at once
                   ("learn", b"new"), ("learn", b"boom"), ("learn", b"new"), ("commit",),
                   *(("release", f) for f in frames[1:])]
    assert h.commits == 1 and h.released == 4 and len(h.latencies) == 4


def test_no_commit_when_nothing_is_new() -> None:
    log: list[Any] = []
    h = hold(log, {})
    h.handle_batch([(udp(b"old"), 0.0), (b"\x00" * 20, 0.0)])  # the second is not an answer: skipped
    assert log == [("learn", b"old"), ("release", udp(b"old"))] and h.commits == 0


def test_tcp_segments_keep_their_order_and_only_complete_messages_are_learned() -> None:
    log: list[Any] = []
    h = hold(log, {b"abcd": True})
    msg = struct.pack("!H", 4) + b"abcd"
    frames = [tcp(b"", 99, SYN | ACK), tcp(msg[:3], 100), tcp(msg[3:], 103), tcp(b"", 106, ACK | 1)]
    h.handle_batch([(f, 0.0) for f in frames])
    assert log == [("release", frames[0]), ("release", frames[1]), ("learn", b"abcd"), ("commit",),
                   ("release", frames[2]), ("release", frames[3])]  # the FIN never overtakes the answer
    assert len(h.latencies) == 1  # the hold time of the answer, not of bare segments


def test_queued_frames_are_drained_only_once_a_commit_is_due() -> None:
    import socket

    log: list[Any] = []
    h = hold(log, {b"new": True})
    theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one read, one frame, as a TAP
    with theirs, ours:
        ours.setblocking(False)
        h.tap_fd = ours.fileno()
        for f in (udp(b"q1"), udp(b"q2")):
            theirs.send(f)
        h.handle_batch(h._frames((udp(b"old"), 0.0)))  # nothing new: the queue is left alone
        assert log == [("learn", b"old"), ("release", udp(b"old"))]
        log.clear()
        h.handle_batch(h._frames((udp(b"new"), 0.0)))  # new: what is queued joins the one commit
        assert log == [("learn", b"new"), ("learn", b"q1"), ("learn", b"q2"), ("commit",),
                       ("release", udp(b"new")), ("release", udp(b"q1")), ("release", udp(b"q2"))]
