"""Where a cold start and a restart spend their time, in-process (bench.startup times the
whole process from outside).

    python -m bench.startphases --size 10k --dataplane ebpf [--runs 2] [--profile DIR]

In the namespace lab over bench.events' synthetic cluster, a child in the node namespace
does what `stockade run --source DIR` does up to its first sync (imports, pipeline,
dataplane, daemon and HTTP endpoint, one `sync_once` with the daemon's GC pause and heap
freeze) and prints each phase's wall time (the sync split into the pipeline's snapshot and
the dataplane's apply; an eBPF apply into its table compile, adoption, comparison with the
pinned maps, settling and writing), the cyclic collections that ran during the sync (count
and time per generation), its CPU time and peak RSS. Per run: cold (`stockade cleanup`, no
state file; eBPF: the warm-up's build compiled afresh first, as bench.startup does), then a
restart over what it left. `--profile DIR` writes a cProfile of each child. Reports only.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

T0 = time.monotonic()

# The child: argv = child SOURCE STATE_DIR DATAPLANE NODE PROFILE|-
CHILD = "child"


def child(source: str, state: str, dataplane: str, node: str, profile: str) -> None:
    import cProfile
    import gc
    import resource

    prof = cProfile.Profile() if profile != "-" else None
    if prof:
        prof.enable()
    from agent.daemon import Daemon
    from agent.endpoint import ListenAddress, serve_http
    from agent.pipeline import DirectoryPipeline, gc_paused
    from agent.query import make_dataplane

    marks = {"import": time.monotonic()}  # what `run` imports but agent.cli itself (argparse, ~0.01 s)
    pipe = DirectoryPipeline(source, node, Path(state) / "last-good.json")
    marks["pipeline"] = time.monotonic()
    dp = make_dataplane(dataplane)
    marks["dataplane"] = time.monotonic()
    daemon = Daemon(pipe, dp, resync=60, strict=True, debounce=0.02)
    server = serve_http(daemon, ListenAddress.parse("127.0.0.1:9758"))
    marks["daemon"] = time.monotonic()
    steps = _time_steps(pipe, dp)
    notes: list[str] = []  # the eBPF adoption's count of endpoints kept

    class Note(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "adoption" in record.getMessage():
                notes.append(record.getMessage())

    rec_log = logging.getLogger("agent.dataplane.ebpf.reconcile")
    rec_log.addHandler(Note())
    rec_log.setLevel(logging.INFO)
    gcs: dict[int, list[float]] = {}
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            g = gcs.setdefault(info["generation"], [0, 0.0])
            g[0] += 1
            g[1] += time.perf_counter() - started[0]

    gc.callbacks.append(on_gc)
    with gc_paused():  # as Daemon.run
        ok = daemon.sync_once()
        daemon.heap.after_sync()
    marks["sync"] = time.monotonic()
    gc.callbacks.remove(on_gc)
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    last, parts = T0, []
    for name, t in marks.items():
        parts.append(f"{name} {1000 * (t - last):.0f}")
        last = t
    gc_text = ", ".join(f"gen{g} {n:.0f}x {1000 * t:.0f} ms" for g, (n, t) in sorted(gcs.items())) or "none"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    step_text = ", ".join(f"{name} {1000 * t:.0f}" for name, t in steps.items())
    print(f"{'ok' if ok else 'FAILED'}: {' / '.join(parts)} ms (sync: {step_text} ms); total {1000 * (last - T0):.0f} "
          f"ms, cpu {1000 * time.process_time():.0f} ms; gc during the sync: {gc_text}; peak RSS {rss} MB", flush=True)
    for note in notes:
        print(f"  {note}", flush=True)
    server.close()
    pipe.store.flush()


# The sync's steps timed in the child, by wrapping the methods doing them on the objects
# (the agent is not changed for the bench): the pipeline's snapshot (sources, admission,
# policy compile), the dataplane's apply, and inside an eBPF apply the table compile,
# adoption's comparison with the pinned maps, and the writing up to the flip.
STEPS = {"pipeline": ("snapshot",), "dataplane": ("apply",),
         "ebpf": ("_compile", "_adopt", "_verify_adopted", "_settle", "_apply")}


def _time_steps(pipe: object, dp: object) -> dict[str, float]:
    spent: dict[str, float] = {}

    def wrap(obj: object, name: str, label: str) -> None:
        inner = getattr(obj, name)

        def timed(*a: object, **kw: object) -> object:
            t = time.monotonic()
            try:
                return inner(*a, **kw)
            finally:
                spent[label] = spent.get(label, 0.0) + time.monotonic() - t

        setattr(obj, name, timed)

    wrap(pipe, "snapshot", "snapshot")
    wrap(dp, "apply", "apply")
    if getattr(dp, "name", "") == "ebpf":
        for name in STEPS["ebpf"]:
            wrap(dp, name, f"apply{name.replace('_', ' ').rstrip()}")
    return spent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD]:
        child(*argv[1:6])
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.startphases", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="10k")
    ap.add_argument("--dataplane", default="nftables", choices=["nftables", "ebpf"])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", help="directory for one cProfile per child")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench needs root (network namespaces, nftables, eBPF)", file=sys.stderr)
        return 2
    from bench.control import size_of
    from bench.events import NS, PORT, ROOT, SERVER_IP, Manifests
    from bench.startup import FRIEND_IP, pin_root
    from tests.kit import Lab, builders
    from tests.kit.generate import LOCAL_NODE
    from tests.kit.privileges import dataplane_env

    os.chdir(ROOT)
    dp = args.dataplane
    work = Path(tempfile.mkdtemp(prefix="stkbench-phases-"))
    try:
        with dataplane_env(dp, f"bench-phases-{os.getpid()}"), Lab() as lab:
            lab.add_pod(f"{NS}/client", ["10.200.0.1"])
            lab.add_pod(f"{NS}/server", [SERVER_IP], ports=(PORT,))
            lab.add_pod(f"{NS}/friend", [FRIEND_IP])
            m = Manifests(work, size_of(args.size), args.seed)
            m.put("e2e-friend", builders.pod(f"{NS}/friend", [FRIEND_IP], {"role": "allowed"}, [],
                                             nodeName="e2e-remote-node"))
            state = work / "state"

            def first_sync(name: str) -> None:
                prof = str(Path(args.profile) / f"{dp}-{args.size}-{name}.prof") if args.profile else "-"
                r = lab.node_sh(sys.executable, "-m", "bench.startphases", CHILD, str(m.dir), str(state), dp,
                                LOCAL_NODE, prof, check=False, cwd=ROOT)
                print(f"{dp} {args.size} {name}: {r.stdout.strip() or r.stderr.strip()[-800:]}", flush=True)

            def clean() -> None:
                lab.stockade("cleanup", "--dataplane", dp)
                shutil.rmtree(state, ignore_errors=True)

            build = None
            if dp == "ebpf":  # the warm-up chooses the map sizes and compiles the build
                from agent.dataplane.ebpf import builds

                clean()
                first_sync("warm-up")
                build = builds.existing(pin_root())[0]
            for i in range(args.runs):
                clean()
                if build is not None:
                    builds.ensure_bpffs(pin_root())
                    builds.compile_build(f"{pin_root()}/{build[0]}", build[1], sys.executable)
                first_sync(f"cold {i + 1}")
                first_sync(f"restart {i + 1}")
            clean()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
