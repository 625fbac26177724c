"""Lab plumbing for the reliability runs: the four lab pods, the agent under test (started,
SIGKILLed, restarted), its metrics read from inside the node namespace, and a prober that
records every probe's outcome with its time window."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.kit import Lab, netns
from tests.kit.reliability.world import CHECKS, LAB_PODS, NODE, Verdicts, cross_mixture

METRICS = "127.0.0.1:9754"


def build_lab(lab: Lab) -> None:
    for key, (ip, _, _) in LAB_PODS.items():
        lab.add_pod(key, [ip], ports=(80, 81))


_WALL = time.time() - time.monotonic()


def wall(t: float) -> str:
    """A monotonic time as the wall-clock time the agent's log lines carry."""
    return time.strftime("%H:%M:%S", time.localtime(t + _WALL)) + f".{int((t + _WALL) % 1 * 1000):03d}"


def probe_specs() -> dict[str, list[str]]:
    return {s: [f"{proto.lower()}:{LAB_PODS[d][0]}:{port}" for d in LAB_PODS if d != s for proto, port in CHECKS]
            for s in LAB_PODS}


_BY_IP = {ip: k for k, (ip, _, _) in LAB_PODS.items()}


def decode(src: str, spec: str) -> tuple[str, str, str, int]:
    proto, ip, port = spec.split(":")
    return src, _BY_IP[ip], proto, int(port)


def probe_round(lab: Lab, timeout: float = 0.3) -> Verdicts:
    out: Verdicts = {}
    for src, res in lab.probe_many(probe_specs(), timeout=timeout).items():
        for spec, ok in res.items():
            out[decode(src, spec)] = ok
    return out


def disagreements(seen: Verdicts, want: Verdicts) -> list[str]:
    return [f"{s}->{d} {p}/{n}: kernel {'allow' if ok else 'deny'}, matrix {'allow' if want[(s, d, p, n)] else 'deny'}"
            for (s, d, p, n), ok in sorted(seen.items()) if ok != want[(s, d, p, n)]]


class NodeHttp:
    """HTTP GETs from a thread that lives in the lab's node namespace (no process per call)."""

    def __init__(self, lab: Lab) -> None:
        self.pool = netns.worker(lab.node)

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        def fetch() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://{METRICS}{path}", timeout=timeout) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, ""
            except OSError:
                return 0, ""
        return self.pool.submit(fetch).result()

    def close(self) -> None:
        self.pool.shutdown(wait=False)


_SYNCS = re.compile(r'^stockade_syncs_total\{result="success"\} ([0-9.e+]+)$', re.M)


@dataclass
class Agent:
    """`stockade run` in the node namespace, restartable; every incarnation's output kept."""

    lab: Lab
    src: Path
    state: Path
    dataplane: str
    http: NodeHttp
    proc: subprocess.Popen | None = None
    incarnations: list[subprocess.Popen] = field(default_factory=list)
    restarts: int = 0

    def start(self) -> None:
        self.proc = self.lab.spawn_agent(
            "run", "--source", str(self.src), "--node", NODE, "--dataplane", self.dataplane,
            "--state-dir", str(self.state), "--metrics-address", METRICS)
        self.incarnations.append(self.proc)

    def kill(self) -> None:
        """SIGKILL: no handler runs, whatever the agent is doing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()
        self.restarts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def syncs(self) -> int:
        code, body = self.http.get("/metrics")
        if code != 200:
            return -1
        m = _SYNCS.search(body)
        return int(float(m.group(1))) if m else 0

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Until /readyz answers 200 (the first sync is in the kernel); returns the time."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive():
                raise RuntimeError(f"agent exited: {self.output()[-2000:]}")
            if self.http.get("/readyz", timeout=1.0)[0] == 200:
                return time.monotonic()
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"agent not ready after {timeout}s: {self.output()[-3000:]}")

    def wait_synced(self, before: int, settle: float = 0.25, timeout: float = 30.0) -> None:
        """Until a sync after `before` succeeded and no further sync came for `settle` s."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            now = self.syncs()
            if now > before:
                time.sleep(settle)
                if self.syncs() == now:
                    return
            else:
                time.sleep(0.03)
        raise RuntimeError(f"agent did not sync within {timeout}s (alive: {self.alive()}): {self.output()[-3000:]}")

    def output(self) -> str:
        return "".join(self.lab.agent_output(p) for p in self.incarnations)


@dataclass
class Probe:
    start: float
    end: float
    key: tuple[str, str, str, int]
    ok: bool


class Prober:
    """Back-to-back probe rounds (every lab pair, TCP and UDP) in a thread, each outcome kept."""

    def __init__(self, lab: Lab, timeout: float = 0.3) -> None:
        self.lab = lab
        self.timeout = timeout
        self.probes: list[Probe] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                seen = probe_round(self.lab, self.timeout)
            except Exception as e:  # a probe process failing is a harness fault: report it
                self.errors.append(str(e))
                continue
            t1 = time.monotonic()
            self.probes.extend(Probe(t0, t1, k, ok) for k, ok in seen.items())

    @contextlib.contextmanager
    def running(self) -> Iterator[Prober]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


@dataclass
class Window:
    """During [start, end] either verdict set is acceptable; before it `old`, after it `new`."""

    start: float
    end: float
    old: Verdicts
    new: Verdicts
    old_dirs: dict | None = None  # world.per_direction of each side, to tell cross-endpoint mixtures
    new_dirs: dict | None = None


def judge(probes: list[Probe], timeline: list[tuple[float, Verdicts]], windows: list[Window]) -> list[str]:
    """Wrong probes: outcome differs from the policy in force (either one inside a window).
    Inside a window, a wrong outcome that one side's egress combined with the other side's
    ingress explains is marked "cross-endpoint"."""
    wrong = []
    for p in probes:
        acceptable = None
        for w in windows:
            if p.end >= w.start and p.start <= w.end:
                acceptable = {w.old[p.key], w.new[p.key]}
                if p.ok not in acceptable and w.old_dirs and w.new_dirs and \
                        cross_mixture(w.old_dirs, w.new_dirs, p.key, p.ok):
                    s, d, proto, port = p.key
                    wrong.append(f"cross-endpoint: {wall(p.start)}-{wall(p.end)} {s}->{d} {proto}/{port} "
                                 f"{'passed' if p.ok else 'blocked'}")
                    acceptable = None
                    p = None  # counted
                break
        if p is None:
            continue
        if acceptable is None:
            want = timeline[0][1]
            for t, v in timeline:
                if t <= p.start:
                    want = v
            acceptable = {want[p.key]}
        if p.ok not in acceptable:
            s, d, proto, port = p.key
            wrong.append(f"{wall(p.start)}-{wall(p.end)} {s}->{d} {proto}/{port} {'passed' if p.ok else 'blocked'}")
    return wrong
