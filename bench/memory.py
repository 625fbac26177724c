"""Peak memory as a container limit counts it: a cold `stockade apply` run inside a fresh
memory cgroup that holds the agent and every child it starts (`nft -f`, bcc's loader),
its peak read from the kernel (cgroup v2 `memory.peak`, v1 `memory.max_usage_in_bytes`).
RSS misses what a limit counts: children, page cache, kernel memory, BPF maps (charged to
the memory cgroup since Linux 5.11).

    python -m bench.memory --sizes 1k,10k [--dataplanes nftables,ebpf]

Per size and dataplane: `agent_peak_mb` (cold apply, process start -> kernel programmed;
eBPF with its pinned build already compiled, so bcc is not in it), `restart_peak_mb` (the
same apply again over the kernel state the cold one left: nftables replaces its table in
one transaction, eBPF adopts its pinned maps) and, for eBPF,
`loader_peak_mb` (bcc's one-time compile child, run alone in a cgroup of its own, with the
map sizes the agent chose). Each run gets a fresh network namespace and cgroup, both
removed afterwards. Reports figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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

    def run(self, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> tuple[int, str]:
        """Run `cmd` as a member of this cgroup (it joins before exec, so everything it
        allocates and everything its children allocate is charged here)."""
        procs = str(self.path / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, preexec_fn=join)
        deadline = time.monotonic() + timeout
        while p.poll() is None:
            if self.version == 2 and not (self.path / "memory.peak").exists():
                self._polled = max(self._polled, self.current())
            if time.monotonic() > deadline:
                p.kill()
            time.sleep(0.02)
        assert p.stderr is not None
        return p.returncode, p.stderr.read()


def _netns(name: str, add: bool) -> None:
    subprocess.run(["ip", "netns", "add" if add else "del", name], check=add)


def _mb(n: int) -> float:
    return round(n / MB, 1)


def _agent_env(pin_root: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if pin_root:
        env["STOCKADE_BPF_PIN_ROOT"] = pin_root
    return env


def _apply(cg: Cgroup, ns: str, manifests: Path, node: str, dataplane: str, pin_root: str | None) -> tuple[int, str]:
    return cg.run(["ip", "netns", "exec", ns, sys.executable, "-m", "agent.cli", "-v", "apply", "--source",
                   str(manifests), "--node", node, "--state-dir", "", "--dataplane", dataplane],
                  env=_agent_env(pin_root))


def _built_sizes(pin_root: str) -> tuple[str, list[str]] | None:
    """The one complete build under `pin_root` and the loader defines that made it."""
    from agent.dataplane.ebpf import builds

    found = builds.existing(pin_root)
    if len(found) != 1:
        return None
    build, sizes = found[0]
    return build, sizes.defines()


def write_manifests(path: Path, objects: list[dict[str, Any]], per_file: int = 2000) -> Path:
    """The cluster as a manifest directory in files of `per_file` objects (the directory
    source refuses files over 4 MiB)."""
    from tests.kit.builders import dump_manifests

    path.mkdir(parents=True)
    for n, i in enumerate(range(0, len(objects), per_file)):
        (path / f"part{n:04d}.yaml").write_text(dump_manifests(objects[i : i + per_file]))
    return path


def measure(size: str, dataplane: str, seed: int, log: Any) -> dict[str, Any]:
    """Cold-apply peak of one size on one dataplane (see the module docstring)."""
    from tests.kit.generate import SIZES, generate

    pods, policies = SIZES[size]
    cl = generate(pods, policies, seed=seed)
    work = Path(tempfile.mkdtemp(prefix="stkbench-mem-"))
    out: dict[str, Any] = {"size": size, "dataplane": dataplane, "cgroup": None}
    bpffs: list[Path] = []
    try:
        manifests = write_manifests(work / "manifests", cl.objects())
        node = cl.node
        del cl
        pin_root = None
        if dataplane == "ebpf":
            # a private bpffs outside the netns's own mount namespace: every run sees it
            for name in ("bpf-first", "bpf-cold"):
                d = work / name
                d.mkdir()
                subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True)
                bpffs.append(d)
            # 1. the first start ever: compiles the build (bcc child included in the peak)
            ns = f"stkmem{os.getpid()}f"
            _netns(ns, True)
            try:
                with Cgroup("first") as cg:
                    out["cgroup"] = f"v{cg.version}"
                    rc, err = _apply(cg, ns, manifests, node, dataplane, f"{bpffs[0]}/stockade")
                    out["first_start_peak_mb"] = _mb(cg.peak())
            finally:
                _netns(ns, False)
            if rc != 0:
                out["error"] = err.strip()[-1500:]
                return out
            built = _built_sizes(f"{bpffs[0]}/stockade")
            if built is None:
                out["error"] = "no single complete build after the first start"
                return out
            build, defines = built
            out["ebpf_sizes"] = defines
            # 2. bcc's loader alone, the same build into the second bpffs
            loader = [sys.executable, "-m", "agent.dataplane.ebpf.loader", "--pin-dir",
                      f"{bpffs[1]}/stockade/{build}"]
            for d in defines:
                loader += ["-D", d]
            os.makedirs(f"{bpffs[1]}/stockade")
            with Cgroup("loader") as cg:
                rc, err = cg.run(loader, env=_agent_env(None))
                out["loader_peak_mb"] = _mb(cg.peak())
            if rc != 0:
                out["error"] = err.strip()[-1500:]
                return out
            pin_root = f"{bpffs[1]}/stockade"
        # 3. the cold start measured: a fresh namespace, nothing programmed
        ns = f"stkmem{os.getpid()}c"
        _netns(ns, True)
        try:
            with Cgroup("cold") as cg:
                out["cgroup"] = f"v{cg.version}"
                t0 = time.monotonic()
                rc, err = _apply(cg, ns, manifests, node, dataplane, pin_root)
                out["cold_s"] = round(time.monotonic() - t0, 2)
                out["agent_peak_mb"] = _mb(cg.peak())
                applied = re.search(r"applied (\d+) endpoints", err)
                out["local_endpoints"] = int(applied[1]) if applied else None
            if rc == 0:
                # 4. a restart: the same apply again, the kernel state of step 3 in place
                # (nftables replaces its table in one transaction; eBPF adopts its maps)
                with Cgroup("restart") as cg:
                    rc, err = _apply(cg, ns, manifests, node, dataplane, pin_root)
                    out["restart_peak_mb"] = _mb(cg.peak())
        finally:
            _netns(ns, False)
        if rc != 0:
            out["error"] = err.strip()[-1500:]
        return out
    finally:
        for d in bpffs:
            subprocess.run(["umount", str(d)], check=False)
        shutil.rmtree(work, ignore_errors=True)
        log(f"memory: {dataplane} {size}: {line(out)}")


def line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"error: {r['error'][-300:]}"
    parts = [f"cgroup peak {r.get('agent_peak_mb')} MB (cold apply {r.get('cold_s')} s, {r.get('cgroup')}); "
             f"restart {r.get('restart_peak_mb')} MB"]
    if "loader_peak_mb" in r:
        parts.append(f"bcc loader child apart {r['loader_peak_mb']} MB; first start with compile "
                     f"{r.get('first_start_peak_mb')} MB")
    return "; ".join(parts)


TARGET_MB = {"10k": 150, "50k": 500}  # issue 17: agent + children, bcc's compile apart


def table(result: dict[str, Any]) -> str:
    """The cgroup peaks beside the control-plane worker's peak RSS (which counts neither
    children nor kernel memory, and includes the generator's objects)."""
    from bench.report import _table

    rows = []
    for key, r in result.get("memory", {}).items():
        rss = result.get("control", {}).get(key, {}).get("peak_rss_mb")
        if "error" in r:
            rows.append([key, "ERROR: " + r["error"].splitlines()[-1][:80], "", "", "", "", "", ""])
            continue
        target = TARGET_MB.get(r["size"])
        peak = r["agent_peak_mb"]
        restart = r.get("restart_peak_mb")
        rows.append([key, str(r.get("local_endpoints", "-")), f"{peak:.0f} MB",
                     "-" if restart is None else f"{restart:.0f} MB", "-" if rss is None else f"{rss:.0f} MB",
                     f"{r['loader_peak_mb']:.0f} MB" if "loader_peak_mb" in r else "-",
                     f"{r['first_start_peak_mb']:.0f} MB" if "first_start_peak_mb" in r else "-",
                     "-" if target is None else f"<= {target} MB: {'met' if peak <= target else 'NOT MET'}"])
    head = ["dataplane/size", "eps", "cgroup peak (agent+children)", "restart (state in place)", "worker peak RSS",
            "bcc loader apart",
            "first start (compile)", "target"]
    return ("Memory (a cold `stockade apply` in a fresh memory cgroup; eBPF with its build already compiled)\n"
            + _table(head, rows))


def run(dataplanes: list[str], sizes: list[str], seed: int, log: Any) -> dict[str, Any]:
    return {f"{dp}/{size}": measure(size, dp, seed, log) for dp in dataplanes for size in sizes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1k,10k")
    ap.add_argument("--dataplanes", default="nftables,ebpf")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.memory needs root (cgroups, network namespaces)", file=sys.stderr)
        return 2
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {msg}", flush=True)

    res = run(args.dataplanes.split(","), args.sizes.split(","), args.seed, log)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(table({"memory": res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
