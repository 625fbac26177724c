"""The reconciler's compiled-tables cache: an endpoint direction whose program is the
same object or alike (same rules, peer sets by identity) keeps its tables without a
compile; any change compiles again, and every answer equals a fresh compile."""

from __future__ import annotations

import ipaddress

import pytest

from agent.dataplane.ebpf import compile_direction, reconcile
from agent.dataplane.ebpf.reconcile import Reconciler
from agent.ir import Direction, DirectionProgram, EndpointProgram, Origin, PeerSet, PortMatch, Program, Rule


def _rule(i: int, peers: PeerSet | None, port: int = 80) -> Rule:
    origin = Origin("file", "app", f"p{i}", Direction.INGRESS, 0)
    return Rule(origin, peers, (PortMatch("tcp", port, port),), key=f"r{i}")


def _program(rules: tuple[Rule, ...], n: int = 3) -> Program:
    eps = {f"app/e{i}": EndpointProgram(f"app/e{i}", (ipaddress.ip_address(f"10.0.0.{i + 1}"),),
                                        ingress=DirectionProgram(True, rules)) for i in range(n)}
    return Program("file", eps)


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[DirectionProgram]:
    seen: list[DirectionProgram] = []

    def counting(dp: DirectionProgram, cache=None):  # type: ignore[no-untyped-def]
        seen.append(dp)
        return compile_direction(dp, cache)

    monkeypatch.setattr(reconcile, "compile_direction", counting)
    return seen


def _check(r: Reconciler, prog: Program) -> dict:  # type: ignore[type-arg]
    out = r._compile(prog)
    for key, ep in prog.endpoints.items():
        for d in Direction:
            assert out[key][d] == compile_direction(ep.direction(d))
    return out


def test_tables_are_kept_for_alike_programs_and_recompiled_on_change(compiles: list[DirectionProgram]) -> None:
    r = Reconciler()
    peers = PeerSet.of([ipaddress.ip_network("10.1.0.0/24"), ipaddress.ip_address("10.2.0.7")])
    rules = (_rule(0, peers), _rule(1, None, 443))
    first = _check(r, _program(rules))
    assert len(compiles) == 2  # ingress (shared by the three endpoints) and egress
    again = _check(r, _program(rules))  # new program objects, the same rules
    assert len(compiles) == 2 and again["app/e0"][Direction.INGRESS] is first["app/e0"][Direction.INGRESS]
    # a peer set equal in value but another object: compiled again (once), equal tables
    twin = PeerSet(peers.nets)
    assert twin is not peers and twin == peers
    _check(r, _program((_rule(0, twin), _rule(1, None, 443))))
    assert len(compiles) == 3
    # a changed port, a changed peer set, a new rule: each compiled again
    for changed in ((_rule(0, twin, 81), rules[1]),
                    (_rule(0, PeerSet.of([ipaddress.ip_address("10.2.0.8")])), rules[1]),
                    (*rules, _rule(2, peers, 22))):
        before = len(compiles)
        _check(r, _program(changed))
        assert len(compiles) == before + 1
