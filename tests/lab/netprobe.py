"""Stand-alone servers and probes run inside lab namespaces (no project imports).

    netprobe.py serve PORT...            TCP and UDP servers on [::] (IPv4 too), each port
    netprobe.py probe TIMEOUT SPEC...    SPEC = proto:addr:port; prints one JSON object
                                         {"SPEC": true|false} (true: a reply came back)
"""

from __future__ import annotations

import json
import select
import socket
import sys
import threading


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
        conn.settimeout(5)
        try:
            data = conn.recv(1024)
            conn.sendall(b"pong:" + data)
        except OSError:
            pass


def probe_one(spec: str, timeout: float) -> bool:
    proto, rest = spec.split(":", 1)
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
    else:
        probe(float(sys.argv[2]), sys.argv[3:])
