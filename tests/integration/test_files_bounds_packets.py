"""A hostile manifest file beside a valid default deny, on every dataplane, by packets.

`stockade apply` must finish, report the file (exit 2), and enforce the valid policy;
a policy file later turned into a bomb must keep its policy in force in the next
`apply` (a new process: only the state directory remembers it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from tests.kit import ROOT, Lab
from tests.kit.builders import ns, pod, policy
from tests.kit.hostile_files import BOMB, SELF_ALIAS

A, B = "10.21.0.1", "10.21.0.2"
DENY_B = policy("app/deny-b", {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]})


def apply(lab: Lab, src: Path, dataplane: str) -> tuple[int, str]:
    # A deadline so a regression shows as a failure, not a hung suite.
    res = lab.node_sh(sys.executable, "-m", "agent.cli", "apply", "--source", str(src), "--node", "lab",
                      "--dataplane", dataplane, "--state-dir", str(src.parent / "state"),
                      check=False, cwd=ROOT, timeout=120)
    return res.returncode, res.stderr


def test_bomb_beside_a_default_deny_and_a_deny_turned_bomb(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    lab.add_pod("app/a", [A], ports=(80,))
    lab.add_pod("app/b", [B], ports=(80,))
    src = tmp_path / "src"
    src.mkdir()
    (src / "cluster.yaml").write_text(yaml.safe_dump_all([
        ns("app"), pod("app/a", A, {"app": "a"}, nodeName="lab"), pod("app/b", B, {"app": "b"}, nodeName="lab")]))
    (src / "deny.yaml").write_text(yaml.safe_dump(DENY_B))
    (src / "bomb.yaml").write_text(BOMB)
    rc, err = apply(lab, src, dataplane)
    assert rc == 2 and "bomb.yaml" in err and "aliases are not accepted" in err, err
    expected = {"app/a": {f"tcp:{B}:80": False}, "app/b": {f"tcp:{A}:80": True}}
    assert lab.probe_many({"app/a": [f"tcp:{B}:80"], "app/b": [f"tcp:{A}:80"]}) == expected

    (src / "deny.yaml").write_text(SELF_ALIAS)  # the policy's own file goes bad
    rc, err = apply(lab, src, dataplane)
    assert rc == 2 and "deny.yaml" in err and "bomb.yaml" in err, err
    assert lab.probe_many({"app/a": [f"tcp:{B}:80"], "app/b": [f"tcp:{A}:80"]}) == expected
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["last-good.files.json", "last-good.json"]
