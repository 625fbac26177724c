"""Short runs of bench/reliability on both dataplanes (the long run: `python -m bench.reliability --long`).

Target everywhere: zero wrong verdicts. One known exception is tolerated and counted on
eBPF only: a cross-endpoint mixture while an apply is in progress (agent/dataplane/ebpf.py
switches endpoints one by one, so for a moment one pod's new egress meets another pod's old
ingress). `_wrong` keeps those out of the assertion on eBPF and in it on nftables.
"""

from __future__ import annotations

from pathlib import Path

from bench.reliability import scenarios
from tests.lab import Lab

SEED = 20261121
# Flip to False once EbpfDataplane.apply switches every endpoint in one step.
EBPF_CROSS_ENDPOINT_KNOWN = True


def _wrong(res: dict, dataplane: str) -> list[str]:
    fails = res["failures"]
    if dataplane == "ebpf" and EBPF_CROSS_ENDPOINT_KNOWN:
        fails = [f for f in fails if "cross-endpoint" not in f]
    return fails


def test_restart_loop(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    res = scenarios.restart_loop(lab, dataplane, tmp_path, restarts=3, filler=300, seed=SEED)
    assert res["restarts"] == 3 and res["probes"] > 100
    assert not _wrong(res, dataplane), res


def test_churn_matches_matrix(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    res = scenarios.churn(lab, dataplane, tmp_path, changes=30, seed=SEED)
    assert res["quiescent_points"] > 5
    assert not res["failures"], res


def test_directory_fuzz_while_running(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    res = scenarios.dir_fuzz(lab, dataplane, tmp_path, examples=3, seed=SEED)
    assert res["cases"] == 3 and res["half_written"] >= 1
    assert not res["failures"], res


def test_kill_mid_transaction(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    res = scenarios.crash_safety(lab, dataplane, tmp_path, kills=1, filler=150, seed=SEED)
    assert not _wrong(res, dataplane), res


def test_foreign_tc_filters_survive(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    res = scenarios.foreign_tc(lab, dataplane, tmp_path, seed=SEED)
    assert not res["failures"], res
