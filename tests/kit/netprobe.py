"""Stand-alone servers and probes run inside lab namespaces (no project imports).

    netprobe.py serve PORT...            TCP and UDP servers on [::] (IPv4 too), each port
    netprobe.py probe TIMEOUT SPEC...    SPEC = proto:addr:port (tcp, udp) or icmp:addr (echo
                                         request, raw socket); prints one JSON object
                                         {"SPEC": true|false} (true: a reply came back)
    netprobe.py refused TIMEOUT SPEC...  SPEC = proto:addr:port, a closed port; prints
                                         {"SPEC": "refused"|"timeout"|"answered"}
                                         (refused: the RST / ICMP error came back)
    netprobe.py big TIMEOUT SIZE SPEC... UDP datagrams of SIZE bytes (fragmented both ways);
                                         prints {"SPEC": true|false} (true: the echo came back)
    netprobe.py hold ADDR PORT           one TCP connection, a ping through it per stdin line
    netprobe.py resolve 4|6 once|hold NAME ADDR...
                                         resolve NAME (libc's stub resolver), connect to TCP/80
                                         of each answer and ADDR; prints {"addrs", "connected"}
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import sys
import threading
import time


def serve(ports: list[int]) -> None:
    socks = []
    for port in ports:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(socket.AF_INET6, kind)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::", port))
            if kind == socket.SOCK_STREAM:
                s.listen(128)
            socks.append(s)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select(socks, [], [])
        for s in ready:
            if s.type == socket.SOCK_STREAM:
                conn, _ = s.accept()
                threading.Thread(target=_answer, args=(conn,), daemon=True).start()
            else:
                data, peer = s.recvfrom(2048)
                s.sendto(b"pong:" + data, peer)


def _answer(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(60)
        try:
            while data := conn.recv(1024):
                conn.sendall(b"pong:" + data)
        except OSError:
            pass


def hold(addr: str, port: int) -> None:
    """One long-lived TCP connection; each stdin line sends a ping and prints ok/fail."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect((addr, port))
        print("connected", flush=True)
        _ping_per_line(s)


def _ping_per_line(s: socket.socket) -> None:
    """Per stdin line, a ping through `s`; prints ok (its pong came back) or fail."""
    s.settimeout(2)
    for _ in sys.stdin:
        try:
            s.send(b"ping")
            ok = s.recv(64).startswith(b"pong")
        except OSError:
            ok = False
        print("ok" if ok else "fail", flush=True)


def resolve(family: str, mode: str, name: str, also: list[str]) -> None:
    """Resolve `name` through the C library's stub resolver (IPv4 or IPv6 by `family`),
    connect at once to TCP/80 of every answered address and of `also`; in mode `hold`,
    then ping through the first connection per stdin line."""
    fam = {"4": socket.AF_INET, "6": socket.AF_INET6}[family]
    try:
        addrs = sorted({ai[4][0] for ai in socket.getaddrinfo(name, 80, fam, socket.SOCK_STREAM)})
    except socket.gaierror:
        addrs = []
    opened = []

    def connect(a: str) -> bool:
        try:
            opened.append(socket.create_connection((a, 80), timeout=1.0))
        except OSError:
            return False
        return True

    print(json.dumps({"addrs": addrs, "connected": {a: connect(a) for a in [*addrs, *also]}}), flush=True)
    if mode == "hold" and opened:
        _ping_per_line(opened[0])


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


_ids = iter(range((os.getpid() * 97) & 0xFFFF, 1 << 30))
_ids_lock = threading.Lock()


def ping(addr: str, timeout: float) -> bool:
    """One ICMP (v6) echo request over a raw socket; True if the matching reply came back."""
    v6 = ":" in addr
    with _ids_lock:
        ident = next(_ids) & 0xFFFF
    fam, proto, typ, reply = ((socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129) if v6
                              else (socket.AF_INET, socket.IPPROTO_ICMP, 8, 0))
    payload = b"netprobe"
    header = struct.pack("!BBHHH", typ, 0, 0, ident, 1)
    if not v6:  # the kernel fills in the ICMPv6 checksum itself
        header = struct.pack("!BBHHH", typ, 0, _checksum(header + payload), ident, 1)
    deadline = time.monotonic() + timeout
    with socket.socket(fam, socket.SOCK_RAW, proto) as s:
        try:
            s.sendto(header + payload, (addr, 0))
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                data, src = s.recvfrom(2048)
                if not v6:
                    data = data[(data[0] & 0x0F) * 4:]  # IPv4 raw sockets include the IP header
                if _same(src[0], addr) and len(data) >= 8 and data[0] == reply and \
                        struct.unpack("!H", data[4:6])[0] == ident:
                    return True
        except OSError:
            return False
    return False


def _same(a: str, b: str) -> bool:
    return socket.inet_pton(socket.AF_INET6 if ":" in b else socket.AF_INET, a.split("%")[0]) == \
        socket.inet_pton(socket.AF_INET6 if ":" in b else socket.AF_INET, b)


def probe_one(spec: str, timeout: float) -> bool:
    proto, rest = spec.split(":", 1)
    if proto == "icmp":
        return ping(rest, timeout)
    addr, port = rest.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(fam, kind) as s:
        s.settimeout(timeout)
        try:
            s.connect((addr, int(port)))
            s.send(b"ping")
            return s.recv(64).startswith(b"pong")
        except OSError:
            return False


def refused(spec: str, timeout: float) -> str:
    """What a connection to a closed port meets: "refused" (RST or ICMP error), "timeout"."""
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
    """One UDP datagram of `size` bytes; True if the (as large) echo came back."""
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


def probe(timeout: float, specs: list[str]) -> None:
    results: dict[str, bool] = {}

    def run(spec: str) -> None:
        results[spec] = probe_one(spec, timeout)

    threads = [threading.Thread(target=run, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve([int(p) for p in sys.argv[2:]])
    elif sys.argv[1] == "hold":
        hold(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "refused":
        print(json.dumps({spec: refused(spec, float(sys.argv[2])) for spec in sys.argv[3:]}))
    elif sys.argv[1] == "resolve":
        resolve(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    elif sys.argv[1] == "big":
        print(json.dumps({spec: big(spec, int(sys.argv[3]), float(sys.argv[2])) for spec in sys.argv[4:]}))
    else:
        probe(float(sys.argv[2]), sys.argv[3:])
