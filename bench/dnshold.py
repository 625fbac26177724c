"""DNS answer hold benchmark (the agent/dns/hold.py spike): what holding answers costs.

    python -m bench.dnshold [--queries 2000] [--threads 1,4] [--json F]   (as root)

In the namespace lab (tests/kit): a pod with a UDP DNS server (dnspython), a client pod
sending queries with dns.query.udp from T threads, each waiting for its answer before the
next. Measured without the hold, then with it (the learner parsing each answer and merging
it into a Learned table, as the agent would before releasing):
- `rtt_p50_ms` / `rtt_p99_ms`: the client's query -> answer time;
- `answers_per_s`: answers the client received per second (T threads together);
- `hold_p50_ms` / `hold_p99_ms` / `hold_max_ms`: the agent's own read -> release time;
- `lost`: queries that got no answer within 2 s.
Reports; never passes or fails. Not part of `make bench` yet (the hold is a spike).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from agent.dns.hold import Hold
from agent.dns.learn import merge, updates
from agent.inventory import IPAddress
from agent.policy.cluster import DomainRule, Learned, parse_domain
from tests.kit import Lab
from tests.kit.netns import worker

CLIENT, SERVER = "10.35.0.1", "10.35.0.53"

SERVER_PY = """
import socket
import dns.message, dns.rrset
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    q = dns.message.from_wire(data)
    r = dns.message.make_response(q)
    n = q.question[0].name
    r.answer.append(dns.rrset.from_text(n, 30, "IN", "A", "192.0.2.%d" % (1 + q.id % 250)))
    s.sendto(r.to_wire(), peer)
"""

CLIENT_PY = """
import json, sys, threading, time
import dns.message, dns.query, dns.exception
server, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rtts, lost = [], [0]
def run(k):
    for i in range(k):
        q = dns.message.make_query("h%d.bench.test" % i, "A")
        t = time.perf_counter()
        try:
            dns.query.udp(q, server, timeout=2)
            rtts.append(time.perf_counter() - t)
        except dns.exception.Timeout:
            lost[0] += 1
t0 = time.perf_counter()
ts = [threading.Thread(target=run, args=(n // threads,)) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"rtts": rtts, "lost": lost[0], "wall": time.perf_counter() - t0}))
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else float("nan")


def client_run(lab: Lab, queries: int, threads: int) -> dict[str, Any]:
    out = subprocess.run(["ip", "netns", "exec", lab.pods["app/client"].netns, sys.executable, "-c", CLIENT_PY,
                          SERVER, str(queries), str(threads)], capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    return {"rtt_p50_ms": round(pct(r["rtts"], 0.5), 3), "rtt_p99_ms": round(pct(r["rtts"], 0.99), 3),
            "answers_per_s": round(len(r["rtts"]) / r["wall"]), "lost": r["lost"]}


def run(queries: int, thread_counts: list[int]) -> list[dict[str, Any]]:
    rows = []
    rules = [DomainRule("r", (parse_domain("*.bench.test", "f"),))]
    with Lab() as lab:
        lab.add_pod("app/client", [CLIENT])
        server = lab.add_pod("dns/server", [SERVER])
        proc = subprocess.Popen(["ip", "netns", "exec", server.netns, sys.executable, "-c", SERVER_PY],
                                stdout=subprocess.PIPE, text=True)
        lab.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for threads in thread_counts:
            rows.append({"hold": False, "threads": threads, **client_run(lab, queries, threads)})
        table = [Learned()]

        def learn(dst: IPAddress, payload: bytes) -> None:
            table[0] = merge(table[0], updates("app/client", rules, payload, time.monotonic()))

        pool = worker(lab.node)
        hold = pool.submit(lambda: Hold(learn, lab.node)).result()
        try:
            pool.submit(lambda: hold.attach(lab.pods["app/client"].host_if)).result()
            hold.start()
            for threads in thread_counts:
                hold.latencies.clear()
                row = {"hold": True, "threads": threads, **client_run(lab, queries, threads)}
                lat = list(hold.latencies)
                row.update(hold_p50_ms=round(pct(lat, 0.5), 3), hold_p99_ms=round(pct(lat, 0.99), 3),
                           hold_max_ms=round(max(lat) * 1000, 3), held=len(lat),
                           hold_mean_ms=round(statistics.fmean(lat) * 1000, 3))
                rows.append(row)
            rows.append({"learned_entries": len(table[0])})
        finally:
            pool.submit(hold.close).result()
            pool.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = run(a.queries, [int(t) for t in a.threads.split(",")])
    for r in rows:
        print(json.dumps(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
