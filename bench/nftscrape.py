"""In-process cost of one nftables counter read (a /metrics scrape's kernel part), by reader.

The synthetic cluster (tests/kit/generate.py) compiled and loaded by `NftablesDataplane`
into a fresh network namespace, then per reader (`counters`: the raw NFT_MSG_GETRULE dump,
nftcounters.py; `counters_libnftables`: `list table` as JSON, the reference), in the order
given: wall time (median of --runs), the RSS peak above the RSS before the read (VmHWM
reset through /proc/self/clear_refs; the first read of each reader), Python's own
allocation peak (tracemalloc, a separate read) and the RSS left after (free heap returned
first). The readers must agree. Reports figures; never passes or fails.

    python -m bench.nftscrape --sizes 10k [--readers counters,counters_libnftables]   (as root)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
READERS = ("counters", "counters_libnftables")


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


def inner(size: str, readers: list[str], runs: int, seed: int) -> dict[str, Any]:
    """Runs inside the namespace: load the table, then measure each reader."""
    from agent.admission import LastGood, kubernetes_inventory
    from agent.dataplane import heap
    from agent.dataplane.nftables import NftablesDataplane
    from agent.policy.kubernetes.incremental import IncrementalCompiler
    from agent.sources.kubeobjects import RawObject, ref_of
    from tests.kit.generate import SIZES, generate

    pods, pols = SIZES[size]
    cl = generate(pods, pols, seed)
    raw = [RawObject(ref_of(b, "kubernetes"), b) for b in cl.objects()]
    prog = IncrementalCompiler(cl.node, "kubernetes").compile(kubernetes_inventory(raw, LastGood()))
    del raw, cl
    dp = NftablesDataplane()
    t0 = time.monotonic()
    dp.apply(prog)
    out: dict[str, Any] = {"size": size, "endpoints": len(prog.endpoints), "load_s": round(time.monotonic() - t0, 1),
                           "objects": dp.objects(), "readers": {}}
    heap.release(collect=True)
    gc.freeze()  # as the daemon after its first sync
    results = {}
    for name in readers:
        read = getattr(dp, name)
        heap.release()
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        t = time.monotonic()
        results[name] = read()
        first_s = time.monotonic() - t
        peak = _status_kb("VmHWM")
        times = [first_s]
        for _ in range(runs - 1):
            t = time.monotonic()
            read()
            times.append(time.monotonic() - t)
        tracemalloc.start()
        read()
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        heap.release()
        out["readers"][name] = {
            "ms_p50": round(statistics.median(times) * 1000, 1), "ms_first": round(first_s * 1000, 1),
            "rss_before_mb": _mb(before), "rss_peak_above_mb": _mb(peak - before),
            "python_peak_mb": round(py_peak / 2**20, 2), "rss_after_mb": _mb(_status_kb("VmRSS")),
            "rules": len(results[name].rules), "drops": len(results[name].drops),
        }
    vals = list(results.values())
    out["agree"] = all(v == vals[0] for v in vals)
    dp.cleanup()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nftscrape", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10k")
    ap.add_argument("--readers", default=",".join(READERS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    readers = args.readers.split(",")
    if args.inner:
        print(json.dumps(inner(args.sizes, readers, args.runs, args.seed)), flush=True)
        return 0
    for size in args.sizes.split(","):
        ns = f"stkscrape{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "bench.nftscrape", "--inner",
                                  "--sizes", size, "--readers", args.readers, "--runs", str(args.runs),
                                  "--seed", str(args.seed)],
                                 cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        got = json.loads(res.stdout.strip().splitlines()[-1])
        got["loadavg"] = os.getloadavg()
        print(json.dumps(got, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
