"""nftables rendering: membership changes are element updates, not rule rewrites."""

from __future__ import annotations

import ipaddress

from agent.dataplane.nftables import Options, build_model, chain_name, render_diff, tail_name
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
from tests.kit.builders import BASE, ns, pod, policy, snapshot_of

POLICIES = [
    policy("a/api", {"podSelector": {"matchLabels": {"app": "api"}}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"tier": "front"}}}], "ports": [{"port": 9090}]}]}),
]


def model(docs):  # type: ignore[no-untyped-def]
    return build_model(snapshot_of(docs, node="n1").program)


def test_label_change_is_only_set_element_updates() -> None:
    before = model([*BASE, pod("a/job", "10.0.0.5", {"app": "job"}), *POLICIES])
    after = model([*BASE, pod("a/job", "10.0.0.5", {"app": "job", "tier": "front"}), *POLICIES])
    text, stats = render_diff(before, after)
    lines = text.splitlines()
    assert lines and all(line.startswith(("add element", "delete element")) for line in lines), text
    assert stats.elements_added == 1 and stats.chains_written == 0


def test_new_pod_adds_map_and_set_elements_only() -> None:
    before = model([*BASE, *POLICIES])
    after = model([*BASE, pod("a/web2", "10.0.0.7", {"app": "web2", "tier": "front"}), *POLICIES])
    text, _ = render_diff(before, after)
    assert "add element inet stockade p_" in text
    assert "flush chain" not in text and "add rule" not in text


def test_policy_removal_deletes_its_chains_and_sets() -> None:
    before = model([*BASE, *POLICIES])
    text, _ = render_diff(before, model(BASE))
    assert "delete chain" in text and "delete set" in text
    # Jumps leave the verdict map before the chain is deleted.
    assert text.index("delete element inet stockade ingress4") < text.index("delete chain")


def test_no_change_is_an_empty_transaction() -> None:
    docs = [*BASE, ns("c"), *POLICIES]
    text, stats = render_diff(model(docs), model(docs))
    assert text == "" and stats.commands == 0


# ------------------------------------------------------------------ tiers
# (beside the packet proof in tests/integration/test_tiers_packets.py)

def _tiered(isolated: bool, with_pass: bool) -> Program:
    def o(tier: Tier, i: int) -> Origin:
        return Origin("file", "", "cnp", Direction.INGRESS, i, tier=tier, kind="ClusterNetworkPolicy", priority=1)
    peers = PeerSet.of([ipaddress.ip_network("10.0.0.0/24")])
    rules = (
        Rule(o(Tier.ADMIN, 0), peers, (PortMatch("tcp", 22, 22),), Verdict.DROP, key="deny"),
        *([Rule(o(Tier.ADMIN, 1), peers, (), Verdict.PASS, key="pass")] if with_pass else []),
        Rule(o(Tier.ADMIN, 2), None, (PortMatch("tcp", 80, 80),), Verdict.ACCEPT, key="accept"),
        Rule(Origin("file", "a", "np", Direction.INGRESS, 0), peers, (), Verdict.ACCEPT, key="np"),
        Rule(o(Tier.BASELINE, 0), None, (), Verdict.PASS, key="base"),
    )
    ep = EndpointProgram("a/web", (ipaddress.ip_address("10.0.0.9"),), ingress=DirectionProgram(isolated, rules))
    return Program("file", {"a/web": ep})


def test_admin_pass_splits_the_chain_into_a_tail() -> None:
    m = build_model(_tiered(isolated=False, with_pass=True))
    head = chain_name("a/web", Direction.INGRESS)
    tail = tail_name(head)
    assert set(m.chains) == {head, tail} and m.owners[tail] == m.owners[head]  # counters/drops read the tail
    pass_id = _tiered(False, True).endpoints["a/web"].ingress.rules[1].id
    gotos = [line for line in m.chains[head] if "goto" in line]
    # the Pass (one line per peer set: IPv4 addresses, IPv4 prefixes, IPv6 addresses) goes to
    # the tail, and so does the end of the ADMIN lines
    assert gotos == [line for line in m.chains[head] if f'counter goto {tail} comment "r:{pass_id}"' in line] \
        + [f"goto {tail}"] and len(gotos) == 4 and m.chains[head][-1] == f"goto {tail}"
    assert not any("goto" in line for line in m.chains[tail])
    # the tail: the NetworkPolicy lines, then the Baseline Pass, which allows (returns)
    assert m.chains[tail][-1].endswith('counter return comment "r:' + _tiered(False, True)
                                       .endpoints["a/web"].ingress.rules[-1].id + '"')


def test_no_pass_no_split_and_isolation_leaves_out_baseline() -> None:
    m = build_model(_tiered(isolated=True, with_pass=False))
    (chain,) = m.chains
    base_id = _tiered(True, False).endpoints["a/web"].ingress.rules[-1].id
    assert not any(base_id in line for line in m.chains[chain])  # never reached under isolation
    assert m.chains[chain][-1] == 'counter drop comment "default-deny"'
    audit = build_model(_tiered(isolated=False, with_pass=False), Options(audit=True))
    assert any(base_id in line for line in audit.chains[chain])


def test_diff_creates_tail_before_jumping_and_flushes_before_deleting() -> None:
    plain, split = build_model(_tiered(False, False)), build_model(_tiered(False, True))
    tail = tail_name(chain_name("a/web", Direction.INGRESS))
    text, _ = render_diff(plain, split)
    assert text.index(f"add chain inet stockade {tail}") < text.index(f"goto {tail}")
    text, _ = render_diff(split, plain)
    assert f"delete chain inet stockade {tail}" in text
    last_flush = max(i for i, line in enumerate(text.splitlines()) if line.startswith("flush chain"))
    first_delete = min(i for i, line in enumerate(text.splitlines()) if line.startswith("delete chain"))
    assert last_flush < first_delete
