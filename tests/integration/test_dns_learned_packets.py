"""domainNames by real packets on both dataplanes, with a `Learned` table given directly (no
DNS yet): the rule's peers are exactly the addresses learned for (that pod, that rule).

Namespace app, every pod a subject of one Admin ClusterNetworkPolicy: Accept TCP/80 to
`*.example.test`, then Deny everything. Learned: a -> b's IPv4 and IPv6, c -> a.
- a reaches b on 80 over IPv4 and IPv6; not on 81 (the rule's port), not c (never learned);
- c reaches a; not b (b was learned by a: nothing is shared between pods);
- b learned nothing: its rule matches nothing and the Deny drops it;
- after the entries expire (the table recompiled at a later time) a no longer reaches b.
The simulator agrees with every probe. No dataplane code knows about names. On nftables
(which learns in the kernel) the table reaches the rules' own sets by `Dataplane.learn`,
and the expired entries leave them the same way.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.dataplane.base import LearnedEntry
from agent.ir import Program
from agent.policy.cluster import Learned
from agent.policy.cluster.domains import NO_LEARNED, learned_rule_key
from agent.policy.kubernetes.compile import compile_inventory
from tests.kit import Lab
from tests.kit.builders import ns, pod, snapshot_of
from tests.kit.planes import Plane, check_probes

A, B, C = "10.33.0.1", "10.33.0.2", "10.33.0.3"
A6, B6 = "fd00:33::1", "fd00:33::2"
SRC = {"app/a": (A, A6), "app/b": (B, B6), "app/c": (C, C)}
RULE = "file:cnp:names/egress/0"
CNP = {
    "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
    "metadata": {"name": "names"},
    "spec": {"tier": "Admin", "priority": 5, "subject": {"namespaces": {}}, "egress": [
        {"action": "Accept", "to": [{"domainNames": ["*.example.test"]}],
         "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
        {"action": "Deny", "to": [{"networks": ["0.0.0.0/0", "::/0"]}]},
    ]},
}
DOCS: list[dict[str, Any]] = [ns("app"), pod("app/a", [A, A6]), pod("app/b", [B, B6]), pod("app/c", [C]), CNP]
PROBES = {
    "app/a": [f"tcp:{B}:80", f"tcp:{B6}:80", f"tcp:{B}:81", f"tcp:{C}:80"],
    "app/c": [f"tcp:{A}:80", f"tcp:{B}:80"],
    "app/b": [f"tcp:{A}:80", f"tcp:{C}:80"],
}
WANT = {
    "app/a": {f"tcp:{B}:80": True, f"tcp:{B6}:80": True, f"tcp:{B}:81": False, f"tcp:{C}:80": False},
    "app/c": {f"tcp:{A}:80": True, f"tcp:{B}:80": False},
    "app/b": {f"tcp:{A}:80": False, f"tcp:{C}:80": False},
}
EXPIRED = {**WANT, "app/a": {k: False for k in WANT["app/a"]}}


def learned() -> Learned:
    ip = ipaddress.ip_address
    return Learned.of([("app/a", RULE, ip(B), 100.0), ("app/a", RULE, ip(B6), 100.0), ("app/c", RULE, ip(A), 200.0)])


def program(table: Learned) -> Program:
    s = snapshot_of(DOCS)
    assert not s.problems, [str(p) for p in s.problems]
    return compile_inventory(s.inventory, None, "file", table)


@pytest.fixture
def plane(lab: Lab, dataplane: str) -> Iterator[Plane]:
    for key, ips in (("app/a", [A, A6]), ("app/b", [B, B6]), ("app/c", [C])):
        lab.add_pod(key, ips)
    p = Plane(lab, dataplane)
    try:
        yield p
    finally:
        p.close()


def check(lab: Lab, prog: Program, want: dict[str, dict[str, bool]]) -> None:
    check_probes(lab, prog, PROBES, SRC, want)


def enforce(plane: Plane, table: Learned, gone: Learned = NO_LEARNED) -> Program:
    """The program compiled with `table` applied; on a dataplane that learns in the kernel
    (its rules' peers ignored) `table` goes to its learned sets, and `gone` out of them."""
    prog = program(table)
    plane.call(lambda: plane.dp.apply(prog))
    if plane.dp.learns_in_kernel:
        def entries(t: Learned) -> list[LearnedEntry]:
            return [LearnedEntry(learned_rule_key(rule, ep), ip, time.monotonic() + 300)
                    for (ep, rule), v in t.entries.items() for ip in v]
        plane.call(lambda: plane.dp.learn(entries(table), entries(gone)))
    return prog


def test_learned_addresses_are_enforced_per_pod(lab: Lab, plane: Plane) -> None:
    prog = enforce(plane, learned())
    check(lab, prog, WANT)
    # a's entries expire at 100: recompiled at 150, only c's entry is left
    left = learned().expire(150.0)
    later = enforce(plane, left, Learned.of((ep, r, ip, t) for (ep, r), v in learned().entries.items()
                                            for ip, t in v.items() if ip not in left.addresses(ep, r)))
    check(lab, later, EXPIRED)
