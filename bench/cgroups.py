"""Memory cgroups for the benchmarks: a fresh child cgroup holding the agent and every
child it starts (`Cgroup`), its peak since a reset (`PeakMeter`), bcc's loader children
noted apart (`LoaderWatch`), and a process started inside one from its first instruction
(`spawn_in_cgroup`). Shared by bench.memory and bench.dnshold."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CGROUP_FS = Path("/sys/fs/cgroup")
MB = 1 << 20


def _own_path(controller: str) -> str | None:
    """This process's cgroup path in the v1 hierarchy of `controller` ("" for v2)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if ctrls.split(",") == [controller] or (controller == "" and ctrls == ""):
            return path
    return None


def memory_root() -> tuple[Path, int]:
    """The directory to create benchmark cgroups under, and the cgroup version: v2 when
    the unified hierarchy has the memory controller, else v1's memory hierarchy."""
    for mount in (CGROUP_FS, CGROUP_FS / "unified"):
        ctrl = mount / "cgroup.controllers"
        if ctrl.exists() and "memory" in ctrl.read_text().split():
            own = _own_path("") or "/"
            return mount / own.lstrip("/"), 2
    own = _own_path("memory")
    if own is not None and (CGROUP_FS / "memory").is_dir():
        return CGROUP_FS / "memory" / own.lstrip("/"), 1
    raise RuntimeError("no memory cgroup controller found (neither v2 nor v1)")


class Cgroup:
    """A fresh child memory cgroup; `run` starts a command inside it; `peak` is the most
    its members (and every descendant process) were charged at once."""

    count = 0

    def __init__(self, tag: str) -> None:
        parent, self.version = memory_root()
        Cgroup.count += 1
        self.path = parent / f"stkbench-mem-{os.getpid()}-{tag}-{Cgroup.count}"
        self._polled = 0

    def __enter__(self) -> Cgroup:
        self.path.mkdir()
        if self.version == 2 and not (self.path / "memory.peak").exists():
            # a v2 kernel before 5.19: subtree control may have to be enabled on the parent
            (self.path.parent / "cgroup.subtree_control").write_text("+memory")
        return self

    def __exit__(self, *exc: object) -> None:
        for _ in range(100):  # members gone a moment after they exit
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)

    def _read(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    def current(self) -> int:
        return self._read("memory.current" if self.version == 2 else "memory.usage_in_bytes")

    def peak(self) -> int:
        if self.version == 1:
            return self._read("memory.max_usage_in_bytes")
        if (self.path / "memory.peak").exists():
            return self._read("memory.peak")
        return self._polled  # kernels before 5.19: the highest memory.current seen

    def joiner(self) -> Any:
        """A `preexec_fn` making the child a member before it execs (everything it and its
        children allocate is charged here)."""
        procs = str(self.path / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return join

    def run(self, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> tuple[int, str]:
        """Run `cmd` as a member of this cgroup to its exit: (exit code, stderr)."""
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, preexec_fn=self.joiner())
        deadline = time.monotonic() + timeout
        while p.poll() is None:
            if self.version == 2 and not (self.path / "memory.peak").exists():
                self._polled = max(self._polled, self.current())
            if time.monotonic() > deadline:
                p.kill()
            time.sleep(0.02)
        assert p.stderr is not None
        return p.returncode, p.stderr.read()


def spawn_in_cgroup(cg: Cgroup, argv: list[str], log_fd: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`argv` as a member of `cg` from its first instruction (`ip netns exec` execs its
    command in place, so a namespaced agent is a member too), its output to `log_fd`."""
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_fd, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, preexec_fn=cg.joiner())


class PeakMeter:
    """A cgroup's peak usage since the last `reset` (v1: memory.max_usage_in_bytes, reset
    by writing 0; v2: memory.peak, reset per open file since Linux 6.12, so one file is
    kept open)."""

    def __init__(self, cg: Cgroup) -> None:
        self.cg = cg
        self.file = open(cg.path / "memory.peak", "r+") if cg.version == 2 else None  # noqa: SIM115

    def reset(self) -> None:
        if self.file is None:
            (self.cg.path / "memory.max_usage_in_bytes").write_text("0")
        else:
            self.file.seek(0)
            self.file.write("reset\n")
            self.file.flush()

    def peak(self) -> int:
        if self.file is None:
            return int(self.cg.peak())
        self.file.seek(0)
        return int(self.file.read().split()[0])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _loaders(cg: Cgroup) -> list[int]:
    """Members of the cgroup that are a bcc loader child (the hold's, or the eBPF dataplane's)."""
    out = []
    for pid in (cg.path / "cgroup.procs").read_text().split():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"agent.dns.loader" in cmd or b"agent.dataplane.ebpf.loader" in cmd:
            out.append(int(pid))
    return out


class LoaderWatch:
    """Polls the cgroup while the agent starts: the peak while a bcc loader child runs is
    noted apart (issue 17 counts bcc's compile apart), and the peak is reset once it exits,
    so `meter.peak()` at ready is the start-up without it (the agent's own peaks in the
    300 ms after its exit, while the hold is attached, are missed with it)."""

    def __init__(self, cg: Cgroup, meter: PeakMeter) -> None:
        self.cg, self.meter = cg, meter
        self.loader_peak = 0  # bytes: the cgroup's peak up to the last loader's exit
        self.loaders = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    SETTLE = 30  # polls (10 ms) after a loader's exit during which the peak is reset again:
    # its memory is uncharged over a moment after it leaves the process list

    def _run(self) -> None:
        running, settle = False, 0
        while not self._stop.wait(0.01):
            now = bool(_loaders(self.cg))
            if now and not running:
                self.loaders += 1
            if running and not now:  # a loader exited: its peak apart, the count starts afresh
                self.loader_peak = max(self.loader_peak, self.meter.peak())
                settle = self.SETTLE
            if settle and not now:
                self.meter.reset()
                settle -= 1
            running = now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def proc_kb(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def settle(pid: int, quiet: float = 3.0, limit: float = 120.0) -> float:
    """Seconds until the process's RSS moved less than 0.5 MB over `quiet` seconds (at
    most `limit`)."""
    t0 = time.monotonic()
    last, since = proc_kb(pid)["VmRSS"], time.monotonic()
    while time.monotonic() - t0 < limit:
        time.sleep(0.25)
        now = proc_kb(pid)["VmRSS"]
        if abs(now - last) > 512:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return round(time.monotonic() - t0, 1)
