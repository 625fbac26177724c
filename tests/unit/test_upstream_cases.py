"""The upstream Kubernetes e2e network-policy cases through the simulator (IPv4 and IPv6).

The same data drives the packet tests (tests/integration/test_upstream_packets.py)."""

from __future__ import annotations

import pytest

from agent.query import matrix
from tests.kit.builders import snapshot_of
from tests.kit.cases import all_probes, expected_grid, off_diagonal, pod_keys, step_objects

PROBES = all_probes()


def test_all_upstream_cases_are_present() -> None:
    names = {name for name, *_ in PROBES}
    assert len(names) == 48  # every It() of network_policy.go


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize(
    ("case", "step_index", "step", "probe"),
    PROBES,
    ids=[f"{n}-step{i}-{p['protocol']}-{p['port']}" for n, i, _, p in PROBES],
)
def test_upstream_case(case: str, step_index: int, step: dict, probe: dict, family: int) -> None:
    objects = step_objects(step, family)
    snap = snapshot_of(objects)
    assert not snap.problems, [str(p) for p in snap.problems]
    got = matrix(snap, str(probe["port"]), probe["protocol"], family)
    want = expected_grid(probe["expect"], pod_keys(objects))
    assert off_diagonal(got) == off_diagonal(want)
