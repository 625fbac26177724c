"""Peak memory as a container limit counts it: a cold `stockade apply`, and a running
`stockade run` daemon, each inside a fresh memory cgroup that holds the agent and every
child it starts (`nft -f`, bcc's loader), its peak read from the kernel (cgroup v2
`memory.peak`, v1 `memory.max_usage_in_bytes`). RSS misses what a limit counts:
children, page cache, kernel memory, BPF maps (charged to the memory cgroup since Linux
5.11).

    python -m bench.memory --sizes 1k,10k [--dataplanes nftables,ebpf] [--parts cold,daemon]

Per size and dataplane: `agent_peak_mb` (cold apply, process start -> kernel programmed;
eBPF with its pinned build already compiled, so bcc is not in it), `restart_peak_mb` (the
same apply again over the kernel state the cold one left: nftables replaces its table in
one transaction, eBPF adopts its pinned maps) and, for eBPF,
`loader_peak_mb` (bcc's one-time compile child, run alone in a cgroup of its own, with the
map sizes the agent chose); with the daemon part, `daemon_peak_mb` / `daemon_settled_mb`:
`stockade run --dns-egress` over the same manifests (eBPF: its build compiled beforehand,
nothing programmed) from start to ready, /metrics scraped once, its RSS settled; the
peak of that span (bcc's loader for the DNS hold apart: `daemon_loader_peak_mb`) and the
usage it keeps once settled; `daemon_restart_*` the same for the daemon started again
after a SIGKILL, over the kernel state it left (adopted). Each run gets a fresh cgroup,
and each cold start a fresh network namespace (a restart the one its cold start left);
both removed afterwards. Reports figures; never passes or fails.
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

from bench.cgroups import MB, ROOT, Cgroup, LoaderWatch, PeakMeter, proc_kb, settle, spawn_in_cgroup


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


def write_manifests(path: Path, objects: list[dict[str, Any]], per_file: int = 2000) -> Path:
    """The cluster as a manifest directory in files of `per_file` objects (the directory
    source refuses files over 4 MiB)."""
    from tests.kit.builders import dump_manifests

    path.mkdir(parents=True)
    for n, i in enumerate(range(0, len(objects), per_file)):
        (path / f"part{n:04d}.yaml").write_text(dump_manifests(objects[i : i + per_file]))
    return path


DAEMON_METRICS = "127.0.0.1:9758"  # inside the run's own network namespace


def _get(ns: str, path: str) -> tuple[int, int]:
    """(HTTP status, body bytes) of a GET to the agent's metrics server in `ns` (0: none)."""
    r = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-o", "/dev/null", "-m", "60", "-w",
                        "%{http_code} %{size_download}", f"http://{DAEMON_METRICS}{path}"],
                       capture_output=True, text=True, check=False)
    code, _, size = r.stdout.partition(" ")
    return (int(code), int(float(size or 0))) if code.isdigit() else (0, 0)


def _daemon(out: dict[str, Any], manifests: Path, node: str, dataplane: str, pin_root: str | None,
            work: Path) -> None:
    """The running daemon, as users run it: `stockade run --dns-egress` over the manifests
    in a fresh namespace and cgroup (eBPF: its build compiled beforehand, nothing
    programmed), then SIGKILLed and started again over the kernel state it left (in a
    cgroup of its own: `daemon_restart_*`). Each to ready, /metrics scraped once, its RSS
    settled. `daemon_peak_mb`: the cgroup's peak from start to settled, bcc's loader
    children apart (the DNS hold compiles one at every start: `daemon_loader_peak_mb`, the
    peak up to its exit); `daemon_settled_mb`: the cgroup's usage once settled (what it
    keeps)."""
    ns = f"stkmem{os.getpid()}d"
    _netns(ns, True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        args = ["ip", "netns", "exec", ns, sys.executable, "-m", "agent.cli", "run", "--source", str(manifests),
                "--node", node, "--dataplane", dataplane, "--state-dir", "", "--metrics-address", DAEMON_METRICS,
                "--dns-egress"]
        for prefix in ("daemon", "daemon_restart"):
            if not _daemon_run(out, prefix, ns, args, _agent_env(pin_root), work / f"{prefix}-{dataplane}.log"):
                break
    finally:
        _netns(ns, False)


def _daemon_run(out: dict[str, Any], prefix: str, ns: str, args: list[str], env: dict[str, str], log_path: Path,
                timeout: float = 900) -> bool:
    """One daemon start to settled in a fresh cgroup (see `_daemon`), then SIGKILL; its
    figures under `prefix`. False: it failed (`<prefix>_error`)."""
    agent = None
    try:
        with Cgroup(prefix.replace("_", "-")) as cg, open(log_path, "w") as logf:
            meter = PeakMeter(cg)
            try:
                meter.reset()
                watch = LoaderWatch(cg, meter)
                t0 = time.monotonic()
                agent = spawn_in_cgroup(cg, args, logf.fileno(), env=env)
                while agent.poll() is None and _get(ns, "/readyz")[0] != 200:
                    if time.monotonic() - t0 > timeout:
                        raise RuntimeError(f"not ready in {timeout:.0f} s")
                    time.sleep(0.2)
                watch.stop()
                if agent.poll() is not None:
                    raise RuntimeError(f"agent exited {agent.returncode}")
                out[f"{prefix}_ready_s"] = round(time.monotonic() - t0, 1)
                out[f"{prefix}_ready_mb"] = _mb(cg.current())
                code, size = _get(ns, "/metrics")
                out[f"{prefix}_metrics_bytes"] = size if code == 200 else None
                out[f"{prefix}_settle_s"] = settle(agent.pid)
                out[f"{prefix}_peak_mb"] = _mb(meter.peak())
                out[f"{prefix}_settled_mb"] = _mb(cg.current())
                out[f"{prefix}_rss_mb"] = round(proc_kb(agent.pid)["VmRSS"] / 1024, 1)
                out[f"{prefix}_loader_peak_mb"] = _mb(watch.loader_peak)
                out[f"{prefix}_loaders"] = watch.loaders
            finally:
                if agent is not None and agent.poll() is None:
                    agent.kill()  # SIGKILL: the kernel state stays, for the restart
                    agent.wait()
                meter.close()
        return True
    except Exception as e:  # a report, not a verdict: the error is the figure
        tail = log_path.read_text()[-1200:] if log_path.exists() else ""
        out[f"{prefix}_error"] = f"{type(e).__name__}: {e}; {tail}"
        return False


def measure(size: str, dataplane: str, seed: int, log: Any,
            parts: tuple[str, ...] = ("cold", "daemon")) -> dict[str, Any]:
    """The peaks of one size on one dataplane (see the module docstring); `parts`: "cold"
    (a cold apply, then a restart apply), "daemon" (the running daemon)."""
    from agent.dataplane.ebpf import builds
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
        pin_root = daemon_root = None
        if dataplane == "ebpf":
            # a private bpffs outside the netns's own mount namespace: every run sees it
            for name in ("bpf-first", "bpf-cold", "bpf-daemon"):
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
            found = builds.existing(f"{bpffs[0]}/stockade")
            if len(found) != 1:
                out["error"] = "no single complete build after the first start"
                return out
            (build, sizes), = found
            out["ebpf_sizes"] = sizes.defines()
            # 2. bcc's loader alone, the same build into the second bpffs
            loader = [sys.executable, "-m", "agent.dataplane.ebpf.loader", "--pin-dir",
                      f"{bpffs[1]}/stockade/{build}"]
            for d in sizes.defines():
                loader += ["-D", d]
            os.makedirs(f"{bpffs[1]}/stockade")
            with Cgroup("loader") as cg:
                rc, err = cg.run(loader, env=_agent_env(None))
                out["loader_peak_mb"] = _mb(cg.peak())
            if rc != 0:
                out["error"] = err.strip()[-1500:]
                return out
            pin_root = f"{bpffs[1]}/stockade"
            if "daemon" in parts:  # the daemon's build compiled outside its cgroup, nothing programmed
                daemon_root = f"{bpffs[2]}/stockade"
                os.makedirs(daemon_root)
                builds.compile_build(f"{daemon_root}/{build}", sizes, sys.executable)
        if "cold" in parts:
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
        if "daemon" in parts:
            # 5. the running daemon (`stockade run --dns-egress`), ready, scraped, settled
            _daemon(out, manifests, node, dataplane, daemon_root, work)
        return out
    finally:
        for d in bpffs:
            subprocess.run(["umount", str(d)], check=False)
        shutil.rmtree(work, ignore_errors=True)
        log(f"memory: {dataplane} {size}: {line(out)}")


def line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"error: {r['error'][-300:]}"
    parts = []
    if "agent_peak_mb" in r:
        parts.append(f"cgroup peak {r.get('agent_peak_mb')} MB (cold apply {r.get('cold_s')} s, {r.get('cgroup')}); "
                     f"restart {r.get('restart_peak_mb')} MB")
    if "loader_peak_mb" in r:
        parts.append(f"bcc loader child apart {r['loader_peak_mb']} MB; first start with compile "
                     f"{r.get('first_start_peak_mb')} MB")
    if "daemon_error" in r:
        parts.append(f"daemon error: {r['daemon_error'][-300:]}")
    elif "daemon_peak_mb" in r:
        parts.append(f"running daemon (--dns-egress, scraped): peak {r['daemon_peak_mb']} MB, settled "
                     f"{r['daemon_settled_mb']} MB (RSS {r['daemon_rss_mb']} MB; ready in {r['daemon_ready_s']} s at "
                     f"{r['daemon_ready_mb']} MB; bcc loader apart {r['daemon_loader_peak_mb']} MB)")
    if "daemon_restart_error" in r:
        parts.append(f"daemon restart error: {r['daemon_restart_error'][-300:]}")
    elif "daemon_restart_peak_mb" in r:
        parts.append(f"daemon restarted after SIGKILL: peak {r['daemon_restart_peak_mb']} MB, settled "
                     f"{r['daemon_restart_settled_mb']} MB (ready in {r['daemon_restart_ready_s']} s)")
    return "; ".join(parts)


TARGET_MB = {"10k": 150, "50k": 500}  # issue 17: agent + children, bcc's compile apart


def _mb_cell(r: dict[str, Any], key: str) -> str:
    return f"{r[key]:.0f} MB" if r.get(key) is not None else "-"


def _verdict(target: int | None, figures: list[float]) -> str:
    if target is None or not figures:
        return "-"
    return f"<= {target} MB: {'met' if max(figures) <= target else 'NOT MET'}"


def table(result: dict[str, Any]) -> str:
    """The cgroup peaks beside the control-plane worker's peak RSS (which counts neither
    children nor kernel memory, and includes the generator's objects)."""
    from bench.report import _table

    rows = []
    for key, r in result.get("memory", {}).items():
        rss = result.get("control", {}).get(key, {}).get("peak_rss_mb")
        if "error" in r:
            rows.append([key, "ERROR: " + r["error"].splitlines()[-1][:80], *[""] * 9])
            continue
        daemon = [("ERROR" if f"{p}_error" in r else "-") if f"{p}_peak_mb" not in r else
                  f"{r[f'{p}_peak_mb']:.0f} / {r[f'{p}_settled_mb']:.0f} MB" for p in ("daemon", "daemon_restart")]
        figures = [r[k] for k in ("agent_peak_mb", "restart_peak_mb", "daemon_peak_mb", "daemon_restart_peak_mb")
                   if r.get(k) is not None]
        rows.append([key, str(r.get("local_endpoints", "-")), _mb_cell(r, "agent_peak_mb"),
                     _mb_cell(r, "restart_peak_mb"), *daemon, "-" if rss is None else f"{rss:.0f} MB",
                     _mb_cell(r, "loader_peak_mb"), _mb_cell(r, "first_start_peak_mb"),
                     _mb_cell(r, "daemon_loader_peak_mb"), _verdict(TARGET_MB.get(r["size"]), figures)])
    head = ["dataplane/size", "eps", "cold apply peak", "restart apply peak", "daemon peak / settled",
            "daemon restart peak / settled",
            "worker peak RSS", "bcc loader apart", "first start (compile)", "daemon's hold loader apart", "target"]
    return ("Memory of agent + children as a memory cgroup counts it (eBPF with its build already compiled): "
            "a cold `stockade apply`, the same apply over the state it left, and a running `stockade run "
            "--dns-egress` from start to ready, scraped and settled, and again after a SIGKILL\n" + _table(head, rows))


def run(dataplanes: list[str], sizes: list[str], seed: int, log: Any,
        parts: tuple[str, ...] = ("cold", "daemon")) -> dict[str, Any]:
    return {f"{dp}/{size}": measure(size, dp, seed, log, parts) for dp in dataplanes for size in sizes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1k,10k")
    ap.add_argument("--dataplanes", default="nftables,ebpf")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--parts", default="cold,daemon",
                    help="cold (a cold apply, then a restart apply), daemon (the running daemon)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.memory needs root (cgroups, network namespaces)", file=sys.stderr)
        return 2
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {msg}", flush=True)

    res = run(args.dataplanes.split(","), args.sizes.split(","), args.seed, log, tuple(args.parts.split(",")))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(table({"memory": res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
