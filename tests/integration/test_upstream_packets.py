"""Upstream e2e cases with real packets: kernel verdicts == `stockade matrix` == expected.

One lab of nine pods (x/y/z by a/b/c) per module and dataplane; every case's steps are
applied with `stockade apply` inside the node namespace and every ordered pod pair is
probed over TCP and UDP. SCTP cannot be opened on this kernel: the simulator test
covers those cases (tests/unit/test_upstream_cases.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit import Lab
from tests.kit.cases import (
    expected_grid,
    load_cases,
    off_diagonal,
    pod_ips,
    pod_keys,
    step_objects,
    write_dir,
)
from tests.kit.privileges import DATAPLANES, dataplane_env, require_privileges

CASES = [c for c in load_cases() if any(
    p["protocol"] in ("TCP", "UDP") for s in c["steps"] for p in s["probes"])]


@pytest.fixture(scope="module", params=DATAPLANES)
def upstream_lab(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[tuple[Lab, str, Path]]:
    require_privileges()
    objects4 = step_objects({}, 4)
    objects6 = step_objects({}, 6)
    ips4, ips6 = pod_ips(objects4), pod_ips(objects6)
    with dataplane_env(request.param, f"upstream-{request.param}"), Lab() as lab:
        for key in pod_keys(objects4):
            lab.add_pod(key, [ips4[key], ips6[key]])
        yield lab, request.param, tmp_path_factory.mktemp("upstream")
        lab.stockade("cleanup", "--dataplane", request.param, check=False)


def _matrix_cli(lab: Lab, src: Path, port: str, proto: str) -> dict[str, dict[str, str]]:
    out = lab.stockade("matrix", "--source", str(src), "--port", port, "--protocol", proto,
                       "--output", "json", "--state-dir", "")
    return json.loads(out.stdout)["verdicts"]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_upstream_case_packets(upstream_lab, case: dict, family: int) -> None:
    lab, dataplane, tmp = upstream_lab
    src = tmp / f"{case['name']}-{family}"
    state = tmp / f"state-{case['name']}-{family}"
    for i, step in enumerate(case["steps"]):
        objects = step_objects(step, family)
        write_dir(src, objects)
        res = lab.stockade("apply", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                           "--state-dir", str(state), check=False)
        assert res.returncode == 0, res.stderr
        ips = pod_ips(objects)
        pods = pod_keys(objects)
        for probe in step["probes"]:
            proto = probe["protocol"]
            if proto == "SCTP":
                continue
            port = str(probe["port"])
            want = off_diagonal(expected_grid(probe["expect"], pods))
            simulated = off_diagonal(_matrix_cli(lab, src, port, proto))
            assert simulated == want, f"step {i}: matrix disagrees with upstream"
            targets = {
                s: [f"{proto.lower()}:{ips[d]}:{port}" for d in pods if d != s] for s in pods
            }
            seen = lab.probe_many(targets)
            kernel = {
                (s, d): "allow" if seen[s][f"{proto.lower()}:{ips[d]}:{port}"] else "deny"
                for s in pods for d in pods if d != s
            }
            wrong = {k: (v, want[k]) for k, v in kernel.items() if v != want[k]}
            assert not wrong, f"step {i} {proto}/{port}: kernel (got, want) differs: {wrong}"
