"""Packets in the namespace lab follow events served over the watch protocol.

The fake API server listens on 127.0.0.1 *inside the lab's node namespace* (its socket is
created there), and the agent (`stockade run --source kubernetes`) runs in that namespace. Adding a
policy, changing a pod's label and deleting a namespace change which packets pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kit import Lab, kubernetes_lab, seconds_until
from tests.kit.builders import ns
from tests.kit.kubernetes_lab import A, B, D, api_in_netns, lab_pod


def test_watch_events_change_which_packets_pass(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    kubernetes_lab.watch_events_change_which_packets_pass(lab, dataplane, tmp_path)


@pytest.mark.parametrize("dataplane", ["nftables"], indirect=True)  # the guard is an nftables feature
def test_unknown_endpoints_deny_closes_the_start_up_window(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    for key, ip in (("x/a", A), ("x/b", B), ("x/d", D)):
        lab.add_pod(key, [ip])
    api = api_in_netns(lab.node)
    try:
        api.put(ns("x"))
        api.put(lab_pod("x/a", A, {"app": "a"}))
        api.put(lab_pod("x/b", B, {"app": "b"}))
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        lab.spawn_agent("run", "--source", "kubernetes", "--kubeconfig", str(kubeconfig), "--node", "lab",
                        "--dataplane", dataplane, "--state-dir", "", "--metrics-address", "127.0.0.1:9754",
                        "--unknown-endpoints", "deny", "--pod-cidr", "10.10.0.0/24")
        assert seconds_until(lambda: lab.http_get("http://127.0.0.1:9754/readyz")[0] == 200, 60), "never ready"
        assert lab.reachable("x/a", B, 80)
        # x/d exists on the node but the API has not reported it: both ways denied.
        assert not lab.reachable("x/a", D, 80, timeout=0.3)
        assert not lab.reachable("x/d", B, 80, timeout=0.3)
        api.put(lab_pod("x/d", D, {"app": "d"}))
        assert seconds_until(lambda: lab.reachable("x/a", D, 80, timeout=0.3)) is not None
        assert lab.reachable("x/d", B, 80)
    finally:
        api.close()
