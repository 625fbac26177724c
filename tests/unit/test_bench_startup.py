"""bench/startup.py through its command lines (tests share only the kit with bench, so no
import): the probe loop it runs in the pods' namespaces, here on loopback without root, and
the startup table and targets `python -m bench.report` renders from a saved result. No
timing asserted."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.kit import ROOT


def _probe(port: int) -> dict[str, object]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.startup", "probe", "127.0.0.1", str(port), "0.005", "0.2"],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.stdin.write("stop\n")  # at once: the loop still sends its first probe
    proc.stdin.flush()
    out: dict[str, object] = json.loads(proc.stdout.readline())
    proc.wait(30)
    return out


def test_the_probe_loop_counts_answered_and_refused_probes_apart() -> None:
    """An open port answers (allowed: the backlog completes the handshake), a closed one
    refuses (denied)."""
    with socket.create_server(("127.0.0.1", 0), backlog=512) as listener:
        opened = _probe(listener.getsockname()[1])
    with socket.create_server(("127.0.0.1", 0)) as s:
        closed_port = s.getsockname()[1]
    closed = _probe(closed_port)
    assert opened["allowed"] >= 1 and opened["denied"] == 0 and len(opened["allowed_at"]) >= 1  # type: ignore[operator,arg-type]
    assert closed["denied"] >= 1 and closed["allowed"] == 0  # type: ignore[operator]


def _fig(values: list[float]) -> dict[str, object]:
    return {"n": len(values), "median": sorted(values)[len(values) // 2], "min": min(values), "max": max(values)}


def _result(cold: list[float], restart: list[float], wrong: int) -> dict[str, object]:
    return {"cold_s": _fig(cold), "restart_s": _fig(restart), "cold_verdicts_ok": True, "restart_verdicts_ok": True,
            "restart_probes": {"friend_denied": wrong, "client_allowed": 0, "total": 500}}


def test_the_report_shows_startup_figures_and_judges_the_targets(tmp_path: Path) -> None:
    result = {"machine": {"cpu": "x", "cores": 2, "kernel": "k", "memory_mb": 1, "commit": "0" * 40, "dirty": False},
              "startup": {"nftables/10k": _result([1.0, 1.5, 1.2], [0.8, 0.9, 1.0], 0),
                          "ebpf/10k": {**_result([2.5], [1.0], 3), "compile_s": [9.0], "build_reused": True},
                          "nftables/50k": {"error": "agent not ready: boom"}}}
    saved = tmp_path / "result.json"
    saved.write_text(json.dumps(result))
    text = subprocess.run([sys.executable, "-m", "bench.report", str(saved)], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    assert "ERROR: agent not ready: boom" in text
    assert "1.20 s [1.00-1.50] (3)" in text and "9.0 s, reused yes" in text and "3/500" in text
    rows = {line.split("  ")[0].strip(): line.rstrip() for line in text.splitlines()}
    assert rows["nftables 10k cold start -> ready p50 <= 2 s"].endswith(" met")
    assert rows["nftables 10k restart -> ready p50 <= 2 s"].endswith(" met")
    assert rows["ebpf 10k cold start -> ready p50 <= 2 s"].endswith("NOT MET")
    assert rows["ebpf 10k wrong verdicts during restart = 0"].endswith("NOT MET")
    assert rows["nftables 10k wrong verdicts during restart = 0"].endswith(" met")
