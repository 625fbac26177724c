"""Cold start and restart -> ready, the real daemon in the namespace lab, both dataplanes.

The lab and source directory are bench/events.py's (`Manifests`: the synthetic cluster of
the selected size plus namespace stk-e2e with a server on this node isolated for ingress
and allowing role=allowed on TCP 80); added here: pod `friend` (another node, role=allowed,
10.200.0.3). The client (role=blocked) must be dropped, the friend let through.

- cold: no table, no pinned maps, no state file (`stockade cleanup`, state dir removed),
  then `stockade run --source DIR ...` started; the figure is process start -> the first
  /readyz 200 (a poller in the node namespace, 5 ms apart, one monotonic clock), then one
  packet probe per client confirms the policy's verdicts. eBPF: the pinned build is
  compiled before the clock starts. A build (bpf/stockade.c compiled with one set of map
  sizes, agent/dataplane/ebpf/builds.py) pins its programs and maps together, so "build
  kept, maps gone" does not exist: after one untimed warm-up run has chosen the sizes,
  each cold run cleans up and compiles that build afresh through the loader
  (`builds.compile_build`: programs pinned, maps pinned empty, no filter attached), which
  the agent then finds and reuses (checked: no other build appears).
- restart: the agent ready, SIGKILL, started again; the figure is start -> /readyz 200
  (everything adopted: the table / pinned maps the killed agent left). Two probers, one
  per client, open a new TCP connection every 5 ms from before the kill until after ready;
  every probe with a verdict other than the policy's is counted (there must be none).

Reports p50 over N runs per figure (default 3; 1 at 50k). Never passes or fails on time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.events import NS, PORT, ROOT, SERVER_IP, Manifests
from tests.kit import Lab, builders, until
from tests.kit.generate import LOCAL_NODE

FRIEND_IP = "10.200.0.3"
METRICS = "127.0.0.1:9756"
READY_LIMIT = 900.0  # s: 50k today takes minutes; a generous deadline, not a figure
RUNS = {"50k": 1}  # runs per figure by size (default: --runs)
PROBE_INTERVAL, PROBE_GRACE = 0.005, 0.2  # s: a probe without an answer in 200 ms = dropped

# Polls /readyz in the node namespace; prints the monotonic time of the first 200.
POLLER = """
import sys, time, urllib.request
url, limit = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + limit
while time.monotonic() < end:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                print(f"{time.monotonic():.6f}", flush=True)
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.005)
print("timeout", flush=True)
"""

def probe_loop(host: str, port: int, interval: float, grace: float) -> None:
    """In a client's namespace (`python -m bench.startup probe HOST PORT INTERVAL GRACE`,
    stdlib only at run time): prints "ready", opens a new TCP connection every `interval`
    (closed with RST) until a line on stdin, then prints one JSON line: probes allowed (the
    connection completed) and denied (refused, or no answer within `grace`), and the send
    times of the first 20 of each. At least one probe, however soon stopped."""
    import errno
    import selectors
    import socket
    import struct

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, float] = {}
    out: dict[str, Any] = {"allowed": 0, "denied": 0, "allowed_at": [], "denied_at": []}

    def done(t: float, ok: bool) -> None:
        k = "allowed" if ok else "denied"
        out[k] += 1
        if len(out[k + "_at"]) < 20:
            out[k + "_at"].append(round(t, 6))

    print("ready", flush=True)
    nxt, sent = time.monotonic(), 0
    while not stop.is_set() or pending or not sent:
        now = time.monotonic()
        if now >= nxt and (not stop.is_set() or not sent):
            sent += 1
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.setblocking(False)
            rc = s.connect_ex((host, port))
            if rc in (0, errno.EINPROGRESS):
                pending[s] = now
                sel.register(s, selectors.EVENT_WRITE)
            else:
                done(now, False)
                s.close()
            nxt = max(nxt + interval, now)
        for key, _ in sel.select(max(0.0, min(nxt - time.monotonic(), interval))):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            done(pending.pop(sock), sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)
            sel.unregister(sock)
            sock.close()
        now = time.monotonic()
        for sock, t in list(pending.items()):
            if now - t > grace:
                done(t, False)
                del pending[sock]
                sel.unregister(sock)
                sock.close()
    print(json.dumps(out), flush=True)


def summary(values: list[float]) -> dict[str, Any]:
    """p50 and range of one figure over its runs (empty: no run reached ready)."""
    return {"n": len(values), "median": statistics.median(values) if values else None,
            "min": min(values, default=None), "max": max(values, default=None)}


def wrong_verdicts(probes: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Probes against the policy: the friend's denied ones, the client's allowed ones."""
    friend, client = probes.get("friend", {}), probes.get("client", {})
    return {"friend_denied": int(friend.get("denied", 0)), "client_allowed": int(client.get("allowed", 0)),
            "total": int(friend.get("allowed", 0)) + int(friend.get("denied", 0))
            + int(client.get("allowed", 0)) + int(client.get("denied", 0))}


class Prober:
    """probe_loop in one pod's namespace, from start() until finish()."""

    def __init__(self, lab: Lab, pod: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.pods[pod].netns, sys.executable, "-m", "bench.startup", "probe", SERVER_IP,
             str(PORT), str(PROBE_INTERVAL), str(PROBE_GRACE)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lab.procs.append(self.proc)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        self.proc.wait(10)
        return json.loads(line) if line.strip() else {"error": "prober died"}


class Node:
    """The agent's node in the lab: start it, time it to /readyz 200, kill it, clean up."""

    def __init__(self, lab: Lab, work: Path, source: Path, dataplane: str) -> None:
        self.lab, self.work, self.source, self.dataplane = lab, work, source, dataplane
        self.agent: subprocess.Popen | None = None
        self.synced = ""  # the agent's last "synced ..." log line when it became ready

    def start(self) -> float:
        """Start the agent; seconds from its process start to /readyz 200 (raises with its
        output when it exits or does not become ready)."""
        poller = subprocess.Popen(["ip", "netns", "exec", self.lab.node, sys.executable, "-c", POLLER,
                                   f"http://{METRICS}/readyz", str(READY_LIMIT)],
                                  stdout=subprocess.PIPE, text=True)
        self.lab.procs.append(poller)
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(poller.stdout.readline().strip()  # type: ignore[union-attr]
                                                            ), daemon=True)
        reader.start()
        t0 = time.monotonic()
        self.agent = self.lab.spawn_agent(
            "run", "--source", str(self.source), "--node", LOCAL_NODE, "--dataplane", self.dataplane,
            f"--state-dir={self.work / 'state'}", "--metrics-address", METRICS)
        until(lambda: got or self.agent.poll() is not None, timeout=READY_LIMIT + 10, interval=0.05)  # type: ignore[union-attr]
        poller.kill()
        poller.wait()
        if not got or got[0] in ("", "timeout"):
            raise RuntimeError(f"agent not ready: {self.lab.agent_output(self.agent)[-1500:]}")
        ready = float(got[0]) - t0
        synced = [x for x in self.lab.agent_output(self.agent).splitlines() if "agent.daemon: synced" in x]
        self.synced = synced[-1].split("agent.daemon: ", 1)[1] if synced else ""
        return ready

    def kill(self) -> None:
        """SIGKILL, as the kernel's OOM killer or a node crash would; reaped."""
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGKILL)
            self.agent.wait(30)
        self.agent = None

    def clean(self) -> None:
        """Nothing left of a previous agent: its table or filters and pins, its state file."""
        self.kill()
        self.lab.stockade("cleanup", "--dataplane", self.dataplane)
        shutil.rmtree(self.work / "state", ignore_errors=True)


def pin_root() -> str:
    from agent.dataplane.ebpf.builds import PIN_ROOT, PIN_ROOT_ENV

    return os.environ.get(PIN_ROOT_ENV, PIN_ROOT)


def verdicts_hold(lab: Lab) -> bool:
    spec = f"tcp:{SERVER_IP}:{PORT}"
    got = lab.probe_many({f"{NS}/friend": [spec], f"{NS}/client": [spec]}, timeout=1.0)
    return got[f"{NS}/friend"][spec] and not got[f"{NS}/client"][spec]


def run_size(size_name: str, size: tuple[int, int], runs: int, seed: int, dataplane: str,
             log: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"size": size_name, "dataplane": dataplane, "runs": runs}
    work = Path(tempfile.mkdtemp(prefix="stkbench-start-"))
    try:
        with Lab() as lab:
            lab.add_pod(f"{NS}/client", ["10.200.0.1"])
            lab.add_pod(f"{NS}/server", [SERVER_IP], ports=(PORT,))
            lab.add_pod(f"{NS}/friend", [FRIEND_IP])
            m = Manifests(work, size, seed)
            m.put("e2e-friend", builders.pod(f"{NS}/friend", [FRIEND_IP], {"role": "allowed"}, [],
                                             nodeName="e2e-remote-node"))
            node = Node(lab, work, m.dir, dataplane)
            try:
                out.update(_cold_and_restart(lab, node, runs, dataplane, log))
            except RuntimeError as e:
                out["error"] = str(e)
            finally:
                node.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log("  " + line(f"{dataplane}/{size_name}", out))
    return out


def _cold_and_restart(lab: Lab, node: Node, runs: int, dataplane: str, log: Any) -> dict[str, Any]:
    res: dict[str, Any] = {}
    build: tuple[str, Any] | None = None
    if dataplane == "ebpf":  # the warm-up: the agent chooses the map sizes and compiles
        from agent.dataplane.ebpf import builds

        node.clean()
        res["warmup_start_to_ready_s"] = node.start()
        found = builds.existing(pin_root())
        if len(found) != 1:
            raise RuntimeError(f"expected one pinned build after the warm-up, found {found}")
        build = found[0]
    cold: list[float] = []
    verdict_ok: list[bool] = []
    for i in range(runs):
        node.clean()
        if build is not None:
            from agent.dataplane.ebpf import builds

            builds.ensure_bpffs(pin_root())
            res.setdefault("compile_s", []).append(
                builds.compile_build(f"{pin_root()}/{build[0]}", build[1], sys.executable)["total_s"])
        cold.append(node.start())
        res.setdefault("cold_syncs", []).append(node.synced)
        verdict_ok.append(verdicts_hold(lab))
        if build is not None:
            from agent.dataplane.ebpf import builds

            res["build_reused"] = res.get("build_reused", True) and [b for b, _ in builds.existing(pin_root())] == [
                build[0]]
        log(f"    cold {i + 1}/{runs}: {cold[-1]:.2f} s, verdicts {'hold' if verdict_ok[-1] else 'WRONG'}")
    res["cold_s"] = summary(cold)
    res["cold_runs_s"] = cold
    res["cold_verdicts_ok"] = all(verdict_ok)
    restart: list[float] = []
    wrong = {"friend_denied": 0, "client_allowed": 0, "total": 0}
    samples: list[dict[str, Any]] = []
    counts: list[dict[str, Any]] = []  # per restart: each prober's allowed / denied
    for i in range(runs):  # the agent from the last cold run (or restart) is ready here
        probers = {"friend": Prober(lab, f"{NS}/friend"), "client": Prober(lab, f"{NS}/client")}
        time.sleep(0.2)  # a few probes against the running agent first
        node.kill()
        try:
            restart.append(node.start())
            res.setdefault("restart_syncs", []).append(node.synced)
        finally:
            time.sleep(0.2)  # and a few after ready
            probes = {k: p.finish() for k, p in probers.items()}
        w = wrong_verdicts(probes)
        counts.append({k: {x: v.get(x) for x in ("allowed", "denied")} for k, v in probes.items()})
        for k in wrong:
            wrong[k] += w[k]
        if w["friend_denied"] or w["client_allowed"]:
            samples.append({k: {x: v.get(x) for x in ("allowed_at", "denied_at")} for k, v in probes.items()})
        ok = verdicts_hold(lab)
        verdict_ok.append(ok)
        log(f"    restart {i + 1}/{runs}: {restart[-1]:.2f} s, probes {w['total']}, wrong "
            f"{w['friend_denied'] + w['client_allowed']}, verdicts {'hold' if ok else 'WRONG'}")
    res["restart_s"] = summary(restart)
    res["restart_runs_s"] = restart
    res["restart_probes"] = wrong
    res["restart_probe_counts"] = counts
    res["restart_verdicts_ok"] = all(verdict_ok[runs:])
    if samples:
        res["wrong_samples"] = samples[:3]
    return res


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def line(key: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"startup {key}: ERROR {r['error'][-300:]}"
    c, s, p = r["cold_s"], r["restart_s"], r["restart_probes"]
    return (f"startup {key}: cold p50 {_s(c['median'])} s [{_s(c['min'])}-{_s(c['max'])}] (n={c['n']}), "
            f"restart p50 {_s(s['median'])} s [{_s(s['min'])}-{_s(s['max'])}] (n={s['n']}), "
            f"wrong probes {p['friend_denied'] + p['client_allowed']}/{p['total']}")


def run(dataplanes: list[str], sizes: list[str], runs: int | None, seed: int, log: Any) -> dict[str, Any]:
    from bench.control import size_of
    from tests.kit.privileges import dataplane_env

    res: dict[str, Any] = {}
    for dp in dataplanes:
        for size in sizes:
            n = runs if runs is not None else RUNS.get(size, 3)
            log(f"startup: {dp} {size} ({n} cold, {n} restarts)")
            # eBPF: a private bpffs (the agent's pins, the build), removed after
            with dataplane_env(dp, f"bench-start-{os.getpid()}-{size}"):
                res[f"{dp}/{size}"] = run_size(size, size_of(size), n, seed, dp, log)
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        probe_loop(argv[1], int(argv[2]), float(argv[3]), float(argv[4]))
        return 0

    ap = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0],
                                 epilog="python -m bench.startup probe HOST PORT INTERVAL GRACE: the probe loop")
    ap.add_argument("--sizes", default="1k", help="comma list of 1k,10k,50k (or PODS/POLICIES)")
    ap.add_argument("--runs", type=int, help="runs per figure (default 3; 1 at 50k)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dataplanes", default="nftables", help="comma list of nftables,ebpf")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench needs root (network namespaces, nftables, eBPF)", file=sys.stderr)
        return 2
    os.chdir(ROOT)
    res = run(args.dataplanes.split(","), args.sizes.split(","), args.runs, args.seed,
              lambda s: print(s, flush=True))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
