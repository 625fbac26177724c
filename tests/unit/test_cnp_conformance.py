"""The upstream ClusterNetworkPolicy conformance suite and our own tier cases (tests/data/cnp)
through the simulator: `snapshot_of` + `agent.query.matrix` for pod -> pod probes and
`agent.query.explain` for probes to a node address, TCP, UDP and SCTP, IPv4 and IPv6.

The same data drives the packet tests (tests/integration/test_cnp_packets.py)."""

from __future__ import annotations

import pytest

from tests.kit.cnp_cases import load_cases, simulate, steps

CASES = load_cases()
UPSTREAM = [c for c in CASES if c["origin"] == "upstream"]
PROFILE = {"ClusterNetworkPolicy", "ClusterNetworkPolicyNamedPorts", "ClusterNetworkPolicyEgressNodePeers"}


def test_the_whole_profile_is_translated() -> None:
    """All 24 ConformanceTests of the ClusterNetworkPolicy profile (13 Admin, 11 Baseline)."""
    names = [c["name"] for c in UPSTREAM]
    assert len(names) == len(set(names)) == 24
    assert all(set(c["features"]) <= PROFILE for c in UPSTREAM)
    assert {f for c in UPSTREAM for f in c["features"]} == PROFILE
    probes = [p for c in UPSTREAM for s in steps(c) for p in s.probes]
    assert {p.protocol for p in probes} == {"TCP", "UDP", "SCTP"}


def _params() -> list:
    return [
        pytest.param(case, step.index, family, id=f"{case['origin']}-{case['name']}-step{step.index}-v{family}")
        for family in (4, 6)
        for case in CASES
        for step in steps(case, family)
    ]


@pytest.mark.parametrize(("case", "index", "family"), _params())
def test_cnp_case(case: dict, index: int, family: int) -> None:
    step = list(steps(case, family))[index]
    assert step.probes, f"{case['name']} step {index} has no probe in IPv{family}"
    got = simulate(step)
    wrong = [f"{p} (got {v})" for p, v in got.items() if v != p.verdict]
    assert not wrong, f"{case['name']} step {index} {step.name!r}: " + "; ".join(wrong)
