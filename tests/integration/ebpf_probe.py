"""Helpers the eBPF tests run inside lab namespaces (plain python3, no project imports).

    ebpf_probe.py icmp TIMEOUT ADDR...        ICMP/ICMPv6 echo; prints {"ADDR": bool}
    ebpf_probe.py refused TIMEOUT SPEC...    SPEC = proto:addr:port to a closed port; prints
                                              {"SPEC": "refused"|"timeout"|"answered"}
                                              (refused: the RST / ICMP error came back)
    ebpf_probe.py big TIMEOUT SIZE SPEC...   UDP datagrams of SIZE bytes (fragmented both ways);
                                              prints {"SPEC": bool} (true: the echo came back)
    ebpf_probe.py relay NS_A TUN_A NS_B TUN_B  create a TUN device in each namespace and
                                              copy raw IP packets between them (a
                                              userspace-WireGuard-like wt0 stand-in)
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import select
import socket
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(addr: str, timeout: float) -> bool:
    v6 = ":" in addr
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    ident = (os.getpid() + hash(addr)) & 0xFFFF
    with socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP) as s:
        s.settimeout(timeout)
        typ, reply = (128, 129) if v6 else (8, 0)
        msg = struct.pack("!BBHHH", typ, 0, 0, ident, 1) + b"stockade"
        if not v6:  # the kernel fills in the ICMPv6 checksum
            msg = msg[:2] + struct.pack("!H", _csum(msg)) + msg[4:]
        s.sendto(msg, (addr, 0))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                data, _ = s.recvfrom(2048)
            except OSError:
                return False
            if not v6:
                data = data[(data[0] & 15) * 4 :]
            if len(data) >= 8 and data[0] == reply and struct.unpack("!H", data[4:6])[0] == ident:
                return True
    return False


def refused(spec: str, timeout: float) -> str:
    proto, rest = spec.split(":", 1)
    addr, port = rest.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((addr, int(port)))
            s.send(b"ping")
            s.recv(64)
            return "answered"
        except ConnectionRefusedError:
            return "refused"
        except OSError:
            return "timeout"


def big(spec: str, size: int, timeout: float) -> bool:
    _, rest = spec.split(":", 1)
    addr, port = rest.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((addr, int(port)))
            s.send(b"x" * size)
            return len(s.recv(65536)) > 1500
        except OSError:
            return False


def _tun(netns: str, name: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns {netns}")
    os.close(fd)
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return tun


def relay(ns_a: str, tun_a: str, ns_b: str, tun_b: str) -> None:
    a = _tun(ns_a, tun_a)
    b = _tun(ns_b, tun_b)
    print("ready", flush=True)
    other = {a: b, b: a}
    while True:
        for fd in select.select([a, b], [], [])[0]:
            data = os.read(fd, 65536)
            with contextlib.suppress(OSError):  # the other side is still down
                os.write(other[fd], data)


if __name__ == "__main__":
    if sys.argv[1] == "icmp":
        t = float(sys.argv[2])
        print(json.dumps({a: ping(a, t) for a in sys.argv[3:]}))
    elif sys.argv[1] == "refused":
        t = float(sys.argv[2])
        print(json.dumps({spec: refused(spec, t) for spec in sys.argv[3:]}))
    elif sys.argv[1] == "big":
        t, n = float(sys.argv[2]), int(sys.argv[3])
        print(json.dumps({spec: big(spec, n, t) for spec in sys.argv[4:]}))
    elif sys.argv[1] == "relay":
        relay(*sys.argv[2:6])
