"""nftables peer sets shared by content, under a running daemon, by packets.

Two policies select different pods (b, c) from peers chosen by different labels that pod a
carries both of: their peers are equal, so the table holds one peer set both rules name.
a then loses one label (the policies' peers diverge: c's rule gets a set of its own, its
lines rewritten in the same transaction), gets it back (re-converged: one set again), and a
new agent takes over the table of a killed one. Verdicts are checked by packets at every
step, and the table's sets by `nft list`.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.kit import Lab, until
from tests.kit.builders import policy
from tests.kit.enforcement import A6, B6, A, B, C, build, cluster, write

TO_B = policy("app/to-b", {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [{
    "from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": 80}]}]})
TO_C = policy("app/to-c", {"podSelector": {"matchLabels": {"app": "c"}}, "ingress": [{
    "from": [{"podSelector": {"matchLabels": {"tier": "front"}}}], "ports": [{"port": 80}]}]})
BOTH = {"app": "a", "role": "client", "tier": "front"}
CLIENT_ONLY = {"app": "a", "role": "client"}


def _reach(lab: Lab, want: dict[tuple[str, str], bool]) -> bool:
    specs: dict[str, list[str]] = {}
    for src, dst in want:
        specs.setdefault(src, []).append(f"tcp:{dst}:80")
    seen = lab.probe_many(specs, timeout=0.5)
    return all(seen[src][f"tcp:{dst}:80"] == ok for (src, dst), ok in want.items())


def _peer_sets(lab: Lab) -> dict[str, set[str]]:
    """The table's peer sets (by family suffix) and their elements, as the kernel lists them."""
    text = lab.node_sh("nft", "list table inet stockade").stdout
    out = {}
    for name, body in re.findall(r"set (p_[0-9a-f]+_[46]n?) \{(.*?)\n\t\}", text, re.S):
        m = re.search(r"elements = \{(.*?)\}", body, re.S)
        out[name] = {e.strip() for e in m.group(1).split(",")} if m else set()
    return out


def _stems(lab: Lab) -> int:
    return len({n.rsplit("_", 1)[0] for n in _peer_sets(lab)})


def _spawn(lab: Lab, tmp_path: Path, src: Path):  # type: ignore[no-untyped-def]
    agent = lab.spawn_agent("run", "--source", str(src), "--node", "lab", "--dataplane", "nftables",
                            "--state-dir", str(tmp_path / "state"), "--metrics-address", "127.0.0.1:9755")
    assert until(lambda: lab.http_get("http://127.0.0.1:9755/readyz")[0] == 200, 60), lab.agent_output(agent)
    return agent


SHARED = {("app/a", B): True, ("app/a", B6): True, ("app/a", C): True, ("app/c", B): False, ("app/b", C): False}
APART = {("app/a", B): True, ("app/a", B6): True, ("app/a", C): False, ("app/c", B): False, ("app/b", C): False}


@pytest.mark.parametrize("dataplane", ["nftables"], indirect=True)
def test_identical_peers_share_one_set_through_divergence_and_restart(lab: Lab, dataplane: str,
                                                                       tmp_path: Path) -> None:
    build(lab)
    src = tmp_path / "src"
    write(src, [*cluster(a=BOTH), TO_B, TO_C])
    agent = _spawn(lab, tmp_path, src)
    assert until(lambda: _reach(lab, SHARED), 20)
    assert _stems(lab) == 1  # both rules name one set (per family)
    assert {A, A6} == set().union(*_peer_sets(lab).values())

    # a loses tier=front: to-c's peers are now empty, to-b's unchanged: two sets.
    write(src, [*cluster(a=CLIENT_ONLY), TO_B, TO_C])
    assert until(lambda: _reach(lab, APART), 20)
    assert until(lambda: _stems(lab) == 2, 20)

    # a gets it back: one set again, and c admits a again.
    write(src, [*cluster(a=BOTH), TO_B, TO_C])
    assert until(lambda: _reach(lab, SHARED), 20)
    assert until(lambda: _stems(lab) == 1, 20)

    # Apart again, then the agent dies without cleanup; a new one takes over the table.
    write(src, [*cluster(a=CLIENT_ONLY), TO_B, TO_C])
    assert until(lambda: _reach(lab, APART), 20)
    agent.send_signal(signal.SIGKILL)
    agent.wait(timeout=30)
    assert _reach(lab, APART)  # the killed agent's table still enforces
    agent = _spawn(lab, tmp_path, src)
    assert until(lambda: _reach(lab, APART), 20)
    assert _stems(lab) == 2
    write(src, [*cluster(a=BOTH), TO_B, TO_C])
    assert until(lambda: _reach(lab, SHARED), 20)
    assert until(lambda: _stems(lab) == 1, 20)
    assert agent.poll() is None, lab.agent_output(agent)
    assert "sync failed" not in lab.agent_output(agent)
