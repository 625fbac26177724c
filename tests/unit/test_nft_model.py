"""nftables rendering: membership changes are element updates, not rule rewrites."""

from __future__ import annotations

from agent.dataplane.nftables import build_model, render_diff
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
