"""The Kubernetes packet lab: the fake API server listening in the node namespace, lab pods,
and the watch-driven scenario (also run with the DaemonSet's privileges)."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.kit import Lab
from tests.kit.builders import ns, pod, policy
from tests.kit.kubeapi import FakeKubeAPI

CLONE_NEWNET = 0x40000000


A, B, C, D = "10.10.0.11", "10.10.0.12", "10.10.0.21", "10.10.0.13"


def listen_in_netns(netns: str) -> socket.socket:
    """A listening TCP socket on 127.0.0.1 in `netns` (setns() on a throwaway thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[str, object] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                out["error"] = OSError(ctypes.get_errno(), "setns")
                return
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            s.listen(64)
            out["socket"] = s
        finally:
            os.close(fd)

    t = threading.Thread(target=run)  # the thread (and its namespace) ends; the socket stays
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["socket"]  # type: ignore[return-value]


def api_in_netns(netns: str) -> FakeKubeAPI:
    """The fake API server, listening in `netns` (where the agent runs), started."""
    api = FakeKubeAPI()
    api.server.socket.close()
    api.server.socket = listen_in_netns(netns)
    api.server.server_address = api.server.socket.getsockname()
    api.start()
    return api


def until(cond: Callable[[], bool], timeout: float = 10.0) -> float | None:
    """Seconds until cond() held, or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


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
        assert until(lambda: lab.http_get("http://127.0.0.1:9754/readyz")[0] == 200, 60), "never ready"
        assert lab.reachable("x/a", B, 80) and lab.reachable("y/c", B, 80)

        # A policy is added: b accepts only pods labelled role=client, from any namespace.
        api.put(policy("x/b-from-clients", {
            "podSelector": {"matchLabels": {"app": "b"}},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}}]}],
        }))
        t_policy = until(lambda: not lab.reachable("y/c", B, 80, timeout=0.3))
        assert t_policy is not None, "policy never enforced"
        assert not lab.reachable("x/a", B, 80, timeout=0.3)

        # A pod's label changes: c becomes a client.
        api.put(lab_pod("y/c", C, {"app": "c", "role": "client"}))
        t_label = until(lambda: lab.reachable("y/c", B, 80, timeout=0.3))
        assert t_label is not None, "label change never enforced"
        assert not lab.reachable("x/a", B, 80, timeout=0.3)

        # The namespace is deleted (its pods go with it): c's address is nobody's now.
        api.delete("Pod", "y", "c")
        api.delete("Namespace", "", "y")
        t_ns = until(lambda: not lab.reachable("y/c", B, 80, timeout=0.3))
        assert t_ns is not None, "namespace deletion never enforced"

        # A new pod appears (its IP first seen in a watch event): the start-up window.
        api.put(lab_pod("x/d", D, {"app": "d", "role": "client"}))
        t_new = until(lambda: lab.reachable("x/d", B, 80, timeout=0.3))
        assert t_new is not None, "new pod never allowed"
        assert until(lambda: "stockade_pod_ip_to_kernel_seconds_count 1.0"
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
