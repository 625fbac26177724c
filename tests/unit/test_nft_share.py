"""nftables peer sets shared by content: rule keys (policy rules) whose peers are equal use
one kernel set, its name kept while its content lives, so a change costs what it touches.

Scene: `web1` is selected by policy p1 (from role=client), `web2` by p2 (from tier=front);
the client pods carry both labels, so p1 and p2 have equal peers and share one set."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.dataplane.nftables import FAMILY, TABLE, Model, build_model, chain_name, render_diff, render_full
from agent.ir import Direction, Program
from tests.kit.builders import ns, pod, policy, snapshot_of
from tests.kit.nftns import nft_file, nft_json, throwaway_netns

WEB1 = pod("a/web1", "10.1.0.1", {"app": "web1"}, nodeName="n1")
WEB2 = pod("a/web2", "10.1.0.2", {"app": "web2"}, nodeName="n1")
BOTH = {"role": "client", "tier": "front"}


def _policy(name: str, app: str, peer: dict[str, str]) -> dict:
    return policy(f"a/{name}", {"podSelector": {"matchLabels": {"app": app}}, "ingress": [{
        "from": [{"podSelector": {"matchLabels": peer}}], "ports": [{"port": 80}]}]})


POLICIES = [_policy("p1", "web1", {"role": "client"}), _policy("p2", "web2", {"tier": "front"})]


def _program(clients: dict[int, dict[str, str]], policies: list[dict] = POLICIES) -> Program:
    pods = [pod(f"a/c{i}", f"10.1.1.{i}", labels) for i, labels in clients.items()]
    return snapshot_of([ns("a"), WEB1, WEB2, *pods, *policies], node="n1").program


def _sets_of(m: Model, endpoint: str) -> set[str]:
    """The peer sets named by an endpoint's ingress chain."""
    return set(re.findall(r"@(p_\w+?_[46]n?)\b", " ".join(m.chains[chain_name(endpoint, Direction.INGRESS)])))


def _peer_sets(m: Model) -> dict[str, frozenset[str]]:
    return {k: e for k, (_, e) in m.sets.items() if k.startswith("p_")}


def test_equal_peers_share_one_set() -> None:
    m = build_model(_program({1: BOTH, 2: BOTH}))
    assert _sets_of(m, "a/web1") == _sets_of(m, "a/web2")
    assert len(_peer_sets(m)) == 2  # one hash set per family, for both policies
    assert sorted(e for e in _peer_sets(m).values() if e) == [frozenset({"10.1.1.1", "10.1.1.2"})]
    assert len(m.shared) == 1 and len(next(iter(m.shared.values()))[1]) == 2  # two rule keys


def test_membership_change_of_a_shared_set_is_element_updates_once() -> None:
    old = build_model(_program({1: BOTH}))
    new = build_model(_program({1: BOTH, 2: BOTH}), prev=old)
    text, stats = render_diff(old, new)
    assert (stats.elements_added, stats.elements_removed, stats.chains_written) == (1, 0, 0)
    assert text.count("add element") == 1 and "10.1.1.2" in text


def test_divergence_gives_that_key_its_own_set_and_rewrites_only_its_lines() -> None:
    old = build_model(_program({1: BOTH, 2: BOTH}))
    shared = _sets_of(old, "a/web1")
    # c2 leaves tier=front: p2's peers are now {c1} only, p1's still {c1, c2}
    new = build_model(_program({1: BOTH, 2: {"role": "client"}}), prev=old)
    assert _sets_of(new, "a/web1") == shared  # p1 kept its content, so it keeps the set
    own = _sets_of(new, "a/web2")
    assert own.isdisjoint(shared)
    text, stats = render_diff(old, new)
    assert stats.chains_written == 1  # web2's chain only
    assert stats.elements_removed == 0 and stats.elements_added == 1  # the new set's one address
    assert text.index("add set") < text.index("add rule")
    assert "delete set" not in text


def test_reconvergence_returns_to_the_shared_set_and_drops_the_own_one() -> None:
    first = build_model(_program({1: BOTH, 2: BOTH}))
    apart = build_model(_program({1: BOTH, 2: {"role": "client"}}), prev=first)
    again = build_model(_program({1: BOTH, 2: BOTH}), prev=apart)
    assert _sets_of(again, "a/web2") == _sets_of(again, "a/web1") == _sets_of(first, "a/web1")
    text, stats = render_diff(apart, again)
    assert stats.chains_written == 1 and stats.elements_added == stats.elements_removed == 0
    assert text.count("delete set") == 2  # web2's own IPv4 and IPv6 sets
    assert text.index("add rule") < text.index("delete set")
    assert again == first  # back where a fresh load would be


def test_a_set_whose_content_changed_stays_with_most_of_its_keys() -> None:
    """Both policies' peers change the same way: the set keeps its name, elements move."""
    old = build_model(_program({1: BOTH, 2: BOTH}))
    new = build_model(_program({1: BOTH, 3: BOTH}), prev=old)
    assert _sets_of(new, "a/web1") == _sets_of(new, "a/web2") == _sets_of(old, "a/web1")
    _, stats = render_diff(old, new)
    assert (stats.elements_added, stats.elements_removed, stats.chains_written) == (1, 1, 0)


def test_without_history_names_follow_content_alone() -> None:
    prog = _program({1: BOTH, 2: {"role": "client"}})
    assert render_full(build_model(prog)) == render_full(build_model(prog))
    via = build_model(prog, prev=build_model(_program({1: BOTH, 2: BOTH})))
    assert Counter(_peer_sets(via).values()) == Counter(_peer_sets(build_model(prog)).values())


# ------------------------------------------------------------------ property

LABELS = st.sampled_from([{}, {"role": "client"}, {"tier": "front"}, BOTH])
STATES = st.dictionaries(st.integers(1, 4), LABELS, max_size=4)


def _check(m: Model, prog: Program) -> None:
    """Every rule's lines name sets holding exactly its peers; no two sets hold equal content."""
    contents = [c for c, _ in m.shared.values()]
    assert len(contents) == len(set(contents))
    for ep in prog.endpoints.values():
        for rule in ep.ingress.rules:
            if rule.peers is None:
                continue
            lines = [r for r in m.chains[chain_name(ep.key, Direction.INGRESS)] if f'"r:{rule.id}"' in r]
            named = set(re.findall(r"@(p_\w+?_[46]n?)\b", " ".join(lines)))
            held = {e for s in named for e in m.sets[s][1]}
            want = {t.removesuffix("/32").removesuffix("/128") for f in (4, 6) for t in rule.peers.texts(f)}
            assert held == want


@settings(max_examples=60, deadline=None)
@given(st.lists(STATES, min_size=1, max_size=6))
def test_any_event_sequence_keeps_sharing_exact_and_names_of_unchanged_content(states: list) -> None:
    prog = _program(states[0])
    m = build_model(prog)
    _check(m, prog)
    for state in states[1:]:
        prog2 = _program(state)
        m2 = build_model(prog2, prev=m)
        _check(m2, prog2)
        # a rule key whose peers did not change keeps its set: its lines are not rewritten
        for stem, (c, keys) in m.shared.items():
            for stem2, (c2, keys2) in m2.shared.items():
                if c2 == c and keys & keys2:
                    assert stem2 == stem
        # same sets' contents as a fresh load; only names may differ
        fresh = build_model(prog2)
        assert Counter(c for c, _ in m2.shared.values()) == Counter(c for c, _ in fresh.shared.values())
        render_diff(m, m2)
        m, prog = m2, prog2


# ------------------------------------------------------------------ kernel

def _mixed(name: str, app: str) -> dict:
    """Pods labelled role=client plus a prefix: peers with an interval set."""
    return policy(f"a/{name}", {"podSelector": {"matchLabels": {"app": app}}, "ingress": [{
        "from": [{"podSelector": {"matchLabels": {"role": "client"}}}, {"ipBlock": {"cidr": "192.168.0.0/24"}}]}]})


ALL_POLICIES = [*POLICIES, _mixed("p3", "web1"), _mixed("p4", "web2")]


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    with throwaway_netns("share") as name:
        yield name


def _kernel_sets(netns: str) -> dict[str, frozenset[str]]:
    sets = {}
    for obj in nft_json(netns, "table", FAMILY, TABLE):
        if "set" in obj and obj["set"]["name"].startswith("p_"):
            elems = set()
            for e in obj["set"].get("elem", []):
                p = e.get("prefix") if isinstance(e, dict) else None
                elems.add(f"{p['addr']}/{p['len']}" if p else str(e))
            sets[obj["set"]["name"]] = frozenset(elems)
    return sets


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(STATES, st.lists(st.sampled_from(range(4)), unique=True)), min_size=2, max_size=5))
def test_diffs_between_shared_sets_apply_in_the_kernel(netns: str, steps: list) -> None:
    """Each diff (sharing, divergence, re-convergence, prefix sets coming and going) is
    accepted by the kernel in one transaction and leaves exactly the model's sets."""
    m = None
    for clients, chosen in steps:
        new = build_model(_program(clients, [ALL_POLICIES[i] for i in sorted(chosen)]), prev=m)
        if m is None:
            nft_file(netns, f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n" + render_full(new))
        else:
            text, _ = render_diff(m, new)
            if text:
                nft_file(netns, text)
        assert _kernel_sets(netns) == _peer_sets(new)
        m = new
