"""The upstream ClusterNetworkPolicy conformance suite and our own tier cases (tests/data/cnp)
through the simulator: `snapshot_of` + `agent.query.matrix` for pod -> pod probes and
`agent.query.explain` for probes to a node address, TCP, UDP and SCTP, IPv4, IPv6 and
dual-stack.

The same data drives the packet tests (tests/integration/test_cnp_packets.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.kit.cnp_cases import NotExpressible, load_cases, simulate, steps, to_v1alpha1

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


FAMILIES = {"v4": 4, "v6": 6, "dual": None}  # dual: what the packet lab runs


def _params() -> list:
    return [
        pytest.param(case, step.index, family, id=f"{case['origin']}-{case['name']}-step{step.index}-{tag}")
        for tag, family in FAMILIES.items()
        for case in CASES
        for step in steps(case, family)
    ]


@pytest.mark.parametrize(("case", "index", "family"), _params())
def test_cnp_case(case: dict, index: int, family: int | None) -> None:
    step = list(steps(case, family))[index]
    assert step.checks, f"{case['name']} step {index} has no probe in {family or 'dual-stack'}"
    got = simulate(step)
    wrong = [f"{p} (got {v})" for (p, _), v in got.items() if v != p.verdict]
    assert not wrong, f"{case['name']} step {index} {step.name!r}: " + "; ".join(wrong)


def test_dual_stack_keeps_each_family() -> None:
    """The packet lab runs the cases dual-stack: every v4 address keeps its twin beside it."""
    case = next(c for c in CASES if c["name"] == "CNPAdminTierEgressInlineCIDRPeers")
    last = list(steps(case, None))[-1]
    cnp = next(o for o in last.objects if o["kind"] == "ClusterNetworkPolicy")
    assert cnp["spec"]["egress"][0]["to"][0]["networks"] == [
        "10.30.0.41/32", "fd00:30::a1e:29/128", "10.30.0.31/32", "fd00:30::a1e:1f/128"]
    assert {p.family for p, _ in last.checks} == {None} and {f for _, f in last.checks} == {4, 6}
    got = simulate(last)
    assert all(v == p.verdict for (p, _), v in got.items())


def _v1alpha1_params() -> list:
    out = []
    for case in CASES:
        for step in steps(case):
            try:
                to_v1alpha1(step.objects)
            except NotExpressible:
                continue
            out.append(pytest.param(case, step.index, id=f"{case['origin']}-{case['name']}-step{step.index}"))
    return out


@pytest.mark.parametrize(("case", "index"), _v1alpha1_params())
def test_cnp_case_as_v1alpha1(case: dict, index: int) -> None:
    """The same cases written as v1alpha1 AdminNetworkPolicy / BaselineAdminNetworkPolicy
    (what clusters that have not moved to ClusterNetworkPolicy still run): same verdicts."""
    step = list(steps(case))[index]
    old = replace(step, objects=to_v1alpha1(step.objects))
    assert not any(o["kind"] == "ClusterNetworkPolicy" for o in old.objects)
    got = simulate(old)
    wrong = [f"{p} (got {v})" for (p, _), v in got.items() if v != p.verdict]
    assert not wrong, f"{case['name']} step {index} {step.name!r}: " + "; ".join(wrong)
