"""Short runs of bench/reliability on both dataplanes (the long run: `python -m bench.reliability --long`).

Target everywhere: zero wrong verdicts, cross-endpoint mixtures included (one pod's new
egress with another pod's old ingress): the eBPF dataplane switches every endpoint with one
flip and judges a pod-to-pod packet for both ends under one half of its double buffer (docs/ebpf.md).
"""

from __future__ import annotations

from pathlib import Path

from tests.kit import Lab
from tests.kit.reliability import scenarios

SEED = 20261121


def test_restart_loop(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    res = scenarios.restart_loop(lab, dataplane, tmp_path, restarts=3, filler=300, seed=SEED)
    assert res["restarts"] == 3 and res["probes"] > 100
    assert res["cross_endpoint_mixtures"] == 0 and not res["failures"], res


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
    assert res["cross_endpoint_mixtures"] == 0 and not res["failures"], res


def test_foreign_tc_filters_survive(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    res = scenarios.foreign_tc(lab, dataplane, tmp_path)
    assert not res["failures"], res
