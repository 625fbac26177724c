"""DNS answer hold benchmark (agent/dns/hold.py, `--dns-egress`): what holding answers costs.

    python -m bench.dnshold [--queries 2000] [--threads 1,4] [--json F]   (as root)
    python -m bench.dnshold --agent nftables,ebpf [--queries 500]         (the whole agent)

In the namespace lab (tests/kit): a pod with a UDP DNS server (dnspython), a client pod
sending queries with dns.query.udp from T threads, each waiting for its answer before the
next. Measured without the hold, then with it (the learner parsing each answer and merging
it into a Learned table, as the agent would before releasing):
- `rtt_p50_ms` / `rtt_p99_ms`: the client's query -> answer time;
- `answers_per_s`: answers the client received per second (T threads together);
- `hold_p50_ms` / `hold_p99_ms` / `hold_max_ms`: the agent's own read -> release time;
- `lost`: queries that got no answer within 2 s.
With `--agent`: `stockade run --dns-egress` on each dataplane, a ClusterNetworkPolicy with
a `*.bench.test` domainNames rule for the client, and a server answering every query with a
NEW address, so each answer waits for a kernel update before its release (the worst case):
the client's `rtt_*` and the agent's own `stockade_dns_hold_seconds` (mean, and the bucket
counts) from /metrics.
Reports; never passes or fails. Not part of `make bench` yet (the hold is experimental).
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
from tests.kit.dns_lab import start_dns_server
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
        start_dns_server(lab, server.netns, SERVER_PY)
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


UNIQUE_SERVER_PY = SERVER_PY.replace('"192.0.2.%d" % (1 + q.id % 250)', '"10.99.%d.%d" % divmod(next(seq) % 65000, 256)'
                                      ).replace("import socket", "import itertools, socket\nseq = itertools.count(1)")


def agent_run(dataplane: str, queries: int) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    from tests.kit import until
    from tests.kit.builders import ns, pod
    from tests.kit.enforcement import write
    from tests.kit.privileges import dataplane_env

    cnp = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": "names"},
           "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchLabels": {"team": "app"}}},
                    "egress": [{"action": "Accept", "to": [{"domainNames": ["*.bench.test"]}],
                                "protocols": [{"tcp": {"destinationPort": {"number": 443}}}]}]}}
    docs = [ns("app", team="app"), ns("dns"), pod("app/client", [CLIENT]), pod("dns/server", [SERVER]), cnp]
    with dataplane_env(dataplane, f"bench-dns-{dataplane}"), tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        lab.add_pod("app/client", [CLIENT])
        server = lab.add_pod("dns/server", [SERVER])
        start_dns_server(lab, server.netns, UNIQUE_SERVER_PY)
        write(Path(tmp) / "src", docs)
        lab.spawn_agent("run", "--source", str(Path(tmp) / "src"), "--node", "n1", "--dataplane", dataplane,
                        "--state-dir", "", "--metrics-address", "127.0.0.1:9755", "--dns-egress")
        assert until(lambda: lab.http_get("http://127.0.0.1:9755/readyz")[0] == 200, 120), "agent never ready"
        row: dict[str, Any] = {"agent": dataplane, **client_run(lab, queries, 1)}
        text = lab.http_get("http://127.0.0.1:9755/metrics")[1]
        m = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("stockade_dns_"))
        n, total = float(m["stockade_dns_hold_seconds_count"]), float(m["stockade_dns_hold_seconds_sum"])
        row.update(held=int(n), hold_mean_ms=round(total / n * 1000, 3) if n else None,
                   learned_entries=int(float(m["stockade_dns_learned_entries"])),
                   hold_buckets={k.split('le="')[1].rstrip('"}'): int(float(v)) for k, v in m.items()
                                 if k.startswith("stockade_dns_hold_seconds_bucket")})
        return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--json")
    ap.add_argument("--agent", help="dataplanes to run the whole agent on (comma-separated)")
    a = ap.parse_args()
    if a.agent:
        rows = [agent_run(d, a.queries) for d in a.agent.split(",")]
    else:
        rows = run(a.queries, [int(t) for t in a.threads.split(",")])
    for r in rows:
        print(json.dumps(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
