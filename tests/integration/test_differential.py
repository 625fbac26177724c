"""Differential test (hypothesis): for generated small scenarios, `stockade matrix`, the
nftables dataplane and the eBPF dataplane agree on every probe."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.kit import Lab
from tests.kit.builders import ns, pod, policy
from tests.kit.enforcement import write
from tests.kit.fuzz_kubernetes import spec
from tests.kit.privileges import dataplane_env, require_privileges

PODS = {"a/x": "10.30.0.1", "a/y": "10.30.0.2", "b/z": "10.30.0.3", "b/w": "10.30.0.4"}
LABELS = {"a/x": {"app": "x", "tier": "web"}, "a/y": {"app": "y"}, "b/z": {"app": "z", "tier": "web"},
          "b/w": {"app": "w"}}
# Named port "http" is 80 on some pods and 8080 on others.
HTTP = {"a/x": 80, "a/y": 8080, "b/z": 80, "b/w": 8080}
PROBES = [(80, "TCP"), (8080, "TCP"), (53, "UDP")]


def cluster() -> list[dict]:
    return [ns("a", team="red"), ns("b", team="blue"),
            *(pod(k, ip, LABELS[k], nodeName="lab", ports=[{"name": "http", "containerPort": HTTP[k]}])
              for k, ip in PODS.items())]


def kernel_grid(lab: Lab, port: int, proto: str) -> dict[tuple[str, str], str]:
    spec_of = {d: f"{proto.lower()}:{PODS[d]}:{port}" for d in PODS}
    seen = lab.probe_many({s: [spec_of[d] for d in PODS if d != s] for s in PODS}, timeout=0.5)
    return {(s, d): "allow" if seen[s][spec_of[d]] else "deny" for s in PODS for d in PODS if s != d}


def matrix_grid(lab: Lab, src: Path, port: int, proto: str) -> dict[tuple[str, str], str]:
    out = lab.stockade("matrix", "--source", str(src), "--port", str(port), "--protocol", proto,
                       "--output", "json", "--state-dir", "")
    v = json.loads(out.stdout)["verdicts"]
    return {(s, d): v[s][d] for s in PODS for d in PODS if s != d}


def test_matrix_nftables_and_ebpf_agree(tmp_path: Path) -> None:
    require_privileges()
    with Lab() as lab:
        for key, ip in PODS.items():
            lab.add_pod(key, [ip], ports=(53, 80, 8080))
        counter = iter(range(10**6))

        @settings(max_examples=6, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(st.lists(st.tuples(spec, st.sampled_from(["a", "b"])), min_size=1, max_size=3))
        def scenario(generated: list) -> None:
            src = tmp_path / f"case{next(counter)}"
            docs = [policy(f"{n}/p{i}", s) for i, (s, n) in enumerate(generated)]
            write(src, [*cluster(), *docs])
            want = {pp: matrix_grid(lab, src, *pp) for pp in PROBES}
            for dataplane in ("nftables", "ebpf"):
                with dataplane_env(dataplane, f"diff-{src.name}-{dataplane}"):
                    res = lab.stockade("apply", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                                       "--state-dir", "", check=False)
                    assert res.returncode == 0, res.stderr
                    try:
                        for pp in PROBES:
                            got = kernel_grid(lab, *pp)
                            wrong = {k: (got[k], want[pp][k]) for k in got if got[k] != want[pp][k]}
                            assert not wrong, f"{dataplane} {pp} (kernel, matrix): {wrong}\n{docs}"
                    finally:
                        lab.stockade("cleanup", "--dataplane", dataplane, check=False)

        scenario()
