"""ClusterNetworkPolicy conformance cases with real packets: kernel verdicts == simulator ==
expected, on both dataplanes.

One lab per dataplane (module scope): the eight house pods on the enforcing node `lab`, and
two namespaces holding the addresses of nodes worker-2 and worker-3 (where the hostNetwork
centaurs live) serving upstream's host-network ports. Each case's steps are written to a
manifest directory and applied with `stockade apply`; a step's TCP and UDP probes are sent
at once. SCTP cannot be opened on this kernel: the simulator test covers those probes
(tests/unit/test_cnp_conformance.py), and steps with only SCTP probes are not applied
(the next step's state includes their mutations anyway).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit import Lab
from tests.kit.cnp_cases import (
    HOST_NETWORK_PORT_START,
    load_cases,
    load_cluster,
    pod_ips,
    pod_keys,
    simulate,
    steps,
    to_v6,
    write_dir,
)
from tests.kit.privileges import DATAPLANES, dataplane_env, require_privileges

PACKET = ("TCP", "UDP")
CASES = [c for c in load_cases() if any(
    p.protocol in PACKET for s in steps(c) for p in s.probes)]
POD_PORTS = (80, 8080, 53, 5353)  # upstream's TCP and UDP servers (netprobe serves both on each)
NODE_PORTS = tuple(range(HOST_NETWORK_PORT_START, HOST_NETWORK_PORT_START + 8))


@pytest.fixture(scope="module", params=DATAPLANES)
def cnp_lab(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[tuple[Lab, str, Path]]:
    require_privileges()
    cluster4 = load_cluster()
    cluster6 = to_v6(cluster4)
    keys, ips4, ips6 = pod_keys(cluster4), pod_ips(cluster4), pod_ips(cluster6)
    with dataplane_env(request.param, f"cnp-{request.param}"), Lab() as lab:
        for name in sorted(ips4):
            if name in keys:
                lab.add_pod(keys[name], [ips4[name], ips6[name]], ports=POD_PORTS)
            else:  # a hostNetwork pod: a namespace holding its node's address
                lab.add_pod(f"node/{name}", [ips4[name], ips6[name]], ports=NODE_PORTS)
        yield lab, request.param, tmp_path_factory.mktemp("cnp")
        lab.stockade("cleanup", "--dataplane", request.param, check=False)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("case", CASES, ids=[f"{c['origin']}-{c['name']}" for c in CASES])
def test_cnp_case_packets(cnp_lab, case: dict, family: int) -> None:
    lab, dataplane, tmp = cnp_lab
    src = tmp / f"{case['name']}-{family}"
    state = tmp / f"state-{case['name']}-{family}"
    wrong: list[str] = []
    for step in steps(case, family):
        probes = [p for p in step.probes if p.protocol in PACKET]
        if not probes:
            continue
        write_dir(src, step.objects)
        res = lab.stockade("apply", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                           "--state-dir", str(state), check=False)
        assert res.returncode == 0, f"step {step.index}: {res.stderr}"
        simulated = simulate(step)
        keys, ips = pod_keys(step.objects), pod_ips(step.objects)
        spec = {p: f"{p.protocol.lower()}:{ips[p.dst]}:{p.port}" for p in probes}
        targets: dict[str, list[str]] = {}
        for p in probes:
            targets.setdefault(keys[p.src], []).append(spec[p])
        seen = lab.probe_many(targets)
        for p in probes:
            kernel = "allow" if seen[keys[p.src]][spec[p]] else "deny"
            if not kernel == simulated[p] == p.verdict:
                wrong.append(f"step {step.index} {p}: kernel {kernel}, simulator {simulated[p]}")
    assert not wrong, f"{dataplane} IPv{family} {case['name']}: " + "; ".join(wrong)
