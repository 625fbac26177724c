"""ClusterNetworkPolicy conformance cases with real packets: kernel verdicts == simulator ==
expected, on both dataplanes.

One lab per dataplane (module scope): the eight house pods on the enforcing node `lab`, and
two namespaces holding the addresses of nodes worker-2 and worker-3 (where the hostNetwork
centaurs live) serving upstream's host-network ports. The cases run dual-stack (every pod,
node and CIDR with its IPv6 twin, tests/kit/cnp_cases.py `to_dual`), so one `stockade
apply` per step serves the IPv4 and the IPv6 probes, which are all sent at once.
SCTP cannot be opened on this kernel: the simulator test covers those probes
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
    pod_addresses,
    pod_keys,
    simulate,
    steps,
    to_dual,
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
    cluster = to_dual(load_cluster())
    keys, ips = pod_keys(cluster), pod_addresses(cluster)
    with dataplane_env(request.param, f"cnp-{request.param}"), Lab() as lab:
        for name in sorted(ips):
            both = [ips[name][4], ips[name][6]]
            if name in keys:
                lab.add_pod(keys[name], both, ports=POD_PORTS)
            else:  # a hostNetwork pod: a namespace holding its node's addresses
                lab.add_pod(f"node/{name}", both, ports=NODE_PORTS)
        yield lab, request.param, tmp_path_factory.mktemp("cnp")
        lab.stockade("cleanup", "--dataplane", request.param, check=False)


@pytest.mark.parametrize("case", CASES, ids=[f"{c['origin']}-{c['name']}" for c in CASES])
def test_cnp_case_packets(cnp_lab, case: dict) -> None:
    lab, dataplane, tmp = cnp_lab
    src, state = tmp / case["name"], tmp / f"state-{case['name']}"
    wrong: list[str] = []
    for step in steps(case, None):
        checks = [(p, f) for p, f in step.checks if p.protocol in PACKET]
        if not checks:
            continue
        write_dir(src, step.objects)
        res = lab.stockade("apply", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                           "--state-dir", str(state), check=False)
        assert res.returncode == 0, f"step {step.index}: {res.stderr}"
        simulated = simulate(step)
        keys, ips = pod_keys(step.objects), pod_addresses(step.objects)
        spec = {(p, f): f"{p.protocol.lower()}:{ips[p.dst][f]}:{p.port}" for p, f in checks}
        targets: dict[str, list[str]] = {}
        for (p, _), s in spec.items():
            targets.setdefault(keys[p.src], []).append(s)
        seen = lab.probe_many(targets)
        for p, f in checks:
            kernel = "allow" if seen[keys[p.src]][spec[p, f]] else "deny"
            if not kernel == simulated[p, f] == p.verdict:
                wrong.append(f"step {step.index} {p} IPv{f}: kernel {kernel}, simulator {simulated[p, f]}")
    assert not wrong, f"{dataplane} {case['name']}: " + "; ".join(wrong)
