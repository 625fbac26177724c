"""Tiny load generators run inside the lab's pod namespaces (stdlib only).

    python -m bench.loadgen serve PORT_CRR PORT_RR      prints "ready", serves until killed
    python -m bench.loadgen crr HOST PORT SECONDS        new TCP connection per request
    python -m bench.loadgen rr HOST PORT SECONDS         1-byte ping-pong on one connection
    python -m bench.loadgen verdicts HOST PORT INTERVAL GRACE   the verdict watcher (below)

Clients print one JSON line. `crr` closes with RST (SO_LINGER 0) so no TIME_WAIT piles
up in the client's port range; every connection is a fresh conntrack entry and a fresh
first packet for the filter to judge.
"""

from __future__ import annotations

import errno
import json
import selectors
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


def verdicts(host: str, port: int, interval: float, grace: float, need: int = 5, limit: float = 30.0) -> None:
    """Watches the verdict on HOST:PORT by packets, on demand, for the event benchmark.

    Reads "allow" or "deny" (the verdict to wait for) from stdin, answers "started", then
    opens a new TCP connection every `interval` seconds (each a new conntrack entry, so
    each SYN is judged by the filter; closed with RST). A probe is allowed when its
    connection completes and denied when it has not within `grace`. Once `need` probes in
    a row have the wanted verdict it prints the CLOCK_MONOTONIC send time of the first of
    them (comparable with the runner's time.monotonic()) and the probes sent, or
    "timeout" after `limit` seconds.
    """
    print("ready", flush=True)
    for line in sys.stdin:
        want = line.strip() == "allow"
        print("started", flush=True)
        sel = selectors.DefaultSelector()
        sent: list[float] = []
        got: dict[int, bool] = {}  # probe index -> allowed
        pending: dict[socket.socket, int] = {}
        start = next_send = time.monotonic()
        answer = "timeout"
        decided, last_unwanted = 0, -1
        while time.monotonic() - start < limit:
            now = time.monotonic()
            if now >= next_send:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                s.setblocking(False)
                sent.append(time.monotonic())
                rc = s.connect_ex((host, port))
                if rc in (0, errno.EINPROGRESS):
                    pending[s] = len(sent) - 1
                    sel.register(s, selectors.EVENT_WRITE)
                else:
                    got[len(sent) - 1] = False
                    s.close()
                next_send = max(next_send + interval, now)
            for key, _ in sel.select(max(0.0, next_send - time.monotonic())):
                s = key.fileobj  # type: ignore[assignment]
                got[pending.pop(s)] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                sel.unregister(s)
                s.close()
            now = time.monotonic()
            for s, i in list(pending.items()):
                if now - sent[i] > grace:  # no answer: dropped
                    got[i] = False
                    del pending[s]
                    sel.unregister(s)
                    s.close()
            # Probes decide out of order (allowed at once, denied after `grace`): walk the
            # decided prefix, remembering the last unwanted verdict in it.
            while decided < len(sent) and decided in got:
                if got[decided] != want:
                    last_unwanted = decided
                decided += 1
            if decided - (last_unwanted + 1) >= need:
                answer = f"{sent[last_unwanted + 1]:.6f} {len(sent)}"
                break
        for s in pending:
            sel.unregister(s)
            s.close()
        sel.close()
        print(answer, flush=True)


def main(argv: list[str]) -> int:
    cmd = argv[0]
    if cmd == "serve":
        serve(int(argv[1]), int(argv[2]))
        return 0
    if cmd == "verdicts":
        verdicts(argv[1], int(argv[2]), float(argv[3]), float(argv[4]))
        return 0
    host, port, seconds = argv[1], int(argv[2]), float(argv[3])
    res = crr(host, port, seconds) if cmd == "crr" else rr(host, port, seconds)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
