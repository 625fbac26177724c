"""bpfsys Map.dump: every (key, value) of a real map, read in batches (several, across the
`BATCH` boundary), on the map types adoption reads (LPM tries: peers, ports) and a hash
map; an empty map; and the one-by-one fallback when the kernel refuses batch lookups."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

import pytest

from agent.dataplane.ebpf import bpfsys
from tests.kit.privileges import require_privileges

LPM_TRIE, HASH = 11, 1
NO_PREALLOC = 1


@pytest.fixture
def make_map() -> Iterator:
    require_privileges()
    made: list[bpfsys.Map] = []

    def make(kind: int, key_size: int, entries: int) -> bpfsys.Map:
        attr = bpfsys._attr()
        for offset, value in ((0, kind), (4, key_size), (8, 4), (12, entries),
                              (16, NO_PREALLOC if kind == LPM_TRIE else 0)):
            bpfsys._put(attr, offset, ctypes.c_uint32, value)
        m = bpfsys.Map(bpfsys._bpf(bpfsys.MAP_CREATE, attr), "test")
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def lpm_items(n: int) -> list[tuple[bytes, bytes]]:
    # struct { u32 prefixlen; u8 data[4]; }: full-length prefixes and a few shorter ones
    out = [((32).to_bytes(4, "little") + i.to_bytes(4, "big"), (i * 7).to_bytes(4, "little")) for i in range(n)]
    out += [((p).to_bytes(4, "little") + bytes(4), p.to_bytes(4, "little")) for p in (0, 8, 16)]
    return out


@pytest.mark.parametrize("n", [0, 5, bpfsys.BATCH, 2 * bpfsys.BATCH + 17])
def test_dump_reads_every_entry_of_an_lpm_trie(make_map, n: int) -> None:  # type: ignore[no-untyped-def]
    m = make_map(LPM_TRIE, 8, 20_000)
    items = lpm_items(n) if n else []
    m.update_many(items)
    got = m.dump()
    assert len(got) == len(items)
    assert dict(got) == dict(items)


def test_dump_reads_a_hash_map(make_map) -> None:  # type: ignore[no-untyped-def]
    m = make_map(HASH, 4, 10_000)
    items = [(i.to_bytes(4, "little"), os.urandom(4)) for i in range(9_000)]
    m.update_many(items)
    assert dict(m.dump()) == dict(items)


def test_dump_falls_back_to_one_by_one(make_map, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    m = make_map(LPM_TRIE, 8, 1_000)
    items = lpm_items(100)
    m.update_many(items)
    real = bpfsys._bpf

    def no_lookup_batch(cmd: int, attr):  # type: ignore[no-untyped-def]
        if cmd == bpfsys.MAP_LOOKUP_BATCH:
            raise bpfsys.BpfError(bpfsys.ENOTSUPP, "not supported")
        return real(cmd, attr)

    monkeypatch.setattr(bpfsys, "_bpf", no_lookup_batch)
    assert dict(m.dump()) == dict(items)
