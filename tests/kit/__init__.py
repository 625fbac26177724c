"""The test kit: every helper the tests and the benchmarks share (they import helpers from
here only; no test module imports another, and nothing here imports a test module).

This module is the namespace lab: one "node" network namespace with no route off the
machine, and one namespace per pod joined to it by a veth pair with /32 and /128 routes;
plus `sh`, `probe_from`, and the one poll-with-a-deadline `until` (`seconds_until`,
`expect`). Every test that sends packets uses this one lab. Packets never leave the lab's
namespaces; the agent and nft/tc run inside the node namespace; `close()` removes
everything even after a failure.

Beside it: builders (manifests, `snapshot_of`), netbird_model (NetBird API objects),
fuzz_kubernetes / fuzz_netbird (hypothesis strategies and checks), generate (the seeded
benchmark clusters), kubeapi / netbird_api (fake API servers), netns (the one setns
helper), nftns (a throwaway namespace to load nft text into, and a table reader),
netprobe / tunrelay (processes run in lab namespaces), netbird_lab, kubernetes_lab,
enforcement, ebpf_lab, netbird_env (lab set-ups and scenarios more than one suite runs),
cases (upstream NetworkPolicy cases), kustomize / manifests (deploy/ rendered), sandbox (the
systemd unit's confinement), privileges (root, bpffs, dataplane environment), recording (a
dataplane that records), cnp_cases (the ClusterNetworkPolicy conformance data), planes (a
dataplane in the lab's node namespace, probes vs the simulator), dns_lab (the DNS egress lab),
dns_fakes (a fake hold, a domainNames policy and DNS answers for the learner's unit tests),
hostile_agent / hostile_files (hostile input), reliability/ (the
soak run), demo (`make demo`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[2]
NETPROBE = Path(__file__).with_name("netprobe.py")
GATEWAY4 = "169.254.1.1"
GATEWAY6 = "fe80::1"
_counter = itertools.count()
T = TypeVar("T")


def sh(*args: str, check: bool = True, ns: str | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def probe_from(
    netns: dict[str, str], targets: Mapping[str, Sequence[str]], timeout: float
) -> dict[str, dict[str, bool]]:
    """Run netprobe from each source's namespace at once; source -> spec -> got a reply."""
    running = {
        src: subprocess.Popen(
            ["ip", "netns", "exec", netns[src], sys.executable, str(NETPROBE), "probe", str(timeout), *specs],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for src, specs in targets.items() if specs
    }
    out = {}
    for src, proc in running.items():
        stdout, stderr = proc.communicate(timeout=timeout * 5 + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"probe from {src} failed: {stderr}")
        out[src] = json.loads(stdout)
    return out


def stop(proc: subprocess.Popen) -> None:
    """Kill `proc` if it still runs and reap it (a process stuck in the kernel is left after 5 s)."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def until(cond: Callable[[], T], timeout: float = 8.0, interval: float = 0.1) -> T:
    """Poll `cond` until it answers something true, or `timeout` seconds pass; returns
    that answer (or, on time-out, its last, false, one). The one poll-with-a-deadline."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := cond():
            return value
        time.sleep(interval)
    return cond()


def seconds_until(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> float | None:
    """How long `cond` took to hold, or None if it did not within `timeout` seconds."""
    start = time.monotonic()
    return time.monotonic() - start if until(cond, timeout, interval) else None


def expect(cond: Callable[[], T], timeout: float = 10.0, what: str = "condition", interval: float = 0.01) -> T:
    """until(), failing the test on time-out."""
    value = until(cond, timeout, interval)
    if not value:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
    return value


@dataclass
class Pod:
    key: str  # "ns/name"
    netns: str
    host_if: str  # host-side veth in the node namespace
    ips: list[str]
    server: subprocess.Popen | None = None


@dataclass
class Connection:
    proc: subprocess.Popen

    def ping(self) -> bool:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("ping\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip() == "ok"


@dataclass
class Lab:
    prefix: str = field(default_factory=lambda: f"stk{os.getpid()}x{next(_counter)}")
    pods: dict[str, Pod] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: dict[int, Path] = field(default_factory=dict)  # agent pid -> its output file

    @property
    def node(self) -> str:
        return f"{self.prefix}-node"

    def __enter__(self) -> Lab:
        sh("ip", "netns", "add", self.node)
        try:
            self.node_sh("ip", "link", "set", "lo", "up")
            for key, val in (
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ):
                self.node_sh("sysctl", "-qw", f"{key}={val}")
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def node_sh(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return sh(*args, check=check, ns=self.node, **kw)

    def add_pod(self, key: str, ips: Sequence[str], ports: Iterable[int] = (80, 81)) -> Pod:
        idx = len(self.pods)
        netns = f"{self.prefix}-p{idx}"
        host_if = f"v{idx}"
        sh("ip", "netns", "add", netns)
        pod = Pod(key, netns, host_if, list(ips))
        self.pods[key] = pod
        sh("ip", "link", "add", host_if, "netns", self.node, "type", "veth",
           "peer", "name", "eth0", "netns", netns)
        n, p = self.node_sh, lambda *a: sh(*a, ns=netns)
        n("sysctl", "-qw", f"net.ipv4.conf.{host_if}.rp_filter=0")
        n("ip", "addr", "add", f"{GATEWAY4}/32", "dev", host_if)
        n("ip", "-6", "addr", "add", f"{GATEWAY6}/64", "dev", host_if, "nodad")
        n("ip", "link", "set", host_if, "up")
        p("ip", "link", "set", "lo", "up")
        p("ip", "link", "set", "eth0", "up")
        p("ip", "route", "add", GATEWAY4, "dev", "eth0")
        p("ip", "route", "add", "default", "via", GATEWAY4, "dev", "eth0")
        p("ip", "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0")
        for ip in ips:
            v6 = ipaddress.ip_address(ip).version == 6
            plen = "128" if v6 else "32"
            p("ip", *(["-6"] if v6 else []), "addr", "add", f"{ip}/{plen}", "dev", "eth0",
              *(["nodad"] if v6 else []))
            n("ip", *(["-6"] if v6 else []), "route", "add", f"{ip}/{plen}", "dev", host_if)
        pod.server = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, str(NETPROBE), "serve", *map(str, ports)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.procs.append(pod.server)
        if pod.server.stdout is None or pod.server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"server in {key} did not start")
        return pod

    def probe_many(
        self, targets: dict[str, list[str]], timeout: float = 1.0
    ) -> dict[str, dict[str, bool]]:
        """targets: source pod -> specs "proto:addr:port"; all sources probe concurrently."""
        return probe_from({src: self.pods[src].netns for src in targets}, targets, timeout)

    def reachable(self, src: str, dst_ip: str, port: int, proto: str = "tcp",
                  timeout: float = 1.0) -> bool:
        spec = f"{proto}:{dst_ip}:{port}"
        return self.probe_many({src: [spec]}, timeout)[src][spec]

    def serve_on_node(self, ports: Iterable[int]) -> None:
        """Servers in the node namespace itself (for pod -> node traffic)."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.node, sys.executable, str(NETPROBE), "serve", *map(str, ports)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.procs.append(proc)
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("node server did not start")

    def probe_from_node(self, spec: str, timeout: float = 1.0) -> bool:
        out = self.node_sh(sys.executable, str(NETPROBE), "probe", str(timeout), spec)
        return bool(json.loads(out.stdout)[spec])

    def http_get(self, url: str) -> tuple[int, str]:
        """GET a URL from inside the node namespace (where the agent listens)."""
        code = (
            "import sys, urllib.request, urllib.error\n"
            "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode())\n"
            "except OSError as e:\n print(0); print(e)\n"
        )
        out = self.node_sh(sys.executable, "-c", code, url).stdout
        status, _, body = out.partition("\n")
        return int(status), body

    def hold(self, src: str, dst_ip: str, port: int) -> Connection:
        """A long-lived TCP connection from pod `src`, to ping through on demand."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.pods[src].netns, sys.executable, str(NETPROBE), "hold", dst_ip, str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "connected":
            raise RuntimeError(f"{src} could not connect to {dst_ip}:{port}")
        return Connection(proc)

    def stockade(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run the CLI inside the node namespace (its nft/tc, never the host's)."""
        return self.node_sh(sys.executable, "-m", "agent.cli", *args, check=check, cwd=ROOT)

    def spawn_agent(self, *args: str) -> subprocess.Popen:
        """`stockade <args>` in the node namespace, its output going to a file (`agent_output`)."""
        return self.spawn_in_node([sys.executable, "-m", "agent.cli", *args])

    def spawn_in_node(self, argv: Sequence[str]) -> subprocess.Popen:
        """`argv` in the node namespace, its output going to a file (`agent_output`).
        A file, not a pipe: nobody reads a pipe while the agent runs, and once its buffer is
        full the agent would block on its next log line."""
        fd, name = tempfile.mkstemp(prefix=f"{self.prefix}-agent-", suffix=".log")
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.node, *argv],
                cwd=ROOT, stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(fd)
        self.procs.append(proc)
        self.logs[proc.pid] = Path(name)
        return proc

    def agent_output(self, proc: subprocess.Popen) -> str:
        """Everything an agent from `spawn_agent` has written so far."""
        return self.logs[proc.pid].read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs:
            stop(proc)
            if proc.stdout:
                proc.stdout.close()
        for log in self.logs.values():
            log.unlink(missing_ok=True)
        for pod in self.pods.values():
            sh("ip", "netns", "del", pod.netns, check=False)
        sh("ip", "netns", "del", self.node, check=False)
