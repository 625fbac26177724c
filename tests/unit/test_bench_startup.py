"""bench/startup.py's pure parts: the figure summary, the wrong-verdict count, its table and
targets rows, and the probe loop it runs in the pods' namespaces (here on loopback, no
root). No timing asserted."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from bench import report, startup


def test_summary_is_the_median_and_range_and_empty_is_none() -> None:
    assert startup.summary([3.0, 1.0, 2.0]) == {"n": 3, "median": 2.0, "min": 1.0, "max": 3.0}
    assert startup.summary([]) == {"n": 0, "median": None, "min": None, "max": None}


def test_wrong_verdicts_are_the_friend_denied_and_the_client_allowed() -> None:
    probes = {"friend": {"allowed": 90, "denied": 2}, "client": {"allowed": 1, "denied": 80}}
    assert startup.wrong_verdicts(probes) == {"friend_denied": 2, "client_allowed": 1, "total": 173}
    # a prober that died reports nothing: no probe counted, none wrong
    assert startup.wrong_verdicts({"friend": {"error": "prober died"}, "client": {}}) == {
        "friend_denied": 0, "client_allowed": 0, "total": 0}


def _result(cold: list[float], restart: list[float], wrong: int) -> dict[str, object]:
    return {"cold_s": startup.summary(cold), "restart_s": startup.summary(restart), "cold_verdicts_ok": True,
            "restart_verdicts_ok": True, "restart_probes": {"friend_denied": wrong, "client_allowed": 0, "total": 500}}


def test_table_and_targets_name_every_dataplane_and_judge_the_limits() -> None:
    result = {"machine": {"cpu": "x", "cores": 2, "kernel": "k", "memory_mb": 1, "commit": "0" * 40, "dirty": False},
              "startup": {"nftables/10k": _result([1.0, 1.5, 1.2], [0.8, 0.9, 1.0], 0),
                          "ebpf/10k": {**_result([2.5], [1.0], 3), "compile_s": [9.0], "build_reused": True},
                          "nftables/50k": {"error": "agent not ready: boom"}}}
    text = report.render(result)
    assert "nftables/10k" in text and "ebpf/10k" in text and "ERROR: agent not ready: boom" in text
    assert "1.20 s [1.00-1.50] (3)" in text and "9.0 s, reused yes" in text
    rows = {line.split("  ")[0].strip(): line for line in text.splitlines() if " <= " in line or " = 0" in line}
    assert rows["nftables 10k cold start -> ready p50 <= 2 s"].rstrip().endswith("met")
    assert rows["ebpf 10k cold start -> ready p50 <= 2 s"].rstrip().endswith("NOT MET")
    assert rows["ebpf 10k wrong verdicts during restart = 0"].rstrip().endswith("NOT MET")
    assert rows["nftables 10k wrong verdicts during restart = 0"].rstrip().endswith("met")


def test_the_prober_counts_answered_and_refused_probes_apart() -> None:
    """On loopback: an open port answers (allowed; the backlog completes the handshake), a
    closed one refuses (denied). Stopped at once: the prober still sends its first probe."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    out = {}
    for name, port in (("open", listener.getsockname()[1]), ("closed", closed_port)):
        proc = subprocess.Popen([sys.executable, "-c", startup.PROBER, "127.0.0.1", str(port), "0.005", "0.2"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        out[name] = json.loads(proc.stdout.readline())
        proc.wait(10)
    listener.close()
    assert out["open"]["allowed"] > 0 and out["open"]["denied"] == 0
    assert out["closed"]["denied"] > 0 and out["closed"]["allowed"] == 0
