"""Event latency end to end, by packets: source change -> first packet with the new verdict.

In the namespace lab (tests/kit.Lab): a client and a server pod joined through a node
namespace where `stockade run --source DIR` (the daemon, inotify, the real dataplane)
enforces a synthetic cluster of the selected size (tests/kit/generate.py) plus:

    namespace stk-e2e: pod server (this node, 10.200.0.2, TCP 80 listening),
                       pod client (another node, 10.200.0.1),
                       policy isolate (selects the server: ingress isolated),
                       policy allow (the server's ingress from role=allowed on TCP 80)

Each event is one file renamed into DIR (or deleted), its verdict flipping every time:
- pod_labels: the client's `role` label, allowed <-> blocked;
- pod_ip: the client's IP appears (a new pod IP: allow) / goes (deny);
- policy_added: the allow policy's file added (allow) / removed (deny).

A watcher in the client's namespace (bench.loadgen verdicts) opens a new TCP connection
every millisecond and reports the send time of the first probe of the run with the new
verdict; the latency is that minus the time the file was renamed in (one monotonic clock).
Events are spaced apart so each is isolated (the daemon's debounce is leading-edge).

The floor: the same watcher, the agent stopped (its table left in place, allowing the
client), a one-element set in a table of our own flipped by one libnftables command: what
the kernel, nft's cache of this table and the watcher's resolution cost by themselves.
`--state-file`: the agent keeps its state file (`--state-dir`), as deployed (default:
none, `--state-dir=`); `--keep-established`: the agent runs without strict mode (no
conntrack dump after each sync). Reports figures; never passes or fails on time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.kit import Lab, builders, until
from tests.kit.generate import LOCAL_NODE, generate

ROOT = Path(__file__).resolve().parents[1]
NS = "stk-e2e"
CLIENT_IP, SERVER_IP, PORT = "10.200.0.1", "10.200.0.2", 80
PROBE_INTERVAL, PROBE_GRACE = 0.001, 0.1  # s: one new connection per ms; no answer in 100 ms = dropped
GAP = 0.15  # s between events: more than the daemon's debounce, so every event is isolated
METRICS = "127.0.0.1:9755"
KINDS = ("pod_labels", "pod_ip", "policy_added")
FLOOR_TABLE = "stke2efloor"


def _client(role: str, ip: bool) -> dict[str, Any]:
    body = builders.pod(f"{NS}/client", [CLIENT_IP], {"role": role}, [], nodeName="e2e-remote-node")
    if not ip:
        body["status"] = {"phase": "Pending"}
    return body


def _allow() -> dict[str, Any]:
    return builders.policy(f"{NS}/allow", {
        "podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "allowed"}}}],
                     "ports": [{"protocol": "TCP", "port": PORT}]}]})


class Manifests:
    """The source directory: the synthetic cluster as one JSON List per namespace, and the
    stk-e2e objects one per file, each change written elsewhere and renamed in."""

    def __init__(self, root: Path, size: tuple[int, int], seed: int) -> None:
        self.dir = root / "manifests"
        self.dir.mkdir()
        cl = generate(*size, seed=seed)
        by_ns: dict[str, list[dict[str, Any]]] = {}
        for obj in cl.objects():
            by_ns.setdefault(obj["metadata"].get("namespace") or obj["metadata"]["name"], []).append(obj)
        for name, objs in by_ns.items():
            self.put(f"ns-{name}", {"apiVersion": "v1", "kind": "List", "items": objs})
        self.put("e2e-namespace", builders.ns(NS, team="e2e"))
        self.put("e2e-server", builders.pod(f"{NS}/server", [SERVER_IP], {"app": "server"}, [],
                                            nodeName=LOCAL_NODE))
        self.put("e2e-isolate", builders.policy(f"{NS}/isolate", {
            "podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]}))
        self.put("e2e-client", _client("blocked", ip=True))
        self.put("e2e-allow", _allow())

    def put(self, name: str, body: dict[str, Any]) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self.dir / f"{name}.json")

    def remove(self, name: str) -> None:
        (self.dir / f"{name}.json").unlink()


class Watcher:
    """bench.loadgen verdicts in the client's namespace."""

    def __init__(self, lab: Lab) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.pods[f"{NS}/client"].netns, sys.executable, "-m", "bench.loadgen",
             "verdicts", SERVER_IP, str(PORT), str(PROBE_INTERVAL), str(PROBE_GRACE)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lab.procs.append(self.proc)
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def start(self, want: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(want + "\n")
        self.proc.stdin.flush()
        assert self._line() == "started"

    def first(self) -> float | None:
        """Send time of the first probe with the wanted verdict (None: not within its limit)."""
        out = self._line()
        return None if out == "timeout" or not out else float(out.split()[0])


class Floor:
    """A persistent libnftables process in the node namespace flipping one element."""

    CODE = """
import sys, time, nftables
nft = nftables.Nftables()
setup = sys.argv[1]
rc, _, err = nft.cmd(setup)
print("ready" if rc == 0 else "error " + err.replace(chr(10), " "), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    t0 = time.monotonic()
    rc, _, err = nft.cmd(cmd)
    print(f"{t0:.6f}" if rc == 0 else "error " + err.replace(chr(10), " "), flush=True)
"""

    def __init__(self, lab: Lab) -> None:
        t = f"inet {FLOOR_TABLE}"
        setup = (f"add table {t}\nadd set {t} allowed {{ type ipv4_addr; }}\n"
                 f"add chain {t} forward {{ type filter hook forward priority 10; policy accept; }}\n"
                 f"add rule {t} forward ct state established,related accept\n"
                 f"add rule {t} forward ip daddr {SERVER_IP} tcp dport {PORT} ip saddr != @allowed drop\n")
        self.proc = subprocess.Popen(["ip", "netns", "exec", lab.node, sys.executable, "-c", self.CODE, setup],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lab.procs.append(self.proc)
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def flip(self, allow: bool) -> float:
        op = "add" if allow else "delete"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{op} element inet {FLOOR_TABLE} allowed {{ {CLIENT_IP} }}\n")
        self.proc.stdin.flush()
        out = self._line()
        if out.startswith("error"):
            raise RuntimeError(out)
        return float(out)


def _summary(values: list[float]) -> dict[str, Any]:
    from bench.control import summary

    return summary(values)


def _measure(watcher: Watcher, want: bool, change: Any) -> float | None:
    """One event: the watcher sees the old verdict, `change()` (returns its start time), then
    the first probe with the new verdict."""
    watcher.start("allow" if want else "deny")
    t0 = change()
    first = watcher.first()
    return None if first is None else first - t0


def run_size(size_name: str, size: tuple[int, int], n: int, seed: int, dataplane: str,
             log: Any, state: bool = False, keep_established: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"size": size_name, "dataplane": dataplane, "events_per_kind": n, "state_file": state,
                           "keep_established": keep_established}
    work = Path(tempfile.mkdtemp(prefix="stkbench-e2e-"))
    try:
        with Lab() as lab:
            lab.add_pod(f"{NS}/client", [CLIENT_IP])
            lab.add_pod(f"{NS}/server", [SERVER_IP], ports=(PORT,))
            m = Manifests(work, size, seed)
            t0 = time.monotonic()
            agent = lab.spawn_agent("run", "--source", str(m.dir), "--node", LOCAL_NODE, "--dataplane", dataplane,
                                    f"--state-dir={work / 'state' if state else ''}", "--metrics-address", METRICS,
                                    *(["--keep-established"] if keep_established else []))
            ready = until(lambda: agent.poll() is not None or lab.http_get(f"http://{METRICS}/readyz")[0] == 200,
                          timeout=900, interval=0.5)
            if agent.poll() is not None or not ready:
                return {**out, "error": lab.agent_output(agent)[-1500:]}
            out["start_to_ready_s"] = time.monotonic() - t0
            watcher = Watcher(lab)
            if _measure(watcher, False, time.monotonic) is None:
                return {**out, "error": "the client reaches the server before any event"}
            lat: dict[str, list[float]] = {k: [] for k in KINDS}
            by_dir: dict[str, list[float]] = {f"{k}/{d}": [] for k in KINDS for d in ("allow", "deny")}
            missed = dict.fromkeys(KINDS, 0)

            def event(kind: str, want: bool, write: Any) -> None:
                def change() -> float:
                    t = time.monotonic()
                    write()
                    return t

                dt = _measure(watcher, want, change)
                if dt is None:
                    missed[kind] += 1
                else:
                    lat[kind].append(dt)
                    by_dir[f"{kind}/{'allow' if want else 'deny'}"].append(dt)
                time.sleep(GAP)

            for i in range(n):  # pod_labels: role allowed <-> blocked, verdict with it
                allow = i % 2 == 0
                role = "allowed" if allow else "blocked"
                event("pod_labels", allow, lambda r=role: m.put("e2e-client", _client(r, ip=True)))
            # pod_ip: role allowed; the IP comes (allow) and goes (deny)
            m.put("e2e-client", _client("allowed", ip=False))
            _measure(watcher, False, time.monotonic)
            for i in range(n):
                allow = i % 2 == 0
                event("pod_ip", allow, lambda a=allow: m.put("e2e-client", _client("allowed", ip=a)))
            # policy_added: client allowed with its IP; the allow policy's file goes and comes
            m.put("e2e-client", _client("allowed", ip=True))
            m.remove("e2e-allow")
            _measure(watcher, False, time.monotonic)
            for i in range(n):
                allow = i % 2 == 0
                event("policy_added", allow, (lambda: m.put("e2e-allow", _allow())) if allow
                      else (lambda: m.remove("e2e-allow")))
            out["events"] = {k: {**_summary(v), "missed": missed[k]} for k, v in lat.items()}
            out["by_direction"] = {k: _summary(v) for k, v in by_dir.items()}
            # Leave the client allowed by the agent's table, then stop the agent (its table stays).
            m.put("e2e-allow", _allow())
            _measure(watcher, True, time.monotonic)
            agent.terminate()
            agent.wait(30)
            if dataplane == "nftables":
                floor = Floor(lab)
                _measure(watcher, False, time.monotonic)  # our table: not in the set, dropped
                vals: list[float] = []
                for i in range(n):
                    allow = i % 2 == 0
                    dt = _measure(watcher, allow, lambda a=allow: floor.flip(a))
                    if dt is not None:
                        vals.append(dt)
                    time.sleep(GAP)
                out["floor"] = _summary(vals)
                lab.node_sh("nft", "delete", "table", "inet", FLOOR_TABLE, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = [f"{k} p50 {_ms(v.get('median'))} p99 {_ms(v.get('p99'))} ms (n={v['n']})"
               for k, v in out.get("events", {}).items()]
    log(f"  e2e {dataplane} {size_name}{' (state file)' if state else ''}: {', '.join(figures) or out.get('error')}; "
        f"floor p50 {_ms(out.get('floor', {}).get('median'))} ms")
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def run(dataplanes: list[str], sizes: list[str], n: int | None, seed: int, log: Any,
        state: bool = False, keep_established: bool = False) -> dict[str, Any]:
    from bench.control import size_of
    from tests.kit.privileges import dataplane_env

    res: dict[str, Any] = {}
    for dp in dataplanes:
        for size in sizes:
            count = n if n is not None else EVENTS.get(size, 50)
            log(f"events end to end: {dp} {size} ({count} per kind)")
            # eBPF: a private bpffs (the agent's pins), removed after; the floor is nftables' only
            with dataplane_env(dp, f"bench-e2e-{os.getpid()}-{size}"):
                res[f"{dp}/{size}"] = run_size(size, size_of(size), count, seed, dp, log, state, keep_established)
    return res


# Events per kind by size: >= 200, the count the issue sets its p50/p99 targets over (at 50k
# ~4 minutes with the cold start).
EVENTS = {"1k": 200, "10k": 200, "50k": 200}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1k")
    ap.add_argument("--events", type=int)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dataplanes", default="nftables", help="comma list of nftables,ebpf")
    ap.add_argument("--state-file", action="store_true",
                    help="the agent keeps its state file (--state-dir), as deployed; default: none")
    ap.add_argument("--keep-established", action="store_true",
                    help="the agent does not re-judge established flows after each sync (no conntrack dump)")
    args = ap.parse_args(argv)
    res = run(args.dataplanes.split(","), args.sizes.split(","), args.events, args.seed,
              lambda s: print(s, flush=True), args.state_file, args.keep_established)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
