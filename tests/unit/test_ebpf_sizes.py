"""eBPF map sizes: grown to twice the need (a power of two) when a program does not fit,
never shrunk, never past the limit; read back from a build's max_entries."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.dataplane.ebpf.layout import HEADROOM, LIMIT, SIZE_FIELD, Sizes, sizes_of

NEEDS = st.fixed_dictionaries({name: st.integers(0, 1 << 22) for name in SIZE_FIELD})


def test_fitting_need_changes_nothing() -> None:
    s = Sizes(peers=64)
    assert s.over({"peers": 64, "ports": 10}) == {}
    assert s.fit({"peers": 64}, LIMIT) == s


def test_grows_only_what_is_over_to_headroom() -> None:
    s = Sizes(peers=64, endpoints=8)
    grown = s.fit({"peers": 100, "epstate": 7, "ports": 5}, LIMIT)
    assert grown.peers == 256 and grown.endpoints == 8 and grown.ports == s.ports
    assert s.fit({"epstate": 8}, LIMIT).endpoints == 32  # id 0 is reserved: 8 ids need 17 slots -> 32


@given(NEEDS)
def test_grown_sizes_fit_within_limit(need: dict[str, int]) -> None:
    floor = Sizes(endpoints=8, addrs=16, peers=16, ports=16, counters=16)
    grown = floor.fit(need, LIMIT)
    beyond = LIMIT.over(need)
    for name, n in need.items():
        cap = grown.capacity()[name]
        field = SIZE_FIELD[name]
        assert getattr(grown, field) >= getattr(floor, field)  # never shrunk
        assert getattr(grown, field) <= getattr(LIMIT, field)
        assert getattr(grown, field) & (getattr(grown, field) - 1) == 0  # a power of two
        if name not in beyond:
            assert n <= cap
            if n > floor.capacity()[name]:
                assert cap >= min(HEADROOM * n, LIMIT.capacity()[name])


def test_sizes_read_back_from_max_entries() -> None:
    s = Sizes(endpoints=32, addrs=64, peers=1 << 20, ports=1 << 18, flows=1024, frags=512, counters=128, ifaces=16,
              node_addrs=8, samples=64)
    # as bpf/stockade.c declares them: the double-buffered maps hold two halves
    entries = {"epkeys": 32, "epstate": 64, "addrs": 128, "peers": 1 << 20, "ports": 1 << 18, "flows": 1024,
               "frags": 512, "counterinfo": 128, "rule_stats": 128, "ifcfg": 32, "nodeaddrs": 8, "samples": 64}
    assert sizes_of(entries) == s


def test_parse_sets_fields_and_refuses_nonsense() -> None:
    import pytest

    assert Sizes.parse("peers=64, ports=128") == Sizes(peers=64, ports=128)
    for bad in ("peer=64", "peers=0", "peers"):
        with pytest.raises(ValueError):
            Sizes.parse(bad)
