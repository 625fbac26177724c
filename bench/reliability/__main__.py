"""Reliability report: `python -m bench.reliability [--long]` from the repository root, as root.

Per dataplane (nftables, ebpf), each scenario in a fresh namespace lab: restart loop under
continuous TCP/UDP probes (a large update included), churn checked against `stockade matrix`
at quiescent points, fuzz through the manifest directory while the daemon runs, SIGKILL of
`apply`/`run` mid-transaction, foreign tc filters; and the NetBird fuzz (pure). Prints the
figures and writes bench/results/reliability-<timestamp>.json. Target: zero wrong verdicts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.kit.reliability import scenarios

SHORT = {"restarts": 3, "filler": 300, "changes": 30, "fuzz": 3, "kills": 1, "crash_filler": 150, "netbird": 200}
LONG = {"restarts": 50, "filler": 300, "changes": 1000, "fuzz": 40, "kills": 10, "crash_filler": 300,
        "netbird": 3000}
RESULTS = Path(__file__).resolve().parents[1] / "results"


def run_scenario(name: str, dataplane: str, p: dict[str, int], seed: int) -> dict[str, Any]:
    from tests.kit import Lab
    from tests.kit.privileges import dataplane_env

    work = Path(tempfile.mkdtemp(prefix=f"stk-rel-{name}-"))
    t0 = time.monotonic()
    try:
        with dataplane_env(dataplane, f"rel-{name}-{time.time_ns()}"), Lab() as lab:
            if name == "restart_loop":
                out = scenarios.restart_loop(lab, dataplane, work, p["restarts"], p["filler"], seed)
            elif name == "churn":
                out = scenarios.churn(lab, dataplane, work, p["changes"], seed)
            elif name == "dir_fuzz":
                out = scenarios.dir_fuzz(lab, dataplane, work, p["fuzz"], seed)
            elif name == "crash_safety":
                out = scenarios.crash_safety(lab, dataplane, work, p["kills"], p["crash_filler"], seed)
            else:
                out = scenarios.foreign_tc(lab, dataplane, work)
    except Exception as e:  # one broken scenario must not hide the others' figures
        text = f"{type(e).__name__}: {e}"  # its tail holds the agent's last words
        out = {"error": text if len(text) <= 6000 else f"{text[:1500]} [...] {text[-4500:]}",
               "failures": ["scenario crashed"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def netbird_fuzz(examples: int) -> dict[str, Any]:
    import logging

    from tests.kit.fuzz_netbird import check

    logging.getLogger("agent").setLevel(logging.CRITICAL)
    counter = [0]
    t0 = time.monotonic()
    try:
        check(examples, counter)
        failures: list[str] = []
    except AssertionError as e:
        failures = [str(e)[:2000]]
    return {"cases": counter[0], "failures": failures, "seconds": round(time.monotonic() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reliability")
    ap.add_argument("--long", action="store_true", help="the long run (50 restarts, 1,000 changes, ...)")
    ap.add_argument("--dataplane", action="append", choices=["nftables", "ebpf"])
    ap.add_argument("--scenario", action="append",
                    choices=["restart_loop", "churn", "dir_fuzz", "crash_safety", "foreign_tc", "netbird_fuzz"])
    ap.add_argument("--seed", type=int, default=20261121)
    args = ap.parse_args()
    p = LONG if args.long else SHORT
    names = args.scenario or ["restart_loop", "churn", "dir_fuzz", "crash_safety", "foreign_tc", "netbird_fuzz"]
    report: dict[str, Any] = {"mode": "long" if args.long else "short", "seed": args.seed, "params": p,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "dataplanes": {}}
    for dp in args.dataplane or ["nftables", "ebpf"]:
        res = report["dataplanes"][dp] = {}
        for name in names:
            if name == "netbird_fuzz":
                continue
            print(f"[{dp}] {name} ...", flush=True)
            res[name] = run_scenario(name, dp, p, args.seed)
            shown = {k: v for k, v in res[name].items() if k not in ("failures", "notes", "timeline",
                                                                     "agent_log_tail")}
            print(f"[{dp}] {name}: {json.dumps(shown)}", flush=True)
            for f in res[name].get("failures", [])[:10]:
                print(f"    ! {f}", flush=True)
            for f in res[name].get("notes", [])[:10]:
                print(f"    ? {f}", flush=True)
    if "netbird_fuzz" in names:
        print("[pure] netbird_fuzz ...", flush=True)
        report["netbird_fuzz"] = netbird_fuzz(p["netbird"])
        print(f"[pure] netbird_fuzz: {json.dumps(report['netbird_fuzz'])}", flush=True)
    totals = {"probes": 0, "wrong_verdicts": 0, "cross_endpoint_mixtures": 0, "restarts": 0, "kills": 0,
              "changes": 0, "scenario_errors": 0, "failures": 0,
              "fuzz_cases": report.get("netbird_fuzz", {}).get("cases", 0)}
    for res in report["dataplanes"].values():
        for name, r in res.items():
            totals["probes"] += r.get("probes", 0) + r.get("probes_while_restarting", 0)
            totals["wrong_verdicts"] += r.get("wrong_verdicts", r.get("disagreements", 0))
            totals["cross_endpoint_mixtures"] += r.get("cross_endpoint_mixtures", 0)
            totals["restarts"] += r.get("restarts", 0)
            totals["kills"] += r.get("kills", 0)
            totals["changes"] += r.get("changes", 0)
            totals["fuzz_cases"] += r.get("cases", 0) if name == "dir_fuzz" else 0
            totals["scenario_errors"] += "error" in r
            totals["failures"] += len(r.get("failures", []))  # every broken expectation, wrong verdicts included
    report["totals"] = totals
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"reliability-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print("\ntotals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
