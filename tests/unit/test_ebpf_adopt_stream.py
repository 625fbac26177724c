"""Adoption reads the pinned `peers`/`ports` maps a batch at a time and compares each
endpoint generation's run of entries with what its tables compile to: a run equal to it
keeps the endpoint's entries; a different one, or one listed in two runs, is rewritten;
entries of generations not in force are kept for the sweep."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from agent.dataplane.ebpf.layout import k_peer, u32
from agent.dataplane.ebpf.reconcile import EpState, Reconciler, _items, _runs
from agent.dataplane.ebpf.tables import DIR_CODE, entries
from agent.ir import Direction, DirectionProgram, EndpointProgram, Origin, PeerSet, PortMatch, Program, Rule


class ScanMap:
    """A map as `scan` lists it: fixed batches of (key, value)."""

    def __init__(self, items: list[tuple[bytes, bytes]], batch: int = 7) -> None:
        self.items, self.batch = items, batch
        self.key_size, self.value_size = (len(items[0][0]), len(items[0][1])) if items else (1, 1)

    def scan_packed(self) -> Iterator[tuple[bytes, bytes]]:
        for i in range(0, len(self.items), self.batch):
            part = self.items[i:i + self.batch]
            yield b"".join(k for k, _ in part), b"".join(v for _, v in part)

    def dump(self) -> list[tuple[bytes, bytes]]:
        return list(self.items)


def _program(n: int) -> Program:
    rules = tuple(Rule(Origin("file", "app", f"p{i}", Direction.INGRESS, 0),
                       PeerSet.of([ipaddress.ip_network(f"10.{i}.0.0/24"), ipaddress.ip_address(f"10.9.{i}.7"),
                                   ipaddress.ip_network("fd00::/64")]),
                       (PortMatch("tcp", 80 + i, 80 + i),), key=f"r{i}") for i in range(3))
    return Program("file", {f"app/e{i}": EndpointProgram(f"app/e{i}", (ipaddress.ip_address(f"10.0.0.{i + 1}"),),
                                                         ingress=DirectionProgram(True, rules[:i + 1]))
                            for i in range(n)})


def _adopted(program: Program) -> tuple[Reconciler, list[list[tuple[bytes, bytes]]], list[list[tuple[bytes, bytes]]]]:
    """A reconciler as adoption leaves it (every endpoint at generation 3, tables unknown)
    and each endpoint's pinned peers and ports items, as a previous agent wrote them."""
    r = Reconciler()
    r.eps = {}
    compiled = r._compile(program)
    peers, ports = [], []
    for i, key in enumerate(program.endpoints):
        counters = {(DIR_CODE[d], rid): 10 * i + j
                    for d, t in compiled[key].items() for j, rid in enumerate(t.rule_ids)}
        r.eps[key] = EpState(i + 1, 3, None, counters)
        p, q = entries(i + 1, counters, compiled[key], 3)
        peers.append(p)
        ports.append(q)
    r._adopted = True
    return r, peers, ports


def _verify(r: Reconciler, program: Program, peers: list[tuple[bytes, bytes]],
            ports: list[tuple[bytes, bytes]]) -> int:
    r.maps = {"peers": ScanMap(peers), "ports": ScanMap(ports), "learned": ScanMap([])}  # type: ignore[dict-item]
    return r._verify_adopted(r._compile(program), program)


def test_runs_split_by_endpoint_generation() -> None:
    a = [(k_peer(1, 3, 0, 4, n, 32), u32(1)) for n in range(5)]
    b = [(k_peer(2, 3, 0, 4, n, 32), u32(1)) for n in range(4)]
    old = [(k_peer(2, 2, 0, 4, n, 32), u32(1)) for n in range(3)]
    dead: list[bytes] = []
    m = ScanMap(a + old + b[:2] + a[:1] + b[2:], batch=3)
    runs = [(eg, _items(k, v, m.key_size, m.value_size)) for eg, k, v in _runs(m, {(1, 3)}, {(1, 3), (2, 3)}, dead)]
    assert [eg for eg, _ in runs] == [(1, 3), (2, 2), (2, 3), (1, 3), (2, 3)]
    assert runs[0][1] == dict(a) and runs[2][1] == {} and runs[3][1] == dict(a[:1])
    assert dead == [k for k, _ in old]


def test_equal_runs_are_kept_and_others_rewritten() -> None:
    program = _program(3)
    r, peers, ports = _adopted(program)
    assert _verify(r, program, [e for p in peers for e in p], [e for q in ports for e in q]) == 3
    assert all(st.tables is not None for st in r.eps.values())  # type: ignore[union-attr]
    # endpoint 2's peers listed in two runs (the first one whole, the second one an entry
    # more), endpoint 3's port value changed: both rewritten
    r, peers, ports = _adopted(program)
    split = peers[0] + peers[1] + peers[2] + [(k_peer(2, 3, DIR_CODE[Direction.INGRESS], 4, 12345, 32), u32(1))]
    k, v = ports[2][0]
    changed = ports[0] + ports[1] + [(k, u32(999) + v[4:])] + ports[2][1:]
    assert _verify(r, program, split, changed) == 1
    assert r.eps is not None
    assert [st.tables is not None for st in r.eps.values()] == [True, False, False]


def test_entries_of_generations_not_in_force_are_left_for_the_sweep() -> None:
    program = _program(2)
    r, peers, ports = _adopted(program)
    stale = [(k_peer(1, 2, DIR_CODE[Direction.INGRESS], 4, 7, 32), u32(1))]
    assert _verify(r, program, peers[0] + stale + peers[1], ports[0] + ports[1]) == 2
    assert r._read_keys == {"peers": [stale[0][0]], "ports": []}


def test_runs_in_any_order_are_compared_entry_by_entry() -> None:
    """The trie's own order (a prefix after those inside it) is compared as two blobs of
    bytes; any other order of the same entries still matches, entry by entry."""
    program = _program(3)
    r, peers, ports = _adopted(program)
    shuffled = [list(reversed(p)) for p in peers]
    assert _verify(r, program, [e for p in shuffled for e in p], [e for q in ports for e in q]) == 3
    # one batch holding several endpoints' runs and a run split across batches
    r, peers, ports = _adopted(program)
    r.maps = {"peers": ScanMap([e for p in peers for e in p], batch=1000),  # type: ignore[dict-item]
              "ports": ScanMap([e for q in ports for e in q], batch=2), "learned": ScanMap([])}
    assert r._verify_adopted(r._compile(program), program) == 3
