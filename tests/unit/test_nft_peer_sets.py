"""nftables peer sets: single addresses in hash sets, prefixes in interval sets of their own.

nft (1.0.x) fetches every element of every interval set in the table before any element
command; with pod addresses in hash sets an update costs what it changes."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from agent.dataplane.nftables import HOSTS, NETS, build_model, render_diff, render_full
from tests.kit.builders import ns, pod, policy, snapshot_of

SERVER = pod("a/server", "10.1.0.1", {"app": "server"}, nodeName="n1")
CLIENT = pod("a/client", ["10.1.0.2", "fd00::2"], {"role": "client"})


def _policy(blocks: list[str]) -> dict:
    return policy("a/p", {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{
        "from": [{"podSelector": {"matchLabels": {"role": "client"}}}, *({"ipBlock": {"cidr": b}} for b in blocks)],
        "ports": [{"port": 80}]}]})


def _model(blocks: list[str], client: dict = CLIENT):  # type: ignore[no-untyped-def]
    return build_model(snapshot_of([ns("a"), SERVER, client, _policy(blocks)], node="n1").program)


def _peer_sets(m):  # type: ignore[no-untyped-def]
    return {name: v for name, v in m.sets.items() if name.startswith("p_")}


def test_addresses_in_hash_sets_prefixes_in_interval_sets() -> None:
    m = _model(["192.168.0.0/24", "192.168.1.7/32"])
    sets = _peer_sets(m)
    hosts4 = next(v for k, v in sets.items() if k.endswith("_4"))
    nets4 = next(v for k, v in sets.items() if k.endswith("_4n"))
    hosts6 = next(v for k, v in sets.items() if k.endswith("_6"))
    assert hosts4 == (HOSTS[4], frozenset({"10.1.0.2", "192.168.1.7"}))  # a /32 block is an address
    assert nets4 == (NETS[4], frozenset({"192.168.0.0/24"}))
    assert hosts6 == (HOSTS[6], frozenset({"fd00::2"}))
    assert not any(k.endswith("_6n") for k in sets)  # no IPv6 prefixes: no set, no line
    lines = next(iter(m.chains.values()))
    stem = next(k for k in sets if k.endswith("_4"))[:-2]
    assert sum(f"@{stem}_4 " in r for r in lines) == 1
    assert sum(f"@{stem}_4n " in r for r in lines) == 1
    assert sum(f"@{stem}_6 " in r for r in lines) == 1
    text = render_full(m)
    assert "flags interval" in text and f"set {stem}_4 {{ type ipv4_addr; }}" in text


def test_address_change_is_element_updates_only() -> None:
    old = _model(["192.168.0.0/24"])
    new = _model(["192.168.0.0/24"], pod("a/client", ["10.1.0.3", "fd00::2"], {"role": "client"}))
    text, stats = render_diff(old, new)
    assert (stats.elements_added, stats.elements_removed, stats.chains_written) == (1, 1, 0)
    assert "10.1.0.3" in text and "/32" not in text and "flush" not in text


def test_rule_gaining_or_losing_its_prefixes_is_rewritten() -> None:
    pods_only, mixed = _model([]), _model(["192.168.0.0/24"])
    assert not any(k.endswith("n") for k in _peer_sets(pods_only))
    text, stats = render_diff(pods_only, mixed)
    assert stats.chains_written == 1 and "add set" in text and "flags interval" in text
    assert text.index("add set") < text.index("add rule")  # the set exists before a rule names it
    text, stats = render_diff(mixed, pods_only)
    assert stats.chains_written == 1 and "delete set" in text
    assert text.index("flush chain") < text.index("delete set")  # no rule names it any more


def test_known_set_holds_every_address_even_adjacent_ones() -> None:
    """--unknown-endpoints=deny: adjacent pod addresses collapse into a prefix in a PeerSet;
    the `known` set of single addresses must still hold each of them (it once lost them)."""
    pods = [pod(f"a/p{i}", f"10.1.0.{i}", {"app": "x"}, nodeName="n1") for i in range(4, 8)]  # 10.1.0.4/30
    prog = snapshot_of([ns("a"), *pods], node="n1").program
    m = build_model(replace(prog, guard=(ipaddress.ip_network("10.1.0.0/24"),)))
    assert m.sets["known4"] == (HOSTS[4], frozenset({"10.1.0.4", "10.1.0.5", "10.1.0.6", "10.1.0.7"}))
