"""The Kubernetes packet lab: the fake API server listening in the node namespace, lab pods,
and the watch-driven scenario (also run with the DaemonSet's privileges)."""

from __future__ import annotations

from pathlib import Path

from tests.kit import Lab, seconds_until
from tests.kit import netns as netns_
from tests.kit.builders import ns, pod, policy
from tests.kit.kubeapi import FakeKubeAPI

A, B, C, D = "10.10.0.11", "10.10.0.12", "10.10.0.21", "10.10.0.13"


def api_in_netns(netns: str) -> FakeKubeAPI:
    """The fake API server, listening in `netns` (where the agent runs), started."""
    api = FakeKubeAPI()
    api.server.socket.close()
    api.server.socket = netns_.listener(netns)
    api.server.server_address = api.server.socket.getsockname()
    api.start()
    return api


def lab_pod(key: str, ip: str, labels: dict[str, str]) -> dict:
    return pod(key, ip, labels, ports=[{"name": "http", "containerPort": 80, "protocol": "TCP"}],
               nodeName="lab")


def watch_events_change_which_packets_pass(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    for key, ip in (("x/a", A), ("x/b", B), ("y/c", C), ("x/d", D)):
        lab.add_pod(key, [ip])
    api = api_in_netns(lab.node)
    try:
        api.put(ns("x"))
        api.put(ns("y"))
        api.put(lab_pod("x/a", A, {"app": "a"}))
        api.put(lab_pod("x/b", B, {"app": "b"}))
        api.put(lab_pod("y/c", C, {"app": "c"}))
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")

        agent_proc = lab.spawn_agent("run", "--source", "kubernetes", "--kubeconfig", str(kubeconfig),
                                     "--node", "lab", "--dataplane", dataplane, "--state-dir", "",
                                     "--metrics-address", "127.0.0.1:9754")
        assert seconds_until(lambda: lab.http_get("http://127.0.0.1:9754/readyz")[0] == 200, 60), "never ready"
        assert lab.reachable("x/a", B, 80) and lab.reachable("y/c", B, 80)

        # A policy is added: b accepts only pods labelled role=client, from any namespace.
        api.put(policy("x/b-from-clients", {
            "podSelector": {"matchLabels": {"app": "b"}},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}}]}],
        }))
        t_policy = seconds_until(lambda: not lab.reachable("y/c", B, 80, timeout=0.3))
        assert t_policy is not None, "policy never enforced"
        assert not lab.reachable("x/a", B, 80, timeout=0.3)

        # A pod's label changes: c becomes a client.
        api.put(lab_pod("y/c", C, {"app": "c", "role": "client"}))
        t_label = seconds_until(lambda: lab.reachable("y/c", B, 80, timeout=0.3))
        assert t_label is not None, "label change never enforced"
        assert not lab.reachable("x/a", B, 80, timeout=0.3)

        # The namespace is deleted (its pods go with it): c's address is nobody's now.
        api.delete("Pod", "y", "c")
        api.delete("Namespace", "", "y")
        t_ns = seconds_until(lambda: not lab.reachable("y/c", B, 80, timeout=0.3))
        assert t_ns is not None, "namespace deletion never enforced"

        # A new pod appears (its IP first seen in a watch event): the start-up window.
        api.put(lab_pod("x/d", D, {"app": "d", "role": "client"}))
        t_new = seconds_until(lambda: lab.reachable("x/d", B, 80, timeout=0.3))
        assert t_new is not None, "new pod never allowed"
        assert seconds_until(lambda: "stockade_pod_ip_to_kernel_seconds_count 1.0"
                     in lab.http_get("http://127.0.0.1:9754/metrics")[1], 5) is not None

        assert agent_proc.poll() is None, lab.agent_output(agent_proc)
        metrics = lab.http_get("http://127.0.0.1:9754/metrics")[1]
        assert "stockade_event_to_kernel_seconds_count" in metrics
        print(f"\nevent -> packet verdict changed (probe-bounded): policy {t_policy:.2f}s, "
              f"label {t_label:.2f}s, namespace delete {t_ns:.2f}s")
        for line in metrics.splitlines():
            if line.startswith(("stockade_event_to_kernel_seconds_sum", "stockade_event_to_kernel_seconds_count",
                                "stockade_pod_ip_to_kernel_seconds_sum", "stockade_pod_ip_to_kernel_seconds_count")):
                print(line)
    finally:
        api.close()
