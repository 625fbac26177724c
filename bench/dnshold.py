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
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.dns.hold import Hold
from agent.dns.learn import merge, updates
from agent.inventory import IPAddress
from agent.policy.cluster import DomainRule, Learned, parse_domain
from bench.cgroups import Cgroup, LoaderWatch, PeakMeter, proc_kb, settle, spawn_in_cgroup
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



# ------------------------------------------------------------ learned state memory (issue 14)

MEM_NS = "stk-dnsmem"
MEM_METRICS = "127.0.0.1:9757"
MEM_ADDRS = 4  # A records per answer
# hN.bench.test -> 4 addresses of its own (10.100.0.0/16: 16,384 names), TTL 1 h: nothing expires in a run
MANY_SERVER_PY = SERVER_TEMPLATE.replace(
    '30, "IN", "A", {addr}',
    f'3600, "IN", "A", *["10.100.%d.%d" % divmod({MEM_ADDRS} * int(n.labels[0][1:]) + k, 256) '
    f'for k in range({MEM_ADDRS})]')

# closed loop: names h<first>..h<first+count-1>, T threads, a query retried on a time-out
MEM_CLIENT_PY = """
import json, sys, threading
import dns.message, dns.query, dns.exception
server, first, count, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
answered, timeouts = [0] * threads, [0] * threads
def run(k):
    for i in range(first + k, first + count, threads):
        q = dns.message.make_query("h%d.bench.test" % i, "A")
        for _ in range(5):
            try:
                dns.query.udp(q, server, timeout=5)
                answered[k] += 1
                break
            except dns.exception.Timeout:
                timeouts[k] += 1
ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"answered": sum(answered), "timeouts": sum(timeouts)}))
"""


def _kernel_learned(lab: Lab, dataplane: str) -> dict[str, int]:
    """What the kernel holds of the learned addresses: nftables elements of the l4_/l6_
    sets (and how many such sets), or eBPF `learned` map entries."""
    if dataplane == "ebpf":
        from agent.dataplane.ebpf import bpfsys, builds

        root = os.environ.get(builds.PIN_ROOT_ENV, builds.PIN_ROOT)
        found = builds.existing(root)
        m = bpfsys.Map.pinned(f"{root}/{found[0][0]}/learned")
        try:
            return {"map_entries": m.count(), "map_capacity": m.max_entries, "builds": len(found)}
        finally:
            m.close()
    terse = lab.node_sh("nft", "-t", "list", "sets", "inet").stdout
    names = [w for line in terse.splitlines() if line.strip().startswith("set ")
             for w in [line.split()[1]] if w.startswith(("l4_", "l6_"))]
    elements = 0
    for name in names:
        js = json.loads(lab.node_sh("nft", "-j", "list", "set", "inet", "stockade", name).stdout)
        for obj in js["nftables"]:
            elements += len(obj.get("set", {}).get("elem", []))
    return {"set_elements": elements, "learned_sets": len(names)}


def _manifests(root: Any, size: str, seed: int, extra: list[dict[str, Any]]) -> Any:
    """The synthetic cluster of `size` ("" for none) as one JSON List per namespace, plus `extra`."""
    from tests.kit.generate import SIZES, generate

    d = root / "manifests"
    d.mkdir()
    objs = generate(*SIZES[size], seed=seed).objects() if size else []
    by_ns: dict[str, list[dict[str, Any]]] = {}
    for obj in [*objs, *extra]:
        by_ns.setdefault(obj["metadata"].get("namespace") or obj["metadata"]["name"], []).append(obj)
    for name, items in by_ns.items():
        (d / f"ns-{name}.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return d


def _spawn_in_cgroup(lab: Lab, cg: Any, args: list[str]) -> subprocess.Popen:
    """`stockade <args>` in the node namespace as a member of `cg` from its first
    instruction, its output kept as the lab's agent output."""
    fd, name = tempfile.mkstemp(prefix=f"{lab.prefix}-agent-", suffix=".log")
    try:
        proc = spawn_in_cgroup(cg, ["ip", "netns", "exec", lab.node, sys.executable, "-m", "agent.cli", *args], fd)
    finally:
        os.close(fd)
    lab.procs.append(proc)
    lab.logs[proc.pid] = Path(name)
    return proc


def learned_memory(dataplane: str, size: str = "10k", pods: int = 10, names: int = 10_000, seed: int = 1,
                   log: Any = print, refresh: bool = True) -> dict[str, Any]:
    """The agent's memory as its cgroup counts it (agent + children), `stockade run
    --dns-egress` over the synthetic cluster of `size`, before and after `pods` local pods
    with a `*.bench.test` domainNames rule were answered `names` distinct names (each pod
    its own slice), 4 A records each; with the learner's table size and the kernel's
    learned elements after; `refresh`: then the same names once more (`after_refresh`:
    whether memory follows the answers or the entries). eBPF: its build compiled
    beforehand (as bench.memory)."""
    from tests.kit import stop, until
    from tests.kit.builders import ns, pod
    from tests.kit.generate import LOCAL_NODE
    from tests.kit.privileges import dataplane_env

    mb = 1 << 20
    per_pod = -(-names // pods)
    want = names * MEM_ADDRS
    out: dict[str, Any] = {"dataplane": dataplane, "size": size or "none", "pods": pods, "names": names,
                           "addresses_per_name": MEM_ADDRS, "learned_wanted": want}
    if per_pod * MEM_ADDRS > 4096:
        out["note"] = f"{per_pod * MEM_ADDRS} entries per pod exceed MAX_PER_POD: the cap evicts"
    clients = {f"{MEM_NS}/c{j}": f"10.35.{j // 250}.{1 + j % 250}" for j in range(pods)}
    cnp = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": "stk-dnsmem-names"},
           "spec": {"tier": "Admin", "priority": 999,
                    "subject": {"namespaces": {"matchLabels": {"team": "stk-dnsmem"}}},
                    "egress": [{"action": "Accept", "to": [{"domainNames": ["*.bench.test"]}],
                                "protocols": [{"tcp": {"destinationPort": {"number": 443}}}]}]}}
    extra = [ns(MEM_NS, team="stk-dnsmem"), pod(f"{MEM_NS}/server", [SERVER], nodeName="stk-dnsmem-remote"), cnp,
             *(pod(k, [ip], nodeName=LOCAL_NODE) for k, ip in clients.items())]
    work = Path(tempfile.mkdtemp(prefix="stkbench-dnsmem-"))
    args = ["run", "--source", str(work / "manifests"), "--node", LOCAL_NODE, "--dataplane", dataplane,
            "--state-dir", "", "--metrics-address", MEM_METRICS, "--dns-egress"]
    t_start = time.monotonic()
    try:
        with dataplane_env(dataplane, f"bench-dnsmem-{dataplane}"), Lab() as lab:
            for k, ip in clients.items():
                lab.add_pod(k, [ip])
            server = lab.add_pod(f"{MEM_NS}/server", [SERVER])
            start_dns_server(lab, server.netns, MANY_SERVER_PY)
            _manifests(work, size, seed, extra)

            def ready() -> bool:
                return lab.http_get(f"http://{MEM_METRICS}/readyz")[0] == 200

            if dataplane == "ebpf":  # warm-up: the agent chooses its map sizes and compiles; then
                from agent.dataplane.ebpf import builds  # a clean slate with that build compiled

                warm = lab.spawn_agent(*args)
                if not until(lambda: ready() or warm.poll() is not None, 900, 0.5) or warm.poll() is not None:
                    raise RuntimeError(f"warm-up agent never ready: {lab.agent_output(warm)[-1500:]}")
                stop(warm)
                root = os.environ[builds.PIN_ROOT_ENV]
                (build, sizes), = builds.existing(root)
                lab.stockade("cleanup", "--dataplane", dataplane)
                builds.ensure_bpffs(root)
                builds.compile_build(f"{root}/{build}", sizes, sys.executable)
            with Cgroup(f"dnsmem-{dataplane}") as cg:
                out["cgroup"] = f"v{cg.version}"
                meter = PeakMeter(cg)
                try:
                    meter.reset()
                    watch = LoaderWatch(cg, meter)
                    t0 = time.monotonic()
                    agent = _spawn_in_cgroup(lab, cg, args)
                    ok = until(lambda: ready() or agent.poll() is not None, 900, 0.5)
                    watch.stop()
                    if not ok or agent.poll() is not None:
                        raise RuntimeError(f"agent never ready: {lab.agent_output(agent)[-1500:]}")
                    out["start_to_ready_s"] = round(time.monotonic() - t0, 1)
                    # "before" once the agent served /metrics (its first scrape at 10k costs
                    # ~30 MB: nft's counters) and its RSS is steady: both sides then include it
                    _learned(lab)
                    out["settle_s"] = settle(agent.pid)
                    out["bcc_loaders"] = watch.loaders
                    out["loader_peak_mb"] = round(watch.loader_peak / mb, 1)
                    out["start_peak_mb"] = round(meter.peak() / mb, 1)  # to settled, bcc's loader apart
                    meter.reset()
                    out["before"] = {"cgroup_mb": round(cg.current() / mb, 1), **_rss(agent.pid),
                                     "learned_entries": _learned(lab), **_kernel_learned(lab, dataplane)}
                    t1 = time.monotonic()

                    def ask() -> None:  # every pod its slice of the names, in parallel
                        runs = [subprocess.Popen(["ip", "netns", "exec", lab.pods[k].netns, sys.executable, "-c",
                                                  MEM_CLIENT_PY, SERVER, str(j * per_pod),
                                                  str(min(per_pod, names - j * per_pod)), "4"],
                                                 stdout=subprocess.PIPE, text=True)
                                for j, k in enumerate(clients)]
                        got = [json.loads(p.communicate()[0]) for p in runs]
                        out["answered"] = out.get("answered", 0) + sum(g["answered"] for g in got)
                        out["timeouts"] = out.get("timeouts", 0) + sum(g["timeouts"] for g in got)

                    ask()
                    until(lambda: _learned(lab) >= want, 60, 0.5)
                    out["learning_s"] = round(time.monotonic() - t1, 1)
                    out["after"] = {"cgroup_mb": round(cg.current() / mb, 1), **_rss(agent.pid),
                                    "learned_entries": _learned(lab), **_kernel_learned(lab, dataplane)}
                    out["learning_peak_mb"] = round(meter.peak() / mb, 1)
                    if refresh:  # the same names again: no new entry, each a later expiry
                        ask()
                        out["after_refresh"] = {"cgroup_mb": round(cg.current() / mb, 1), **_rss(agent.pid),
                                                "learned_entries": _learned(lab)}
                        out["learning_peak_mb"] = round(meter.peak() / mb, 1)
                    out["peak_mb"] = max(out["start_peak_mb"], out["learning_peak_mb"])
                    b, a = out["before"], out["after"]
                    n = max(1, a["learned_entries"] - b["learned_entries"])
                    out["increment"] = {"cgroup_mb": round(a["cgroup_mb"] - b["cgroup_mb"], 1),
                                        "rss_mb": round(a["rss_mb"] - b["rss_mb"], 1),
                                        "cgroup_bytes_per_entry": round((a["cgroup_mb"] - b["cgroup_mb"]) * mb / n),
                                        "rss_bytes_per_entry": round((a["rss_mb"] - b["rss_mb"]) * mb / n)}
                    stop(agent)
                finally:
                    meter.close()
    except Exception as e:  # a report, not a verdict: the error is the figure
        out["error"] = f"{type(e).__name__}: {e}"[-1500:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    log(f"dns learned memory: {dataplane} {size or 'no cluster'}: {memory_line(out)}")
    return out


def _rss(pid: int) -> dict[str, float]:
    kb = proc_kb(pid)
    return {"rss_mb": round(kb["VmRSS"] / 1024, 1), "hwm_mb": round(kb["VmHWM"] / 1024, 1)}


def _learned(lab: Lab) -> int:
    text = lab.http_get(f"http://{MEM_METRICS}/metrics")[1]
    for line in text.splitlines():
        if line.startswith("stockade_dns_learned_entries "):
            return int(float(line.split()[1]))
    return -1


def memory_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return "error: " + r["error"][-300:]
    b, a, i = r["before"], r["after"], r["increment"]
    kernel = (f"{a['set_elements']} set elements in {a['learned_sets']} sets" if "set_elements" in a
              else f"{a['map_entries']}/{a['map_capacity']} learned map entries")
    return (f"peak {r['peak_mb']} MB (start {r['start_peak_mb']}, learning {r['learning_peak_mb']}; bcc loader "
            f"{r['loader_peak_mb']}); cgroup {b['cgroup_mb']} -> {a['cgroup_mb']} MB, agent RSS {b['rss_mb']} -> "
            f"{a['rss_mb']} MB ({i['cgroup_bytes_per_entry']} / {i['rss_bytes_per_entry']} B per entry); "
            f"learner {a['learned_entries']}, kernel {kernel}; {r['answered']} answers, the first "
            f"{r['learned_wanted'] // MEM_ADDRS} in {r['learning_s']} s"
            + (f"; after the same names again: cgroup {r['after_refresh']['cgroup_mb']} MB, RSS "
               f"{r['after_refresh']['rss_mb']} MB" if "after_refresh" in r else ""))


def memory_table(rows: list[dict[str, Any]]) -> str:
    """The learned-state rows beside issue 17's 150 MB (10k) target."""
    head = (f"{'dataplane/size':18} {'peak MB':>8} {'start':>6} {'learn':>6} {'cg before':>9} {'cg after':>8} "
            f"{'rss bef':>7} {'rss aft':>7} {'B/entry cg':>10} {'B/entry rss':>11} {'learner':>7} {'kernel':>7}")
    lines = [f"DNS learned state (names x {MEM_ADDRS} addresses; cgroup = agent + children, bcc's loader apart; "
             "target at 10k: <= 150 MB)", head]
    for r in rows:
        key = f"{r['dataplane']}/{r['size']}"
        if "error" in r:
            lines.append(f"{key:18} ERROR: {r['error'].splitlines()[-1][:100]}")
            continue
        b, a, i = r["before"], r["after"], r["increment"]
        kernel = a.get("set_elements", a.get("map_entries"))
        lines.append(f"{key:18} {r['peak_mb']:>8} {r['start_peak_mb']:>6} {r['learning_peak_mb']:>6} "
                     f"{b['cgroup_mb']:>9} {a['cgroup_mb']:>8} {b['rss_mb']:>7} {a['rss_mb']:>7} "
                     f"{i['cgroup_bytes_per_entry']:>10} {i['rss_bytes_per_entry']:>11} {a['learned_entries']:>7} "
                     f"{kernel:>7}")
    return "\n".join(lines)


def memory_bench(dataplanes: list[str], quick: bool, log: Any) -> list[dict[str, Any]]:
    """`make bench`'s learned-state figures: 10k names x 4 addresses over 10 pods, with the
    10k cluster (quick: 1,000 names, the 1k cluster)."""
    size, names = ("1k", 1000) if quick else ("10k", 10_000)
    log(f"dns learned memory: {names} names x {MEM_ADDRS} addresses, {size} cluster, {dataplanes}")
    return [learned_memory(dp, size, 10, names, log=log) for dp in dataplanes]


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
    ap.add_argument("--memory", help="dataplanes: the learned state's memory (--size, --pods, --names)")
    ap.add_argument("--size", default="10k", help="with --memory: the synthetic cluster (1k, 10k, 50k; none)")
    ap.add_argument("--pods", type=int, default=10, help="with --memory: local pods the names are spread over")
    ap.add_argument("--names", type=int, default=10_000, help="with --memory: distinct names (4 addresses each)")
    a = ap.parse_args()
    if a.memory:
        size = "" if a.size == "none" else a.size
        res = [learned_memory(d, size, a.pods, a.names) for d in a.memory.split(",")]
        print(memory_table(res))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return
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
