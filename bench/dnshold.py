"""DNS answer hold benchmark (agent/dns/hold.py, `--dns-egress`): what holding answers costs.

    python -m bench.dnshold [--queries 2000] [--threads 1,4] [--json F]   (as root)
    python -m bench.dnshold --rate 1000 [--seconds 10] [--tcp-queries 300]  (sustained rate)
    python -m bench.dnshold --agent nftables,ebpf [--queries 500]         (the whole agent)
    python -m bench.dnshold --agent nftables,ebpf --rate 1000 [--distinct 200]

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
With `--rate R`: open loop, the client sends R UDP queries per second for `--seconds`
(paced, not waiting for answers) and counts the answers: `sent`, `answered`, `lost` (no
answer 2 s after the last query), `send_rate`, the client's `rtt_*`, and the hold's own
`hold_*` (in-process) or the agent's `stockade_dns_hold_seconds` (`--agent`, quantiles read
from its buckets: an upper bound). With `--agent`, `--distinct N` names cycle, each always
answered with the same address: the first N answers each bring a new address (a kernel
update; row "learning"), then `--seconds` of the same names, which refresh what is learned
(row "steady") -- the steady state of pods resolving the same names. A refresh costs a
kernel update on nftables (the element's timeout moves to the later expiry: one nfnetlink
batch per burst) and none on eBPF (its re-apply path re-applies only at an expiry).
`--tcp-queries N` (in-process): N queries over TCP from one thread, one connection each,
with the hold (every segment of the flow goes through it).
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

# {addr}: the answer's address, an expression of the query `q`, its name `n` and `seq`
SERVER_TEMPLATE = """
import itertools, socket, struct, threading
import dns.message, dns.rrset
seq = itertools.count(1)
def reply(data):
    q = dns.message.from_wire(data)
    r = dns.message.make_response(q)
    n = q.question[0].name
    r.answer.append(dns.rrset.from_text(n, 30, "IN", "A", {addr}))
    return r.to_wire()
def serve_tcp():
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", 53))
    t.listen(64)
    while True:
        c, _ = t.accept()
        with c, c.makefile("rb") as f:
            out = reply(f.read(struct.unpack("!H", f.read(2))[0]))
            c.sendall(struct.pack("!H", len(out)) + out)
threading.Thread(target=serve_tcp, daemon=True).start()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("0.0.0.0", 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    s.sendto(reply(data), peer)
"""
SERVER_PY = SERVER_TEMPLATE.replace("{addr}", '"192.0.2.%d" % (1 + q.id % 250)')
# every answer a new address (the worst case: a kernel update per answer)
UNIQUE_SERVER_PY = SERVER_TEMPLATE.replace("{addr}", '"10.99.%d.%d" % divmod(next(seq) % 65000, 256)')
# hN.bench.test -> always the same address (what a pod resolving the same names sees)
BY_NAME_SERVER_PY = SERVER_TEMPLATE.replace("{addr}", '"10.99.%d.%d" % divmod(int(n.labels[0][1:]) % 65000, 256)')

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


# open loop: send at a fixed rate from one socket, receive on another thread
RATE_CLIENT_PY = """
import json, socket, struct, sys, threading, time
import dns.message
server, rate, seconds, distinct = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
n = min(65536, int(rate * seconds))
wires = []
for i in range(n):
    q = dns.message.make_query("h%d.bench.test" % (i % distinct), "A")
    q.id = i
    wires.append(q.to_wire())
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.connect((server, 53))
s.settimeout(0.2)
sent, got, done = [0.0] * n, {}, threading.Event()
def recv():
    while True:
        try:
            data = s.recv(4096)
        except socket.timeout:
            if done.is_set():
                return
            continue
        got.setdefault(struct.unpack_from("!H", data)[0], time.perf_counter())
t = threading.Thread(target=recv)
t.start()
t0 = time.perf_counter()
for i, w in enumerate(wires):
    wait = t0 + i / rate - time.perf_counter()
    if wait > 0:
        time.sleep(wait)
    sent[i] = time.perf_counter()
    s.send(w)
t1 = time.perf_counter()
deadline = t1 + 2.0
while len(got) < n and time.perf_counter() < deadline:
    time.sleep(0.01)
done.set()
t.join()
rtts = [got[i] - sent[i] for i in got if i < n]
print(json.dumps({"sent": n, "answered": len(got), "lost": n - len(got), "send_rate": round(n / (t1 - t0)),
                  "rtts": rtts}))
"""

TCP_CLIENT_PY = """
import json, sys, time
import dns.message, dns.query
server, n = sys.argv[1], int(sys.argv[2])
rtts, lost = [], 0
for i in range(n):
    q = dns.message.make_query("t%d.bench.test" % i, "A")
    t = time.perf_counter()
    try:
        dns.query.tcp(q, server, timeout=2)
        rtts.append(time.perf_counter() - t)
    except Exception:
        lost += 1
print(json.dumps({"rtts": rtts, "lost": lost}))
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


def rate_run(lab: Lab, rate: float, seconds: float, distinct: int) -> dict[str, Any]:
    out = subprocess.run(["ip", "netns", "exec", lab.pods["app/client"].netns, sys.executable, "-c", RATE_CLIENT_PY,
                          SERVER, str(rate), str(seconds), str(distinct)], capture_output=True, text=True,
                         check=True).stdout
    r = json.loads(out)
    return {"rate": rate, "sent": r["sent"], "answered": r["answered"], "lost": r["lost"],
            "send_rate": r["send_rate"], "rtt_p50_ms": round(pct(r["rtts"], 0.5), 3),
            "rtt_p99_ms": round(pct(r["rtts"], 0.99), 3)}


def tcp_run(lab: Lab, queries: int) -> dict[str, Any]:
    out = subprocess.run(["ip", "netns", "exec", lab.pods["app/client"].netns, sys.executable, "-c", TCP_CLIENT_PY,
                          SERVER, str(queries)], capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    return {"tcp": True, "queries": queries, "lost": r["lost"], "rtt_p50_ms": round(pct(r["rtts"], 0.5), 3),
            "rtt_p99_ms": round(pct(r["rtts"], 0.99), 3)}


def hold_figures(hold: Hold) -> dict[str, Any]:
    lat = list(hold.latencies)
    if not lat:
        return {"held": 0}
    return {"hold_p50_ms": round(pct(lat, 0.5), 3), "hold_p99_ms": round(pct(lat, 0.99), 3),
            "hold_max_ms": round(max(lat) * 1000, 3), "held": len(lat),
            "hold_mean_ms": round(statistics.fmean(lat) * 1000, 3)}


def run(queries: int, thread_counts: list[int], rate: float = 0, seconds: float = 10,
        tcp_queries: int = 0) -> list[dict[str, Any]]:
    rows = []
    rules = [DomainRule("r", (parse_domain("*.bench.test", "f"),))]
    with Lab() as lab:
        lab.add_pod("app/client", [CLIENT])
        server = lab.add_pod("dns/server", [SERVER])
        start_dns_server(lab, server.netns, SERVER_PY)
        for threads in thread_counts:
            rows.append({"hold": False, "threads": threads, **client_run(lab, queries, threads)})
        if rate:
            rows.append({"hold": False, **rate_run(lab, rate, seconds, 1 << 16)})
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
                rows.append({**row, **hold_figures(hold)})
            if rate:
                hold.latencies.clear()
                row = {"hold": True, **rate_run(lab, rate, seconds, 1 << 16)}
                rows.append({**row, **hold_figures(hold)})
            if tcp_queries:
                hold.latencies.clear()
                rows.append({"hold": True, **tcp_run(lab, tcp_queries), **hold_figures(hold),
                             "tcp_segments_held": hold.stats["held_tcp"]})
            rows.append({"learned_entries": len(table[0])})
        finally:
            pool.submit(hold.close).result()
            pool.shutdown()
    return rows


def bucket_quantile(buckets: dict[str, int], q: float) -> float | None:
    """The upper bound (ms) of the histogram bucket holding quantile q."""
    total = buckets.get("+Inf", 0)
    if not total:
        return None
    for le, count in sorted(((float(k), v) for k, v in buckets.items()), key=lambda x: x[0]):
        if count >= q * total:
            return le * 1000
    return None


def agent_run(dataplane: str, queries: int, rate: float = 0, seconds: float = 10,
              distinct: int = 200) -> list[dict[str, Any]]:
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
        start_dns_server(lab, server.netns, BY_NAME_SERVER_PY if rate else UNIQUE_SERVER_PY)
        write(Path(tmp) / "src", docs)
        lab.spawn_agent("run", "--source", str(Path(tmp) / "src"), "--node", "n1", "--dataplane", dataplane,
                        "--state-dir", "", "--metrics-address", "127.0.0.1:9755", "--dns-egress")
        assert until(lambda: lab.http_get("http://127.0.0.1:9755/readyz")[0] == 200, 120), "agent never ready"
        def metrics() -> dict[str, float]:
            text = lab.http_get("http://127.0.0.1:9755/metrics")[1]
            return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                             if line.startswith("stockade_dns_"))}

        rows: list[dict[str, Any]] = []
        before: dict[str, float] = {}
        if rate:  # learning: each of the `distinct` names once (each a new address), then steady
            learning = {"agent": dataplane, "phase": "learning", **rate_run(lab, rate, distinct / rate, distinct)}
            rows.append(hold_row(learning, metrics(), before))
            before = metrics()
            row: dict[str, Any] = {"agent": dataplane, "phase": "steady", "distinct": distinct,
                                   **rate_run(lab, rate, seconds, distinct)}
        else:
            row = {"agent": dataplane, **client_run(lab, queries, 1)}
        rows.append(hold_row(row, metrics(), before))
        return rows


def hold_row(row: dict[str, Any], m: dict[str, float], before: dict[str, float]) -> dict[str, Any]:
    """`row` with the agent's hold figures from /metrics `m`, counted since `before`."""
    def d(k: str) -> float:
        return m.get(k, 0.0) - before.get(k, 0.0)

    n, total = d("stockade_dns_hold_seconds_count"), d("stockade_dns_hold_seconds_sum")
    buckets = {k.split('le="')[1].rstrip('"}'): int(d(k)) for k in m
               if k.startswith("stockade_dns_hold_seconds_bucket")}
    return {**row, "held": int(n), "kernel_updates": int(d("stockade_dns_kernel_updates_total")),
            "hold_mean_ms": round(total / n * 1000, 3) if n else None,
            "learned_entries": int(m["stockade_dns_learned_entries"]), "hold_buckets": buckets,
            "hold_p50_ms_le": bucket_quantile(buckets, 0.5), "hold_p99_ms_le": bucket_quantile(buckets, 0.99)}


def bench(dataplanes: list[str], quick: bool, log: Any) -> dict[str, Any]:
    """`make bench`'s DNS figures: the hold alone at 1,000 UDP answers/s and over TCP, then the
    whole agent per dataplane learning `distinct` names at that rate and refreshing them."""
    seconds, distinct, tcp = (3.0, 100, 50) if quick else (10.0, 200, 300)
    log(f"dns hold: 1,000 answers/s for {seconds:.0f} s, {tcp} TCP queries; agent: {dataplanes}")
    out: dict[str, Any] = {"hold": run(0, [], 1000, seconds, tcp), "agent": []}
    for dp in dataplanes:
        out["agent"] += agent_run(dp, 0, 1000, seconds, distinct)
    return out


def table(res: dict[str, Any]) -> str:
    """The DNS rows: answers sent/lost and hold latency beside the issue's targets."""
    def ms(x: Any) -> str:
        return "-" if x is None else f"{x:.2f}"

    def per_s(r: dict[str, Any]) -> str:  # answers/s: the paced rate reached, or closed-loop throughput
        v = r.get("answers_per_s", r.get("send_rate") if r.get("answered") == r.get("sent") else None)
        return "-" if v is None else str(v)

    lines = ["DNS hold (targets: p50 <= 1 ms, p99 <= 5 ms, 1,000 answers/s with none lost)",
             f"{'run':34} {'answers':>8} {'lost':>6} {'per s':>6} {'p50 ms':>8} {'p99 ms':>8} {'kernel upd':>10}"]
    for r in res.get("hold", []):
        if not r.get("hold"):
            continue
        name = "hold alone, TCP" if "tcp_segments_held" in r else "hold alone, UDP"
        lines.append(f"{name:34} {r.get('sent', r.get('queries', '-')):>8} {r.get('lost', '-'):>6} "
                     f"{per_s(r):>6} {ms(r.get('hold_p50_ms')):>8} {ms(r.get('hold_p99_ms')):>8} {'-':>10}")
    for r in res.get("agent", []):
        name = f"agent {r['agent']}, {r.get('phase', '')}"
        lines.append(f"{name:34} {r.get('sent', r.get('held', '-')):>8} {r.get('lost', '-'):>6} "
                     f"{per_s(r):>6} {'<=' + ms(r.get('hold_p50_ms_le')):>8} {'<=' + ms(r.get('hold_p99_ms_le')):>8} "
                     f"{r.get('kernel_updates', '-'):>10}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--json")
    ap.add_argument("--agent", help="dataplanes to run the whole agent on (comma-separated)")
    ap.add_argument("--rate", type=float, default=0, help="open loop: UDP queries per second")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--distinct", type=int, default=200, help="with --agent --rate: names (addresses) cycled")
    ap.add_argument("--tcp-queries", type=int, default=0)
    a = ap.parse_args()
    if a.agent:
        rows = [r for d in a.agent.split(",") for r in agent_run(d, a.queries, a.rate, a.seconds, a.distinct)]
    else:
        threads = [int(t) for t in a.threads.split(",") if t]
        rows = run(a.queries, threads, a.rate, a.seconds, a.tcp_queries)
    for r in rows:
        print(json.dumps(r))
    print(table({"agent": rows} if a.agent else {"hold": rows}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
