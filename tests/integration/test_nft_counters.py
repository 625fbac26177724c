"""The nftables counters a scrape reads (the raw NFT_MSG_GETRULE dump, nftcounters.py)
equal the libnftables reference, on a real table that counted real packets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.dataplane.base import Counters
from agent.dataplane.nftables import NftablesDataplane
from agent.ir import Direction, Program
from tests.kit import Lab
from tests.kit.builders import policy, snapshot_of
from tests.kit.enforcement import ALLOW_A_TO_B, DENY_B, B, build, cluster
from tests.kit.planes import Plane

EGRESS_C = policy("app/c-out", {"podSelector": {"matchLabels": {"app": "c"}}, "policyTypes": ["Egress"],
                                "egress": [{"ports": [{"port": 81}]}]})


@pytest.fixture
def plane(lab: Lab) -> Iterator[Plane]:
    build(lab)
    p = Plane(lab, "nftables")
    try:
        yield p
    finally:
        p.close()


def _both(plane: Plane, prog: Program | None = None) -> tuple[Counters, Counters]:
    dp = plane.dp
    assert isinstance(dp, NftablesDataplane)
    return plane.call(lambda: dp.counters(prog)), plane.call(lambda: dp.counters_libnftables(prog))


def test_the_dump_reads_what_libnftables_reads(lab: Lab, plane: Plane) -> None:
    prog = snapshot_of([*cluster(a={"app": "a", "role": "client"}), DENY_B, ALLOW_A_TO_B, EGRESS_C], "lab").program
    plane.apply(prog)
    raw, ref = _both(plane)
    assert raw == ref and raw.drops and all(n.packets == 0 for n in raw.drops.values())

    seen = lab.probe_many({"app/a": [f"tcp:{B}:80", f"tcp:{B}:81"], "app/c": [f"tcp:{B}:80", f"tcp:{B}:81"]})
    assert seen == {"app/a": {f"tcp:{B}:80": True, f"tcp:{B}:81": False},
                    "app/c": {f"tcp:{B}:80": False, f"tcp:{B}:81": False}}
    raw, ref = _both(plane)  # no traffic between the two reads: they see the same counts
    assert raw == ref
    assert raw.drops[("app/b", Direction.INGRESS)].packets >= 2  # a -> :81, c -> :81
    assert raw.drops[("app/c", Direction.EGRESS)].packets >= 1  # c -> :80
    counted = {k for k, n in raw.rules.items() if n.packets}
    assert ("app/b", Direction.INGRESS) in {(k[0], k[2]) for k in counted}
    assert ("app/c", Direction.EGRESS) in {(k[0], k[2]) for k in counted}

    plane.call(plane.dp.cleanup)  # no table: nothing to read, no error
    raw, ref = _both(plane, prog)
    assert raw == ref == Counters()
