"""Control-plane benchmark worker: runs *inside* a fresh network namespace the runner made.

    python -m bench.control run --size 10k --dataplane nftables --out R.json [--events N]
    python -m bench.control floor --ruleset FILE        (nft -f of a ruleset, timed)

`run` does, in this order (so the peak RSS read after step 2 is the cold path's own):
1. generate the cluster (the manifests stand in for the source's object cache);
2. cold compile (objects -> admission -> Program) and cold apply (Program -> kernel);
   VmHWM read here is the agent's peak RSS for a cold start;
3. writes the very ruleset Stockade produced to a file (the runner times `nft -f` of it
   in another fresh namespace: the floor);
4. incremental events, each timed from "the source has the changed object" to "apply
   returned" (the kernel transaction is committed when apply returns): one pod added,
   one pod's labels changed, one policy changed, one namespace's labels changed;
5. a /metrics scrape (KernelCollector over this dataplane), timed.

Nothing here asserts on time; it reports.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from agent.admission import LastGood
from agent.dataplane.base import Dataplane, DataplaneError
from agent.ir import Program
from agent.pipeline import compile_kubernetes
from agent.policy.kubernetes.incremental import IncrementalCompiler
from agent.query import DataplaneOptions
from agent.query import make_dataplane as build_dataplane
from agent.sources.kubeobjects import RawObject, ref_of
from tests.kit.generate import SIZES, Cluster, generate

SOURCE = "kubernetes"
EVENT_KINDS = ("pod_added", "pod_labels", "policy_changed", "namespace_labels")


def vm_hwm_mb() -> float:
    """Peak resident set of this process (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "median": statistics.median(values) if values else None,
            "p99": pct(values, 99) if values else None, "min": min(values, default=None),
            "max": max(values, default=None)}


def size_of(name: str) -> tuple[int, int]:
    if "/" in name:
        p, k = name.split("/")
        return int(p), int(k)
    return SIZES[name]


def make_dataplane(name: str, workdir: Path, big: bool = False) -> Dataplane:
    """The agent's dataplane with a deployed agent's options (NFLOG drop sampling on); eBPF
    pinned in a private bpffs, with room for the big sizes when `big`."""
    if name != "ebpf":
        return build_dataplane(name)
    from agent.dataplane.ebpf import Sizes

    root = workdir / "bpffs"
    if not root.exists():
        root.mkdir()
        # We run in our own mount namespace (ip netns exec): this bpffs dies with us.
        subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True, capture_output=True)
    sizes = Sizes(peers=1 << 20, ports=1 << 20) if big else None
    return build_dataplane(name, DataplaneOptions(ebpf_sizes=sizes, pin_root=f"{root}/stockade"))


class Agent:
    """The agent's sync path without the daemon's thread: objects -> Program -> kernel."""

    def __init__(self, objects: list[dict[str, Any]], dp: Dataplane, node: str, state: Path | None) -> None:
        self.raw = [RawObject(ref_of(b, SOURCE), b) for b in objects]
        self.index = {(o.ref.kind, o.ref.namespace, o.ref.name): i for i, o in enumerate(self.raw)}
        self.store = LastGood(state)
        self.compiler = IncrementalCompiler(node, SOURCE)  # kept across events, as the pipelines keep it
        self.dp = dp
        self.node = node
        self.program = None

    def compile(self) -> Program:
        return compile_kubernetes(self.raw, self.store, self.node, SOURCE, compiler=self.compiler).program

    def sync(self) -> tuple[float, float, Any]:
        c0, t0 = time.process_time(), time.perf_counter()
        program = self.compile()
        c1, t1 = time.process_time(), time.perf_counter()
        stats = self.dp.apply(program)
        c2, t2 = time.process_time(), time.perf_counter()
        self.program = program
        # CPU seconds of this process (user + sys, libnftables' kernel work included): less
        # sensitive than wall time to other load on a shared machine.
        self.cpu = (c1 - c0, c2 - c1)
        return t1 - t0, t2 - t1, stats

    def put(self, body: dict[str, Any]) -> None:
        obj = RawObject(ref_of(body, SOURCE), body)
        key = (obj.ref.kind, obj.ref.namespace, obj.ref.name)
        if key in self.index:
            self.raw[self.index[key]] = obj
        else:
            self.index[key] = len(self.raw)
            self.raw.append(obj)


def incremental(agent: Agent, cl: Cluster, kind: str, n: int, budget_s: float) -> dict[str, Any]:
    # zlib.crc32, not hash(): str hashes are salted per process, and the run must repeat.
    rng = random.Random(zlib.crc32(kind.encode()) & 0xFFFF ^ cl.seed)
    totals: list[float] = []
    computes: list[float] = []
    applies: list[float] = []
    elements: list[int] = []
    cpus: list[float] = []
    error = None
    pods = cl.pod_objs
    started = time.monotonic()
    for i in range(n):
        if i >= 3 and time.monotonic() - started > budget_s:
            break
        if kind == "pod_added":
            body = cl.new_pod(local=rng.random() < 0.5)
            pods.append(body)
        elif kind == "pod_labels":
            j = rng.randrange(len(pods))
            body = pods[j] = cl.relabel_pod(pods[j])
        elif kind == "policy_changed":
            j = rng.randrange(len(cl.policy_objs))
            body = cl.policy_objs[j] = cl.change_policy(cl.policy_objs[j])
        else:
            j = rng.randrange(len(cl.namespaces))
            body = cl.namespaces[j] = cl.relabel_namespace(cl.namespaces[j])
        # The source's cache has the change: from here the agent's work is timed.
        t0 = time.perf_counter()
        agent.put(body)
        try:
            compute, apply, stats = agent.sync()
        except DataplaneError as e:  # e.g. an eBPF map too small for two generations
            error = str(e)
            break
        totals.append(time.perf_counter() - t0)
        cpus.append(sum(agent.cpu))
        computes.append(compute)
        applies.append(apply)
        elements.append(stats.elements_added + stats.elements_removed)
    return {"total_s": summary(totals), "compute_s": summary(computes), "apply_s": summary(applies),
            "elements_changed_median": statistics.median(elements) if elements else None,
            "cpu_s": summary(cpus), "budget_hit": len(totals) < n and error is None, "error": error}


def scrape(dp: Dataplane, program: Any, reps: int = 10) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, generate_latest

    from agent.metrics import KernelCollector

    reg = CollectorRegistry()
    reg.register(KernelCollector(dp, lambda: program))
    times = []
    size = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        size = len(generate_latest(reg))
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "max_s": max(times), "bytes": size,
            "objects": dp.objects()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"size": args.size, "dataplane": args.dataplane}
    pods, policies = size_of(args.size)
    workdir = Path(args.workdir)
    base_rss = vm_rss_mb()
    cl = generate(pods, policies, seed=args.seed)
    gc.collect()
    out["rss_after_generate_mb"] = vm_rss_mb()
    out["rss_baseline_mb"] = base_rss
    dp = make_dataplane(args.dataplane, workdir)
    agent = Agent(cl.objects(), dp, cl.node, workdir / "state.json")
    try:
        compile_s, apply_s, stats = agent.sync()
    except DataplaneError as e:
        if args.dataplane != "ebpf":
            raise
        # Default map sizes too small for this cluster: say so, then measure with larger maps.
        out["default_sizes_error"] = str(e)
        dp.cleanup()
        dp = agent.dp = make_dataplane(args.dataplane, workdir, big=True)
        out["sizes_override"] = "peers=ports=1Mi"
        compile_s, apply_s, stats = agent.sync()
    out["peak_rss_mb"] = vm_hwm_mb()  # the cold compile + apply, generator's objects included
    out["rss_after_cold_mb"] = vm_rss_mb()
    out["cold"] = {"compile_s": compile_s, "apply_s": apply_s, "sum_s": compile_s + apply_s,
                   "compile_cpu_s": agent.cpu[0], "apply_cpu_s": agent.cpu[1],
                   "commands": stats.commands, "elements": stats.elements_added}
    if getattr(dp, "last_load", None):
        out["cold"]["ebpf_loader_s"] = dp.last_load.get("total_s")  # type: ignore[attr-defined]
    out["program"] = {"local_endpoints": len(agent.program.endpoints), "objects": dp.objects()}
    if args.dataplane == "nftables":
        from agent.dataplane.nftables import build_model, render_full

        t0 = time.perf_counter()
        model = build_model(agent.program, dp.options)  # type: ignore[attr-defined]
        t1 = time.perf_counter()
        text = render_full(model)
        t2 = time.perf_counter()
        out["cold"]["build_model_s"] = t1 - t0
        out["cold"]["render_full_s"] = t2 - t1
        out["cold"]["kernel_s_est"] = apply_s - (t2 - t0)
        ruleset = workdir / "ruleset.nft"
        ruleset.write_text(text)
        out["ruleset"] = {"path": str(ruleset), "bytes": len(text), "lines": text.count("\n")}
    elif args.dataplane == "ebpf":
        out["floor"] = ebpf_floor(dp)
    out["scrape"] = scrape(dp, agent.program, reps=3 if pods > 5000 else 10)
    out["incremental"] = {}
    for kind in EVENT_KINDS:
        n = args.events.get(kind, 50) if isinstance(args.events, dict) else args.events
        out["incremental"][kind] = incremental(agent, cl, kind, n, args.budget)
    dp.cleanup()
    return out


def ebpf_floor(dp: Any) -> dict[str, Any]:
    """Raw map-update time: rewrite every peers/ports entry the apply wrote, one bpf(2) each."""
    total = 0
    elapsed = 0.0
    for name in ("peers", "ports"):
        m = dp.maps[name]
        items = list(m.items())
        t0 = time.perf_counter()
        for k, v in items:
            m.update(k, v)
        elapsed += time.perf_counter() - t0
        total += len(items)
    return {"entries": total, "update_s": elapsed}


def floor(args: argparse.Namespace) -> dict[str, Any]:
    """`nft -f` of the ruleset into this (fresh) namespace, timed; then the table's removed."""
    times, cpus = [], []
    for _ in range(args.reps):
        c0 = os.times()
        t0 = time.perf_counter()
        r = subprocess.run(["nft", "-f", args.ruleset], capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        c1 = os.times()
        cpus.append(c1.children_user + c1.children_system - c0.children_user - c0.children_system)
        if r.returncode != 0:
            return {"error": r.stderr.strip()[-500:]}
        subprocess.run(["nft", "delete", "table", "inet", "stockade"], check=True)
    return {"nft_f_s": statistics.median(times), "all_s": times, "nft_f_cpu_s": statistics.median(cpus)}


def _events(text: str) -> int | dict[str, int]:
    if "=" not in text:
        return int(text)
    return {k: int(v) for k, v in (p.split("=") for p in text.split(","))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.control")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--size", required=True, help="1k | 10k | 50k | PODS/POLICIES")
    r.add_argument("--dataplane", default="nftables", choices=["nftables", "ebpf"])
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--events", type=_events, default=50, help="N, or kind=N,... per event kind")
    r.add_argument("--budget", type=float, default=1e9, help="seconds per event kind (>= 5 events)")
    r.add_argument("--workdir")
    r.add_argument("--out", required=True)
    f = sub.add_parser("floor")
    f.add_argument("--ruleset", required=True)
    f.add_argument("--reps", type=int, default=3)
    f.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        if not args.workdir:
            args.workdir = tempfile.mkdtemp(prefix="stkbench-")
        res = run(args)
    else:
        res = floor(args)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
