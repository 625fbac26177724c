"""Tiny load generators run inside the lab's pod namespaces (stdlib only).

    python -m bench.loadgen serve PORT_CRR PORT_RR      prints "ready", serves until killed
    python -m bench.loadgen crr HOST PORT SECONDS        new TCP connection per request
    python -m bench.loadgen rr HOST PORT SECONDS         1-byte ping-pong on one connection

Clients print one JSON line. `crr` closes with RST (SO_LINGER 0) so no TIME_WAIT piles
up in the client's port range; every connection is a fresh conntrack entry and a fresh
first packet for the filter to judge.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time

LINGER_RST = struct.pack("ii", 1, 0)


def _crr_server(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        try:
            if conn.recv(1):
                conn.sendall(b"y")
        except OSError:
            pass
        finally:
            conn.close()


def _rr_conn(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            b = conn.recv(1)
            if not b:
                return
            conn.sendall(b)
    except OSError:
        return
    finally:
        conn.close()


def _rr_server(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_rr_conn, args=(conn,), daemon=True).start()


def _listen(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(1024)
    return s


def serve(crr_port: int, rr_port: int) -> None:
    a, b = _listen(crr_port), _listen(rr_port)
    threading.Thread(target=_crr_server, args=(a,), daemon=True).start()
    threading.Thread(target=_rr_server, args=(b,), daemon=True).start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def crr(host: str, port: int, seconds: float) -> dict[str, float]:
    n = errors = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        s.settimeout(2.0)
        try:
            s.connect((host, port))
            s.sendall(b"x")
            if s.recv(1):
                n += 1
        except OSError:
            errors += 1
        finally:
            s.close()
    dt = time.perf_counter() - t0
    return {"connections": n, "errors": errors, "seconds": dt, "per_s": n / dt}


def rr(host: str, port: int, seconds: float) -> dict[str, float]:
    s = socket.create_connection((host, port), timeout=2.0)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat: list[float] = []
    pc = time.perf_counter
    for _ in range(200):  # warm-up
        s.sendall(b"x")
        s.recv(1)
    t0 = pc()
    end = t0 + seconds
    while True:
        a = pc()
        if a >= end:
            break
        s.sendall(b"x")
        s.recv(1)
        lat.append(pc() - a)
    dt = pc() - t0
    s.close()
    lat.sort()
    n = len(lat)
    return {"requests": n, "per_s": n / dt, "p50_us": lat[n // 2] * 1e6,
            "p99_us": lat[min(n - 1, int(n * 0.99))] * 1e6}


def main(argv: list[str]) -> int:
    cmd = argv[0]
    if cmd == "serve":
        serve(int(argv[1]), int(argv[2]))
        return 0
    host, port, seconds = argv[1], int(argv[2]), float(argv[3])
    res = crr(host, port, seconds) if cmd == "crr" else rr(host, port, seconds)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
