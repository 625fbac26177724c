"""A first load into a kernel without our table goes in bounded transactions (sets, their
elements, endpoint chains, then the maps and base chains that make the table judge), so
its peak memory is one batch's parse; over an existing table (a restart) new peer sets are
staged beside the old ones and one transaction switches. Checked against a real kernel in
throwaway network namespaces."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator

import pytest

from agent.dataplane import nftables
from agent.dataplane.base import DataplaneError
from agent.dataplane.nftables import FAMILY, TABLE, NftablesDataplane, build_model, render_full, render_staged
from agent.ir import (
    Direction,
    DirectionProgram,
    EndpointProgram,
    Origin,
    PeerSet,
    PortMatch,
    Program,
    Rule,
    Tier,
    Verdict,
)
from tests.kit.builders import snapshot_of
from tests.kit.generate import generate
from tests.kit.netns import inside
from tests.kit.nftns import nft_file, nft_json, table_objects, throwaway_netns


@pytest.fixture
def two() -> Iterator[tuple[str, str]]:
    with throwaway_netns("stgA") as a, throwaway_netns("stgB") as b:
        yield a, b


def _table(ns: str, by_content: bool = False) -> list[str]:
    return table_objects(ns, FAMILY, TABLE, by_content)


def _cluster() -> Program:
    cl = generate(600, 40, seed=3)
    return snapshot_of(cl.objects(), cl.node).program


def _tiered() -> Program:
    """One endpoint with an ADMIN Pass (a head chain and its tail) beside plain ones."""
    def o(tier: Tier, i: int) -> Origin:
        return Origin("file", "", "cnp", Direction.INGRESS, i, tier=tier, kind="ClusterNetworkPolicy", priority=1)
    peers = PeerSet.of([ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_address("10.9.0.1")])
    rules = (Rule(o(Tier.ADMIN, 0), peers, (), Verdict.PASS, key="pass"),
             Rule(Origin("file", "a", "np", Direction.INGRESS, 0), peers, (PortMatch("tcp", 80, 80),), key="np"),
             Rule(o(Tier.BASELINE, 0), None, (), Verdict.PASS, key="base"))
    eps = {f"a/w{i}": EndpointProgram(f"a/w{i}", (ipaddress.ip_address(f"10.0.1.{i}"),),
                                      ingress=DirectionProgram(i % 2 == 0, rules)) for i in range(1, 6)}
    return Program("file", eps)


@pytest.mark.parametrize("make", [_cluster, _tiered])
def test_staged_load_leaves_what_one_transaction_leaves(two: tuple[str, str], make) -> None:  # type: ignore[no-untyped-def]
    m = build_model(make())
    staged, whole = two
    texts = list(render_staged(m, elements=7, lines=3))  # tiny batches: many transactions
    assert len(texts) > 4
    for text in texts[:-1]:  # nothing hooks the table before the last transaction
        assert "hook" not in text
    for text in texts:
        nft_file(staged, text)
    nft_file(whole, render_full(m))
    assert _table(staged) == _table(whole)


def test_a_tail_chain_goes_in_its_head_chains_batch() -> None:
    m = build_model(_tiered())
    for text in render_staged(m, elements=7, lines=1):
        heads = set(re.findall(r"chain (in_[0-9a-f]{32})\b(?!_t)", text))
        tails = {t[:-2] for t in re.findall(r"chain (in_[0-9a-f]{32}_t)", text)}
        assert tails <= heads


def _cluster2() -> Program:
    cl = generate(600, 40, seed=4)
    return snapshot_of(cl.objects(), cl.node).program


def test_dataplane_loads_staged_when_no_table(two: tuple[str, str], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    prog = _cluster()
    ns, ref = two
    nft_file(ref, render_full(build_model(prog)))
    staged: list[int] = []
    real = nftables.render_staged
    monkeypatch.setattr(nftables, "render_staged", lambda m: (staged.append(1), *real(m))[1:])
    with inside(ns):
        dp = NftablesDataplane()
        assert dp.apply(prog).full and staged == [1]
        assert _table(ns) == _table(ref)
        dp.cleanup()


@pytest.mark.parametrize(("before", "after"), [(_cluster, _cluster), (_cluster, _cluster2), (_cluster, _tiered),
                                               (_tiered, _cluster)])
def test_a_restart_replaces_the_table_in_place(two: tuple[str, str], before, after, caplog) -> None:  # type: ignore[no-untyped-def]
    """A restarted agent (a new dataplane object) over the table the last one left: new peer
    sets are staged beside the old ones, one transaction switches; the kernel then holds
    what a fresh load holds (peer-set names aside), and later diffs apply on top."""
    ns, ref = two
    new = after()
    with inside(ns):
        NftablesDataplane().apply(before())
        dp = NftablesDataplane()
        assert dp.apply(new).full
        assert "replacing it whole" not in caplog.text
        nft_file(ref, render_full(build_model(new)))
        assert _table(ns, by_content=True) == _table(ref, by_content=True)
        assert not dp.apply(before()).full  # a diff from the adopted names
        nft_file(ref, f"delete table {FAMILY} {TABLE}\n" + render_full(build_model(before())))
        assert _table(ns, by_content=True) == _table(ref, by_content=True)
        dp.cleanup()


def test_only_the_last_replacing_transaction_touches_a_chain() -> None:
    old = build_model(_cluster())
    held_sets = frozenset(old.sets)
    held_chains = frozenset([*old.chains, *nftables.BASE_CHAINS])
    avoid = frozenset(n.rsplit("_", 1)[0] for n in held_sets if n.startswith("p_"))
    new = build_model(_cluster2(), avoid=avoid)
    texts = list(nftables.render_replace(new, held_sets, held_chains, elements=50))
    assert len(texts) > 3 and not {n for n in new.sets if n.startswith("p_")} & held_sets
    for text in texts[:-1]:
        assert "chain" not in text and "flush" not in text and "delete" not in text


def test_a_failed_in_place_replace_falls_back_to_one_whole_transaction(two: tuple[str, str], monkeypatch,
                                                                       caplog) -> None:  # type: ignore[no-untyped-def]
    ns, ref = two
    real = nftables.render_replace

    def broken(m, *a):  # type: ignore[no-untyped-def]
        texts = list(real(m, *a))
        yield from texts[:1]
        yield "add rule inet stockade nosuchchain accept\n"

    monkeypatch.setattr(nftables, "render_replace", broken)
    with inside(ns):
        NftablesDataplane().apply(_tiered())
        dp = NftablesDataplane()
        assert dp.apply(_cluster()).full
        assert "replacing it whole" in caplog.text
        nft_file(ref, render_full(build_model(_cluster())))
        assert _table(ns, by_content=True) == _table(ref, by_content=True)
        dp.cleanup()


def test_a_failed_staged_load_leaves_no_table(two: tuple[str, str], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    prog = _cluster()
    ns, _ = two
    real = nftables.render_staged

    def broken(m):  # type: ignore[no-untyped-def]
        texts = list(real(m))
        yield from texts[:2]
        yield "add rule inet stockade nosuchchain accept\n"

    monkeypatch.setattr(nftables, "render_staged", broken)
    with inside(ns):
        dp = NftablesDataplane()
        with pytest.raises(DataplaneError):
            dp.apply(prog)
        assert not [o for o in nft_json(ns, "tables") if o.get("table", {}).get("name") == TABLE]
        monkeypatch.setattr(nftables, "render_staged", real)
        assert dp.apply(prog).full  # the next sync starts afresh
        dp.cleanup()
