"""Metrics scraped by a real Prometheus (Debian's package) inside the lab's node namespace."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from tests.kit import Lab, until
from tests.kit.enforcement import (
    ALLOW_A_TO_B,
    DENY_B,
    B,
    build,
    cluster,
    write,
)

METRICS = "127.0.0.1:9754"
PROM = "127.0.0.1:9090"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is missing: `make setup` installs Debian's prometheus package")
    return path


def start_prometheus(lab: Lab, tmp: Path) -> None:
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: stockade\n    static_configs: [{{targets: ['{METRICS}']}}]\n"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.node, _tool("prometheus"), f"--config.file={config}",
         f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address={PROM}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    lab.procs.append(proc)


def query(lab: Lab, promql: str) -> list[dict]:
    status, body = lab.http_get(f"http://{PROM}/api/v1/query?query={urllib.parse.quote(promql)}")
    if status != 200:
        return []
    return json.loads(body)["data"]["result"]


def value(lab: Lab, promql: str) -> float:
    result = query(lab, promql)
    return sum(float(r["value"][1]) for r in result)


def test_prometheus_sees_rule_and_drop_counters(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    build(lab)
    src = tmp_path / "src"
    write(src, [*cluster(a={"app": "a", "role": "client"}), DENY_B, ALLOW_A_TO_B])
    lab.spawn_agent("run", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                    "--state-dir", str(tmp_path / "state"), "--metrics-address", METRICS)
    assert until(lambda: lab.http_get(f"http://{METRICS}/readyz")[0] == 200, 60)  # eBPF compiles first
    start_prometheus(lab, tmp_path)
    assert until(lambda: value(lab, 'up{job="stockade"}') == 1, timeout=30), "prometheus never scraped"
    rule = ('stockade_rule_packets_total{source="file",namespace="app",policy="a-to-b",'
            'direction="ingress",rule="0",verdict="accept"}')
    drop = ('stockade_drop_packets_total{endpoint="app/b",direction="ingress",reason="default-deny",'
            'policies="app/a-to-b,app/deny-b"}')
    rule_before, drop_before = value(lab, rule), value(lab, drop)
    assert lab.reachable("app/a", B, 80)
    assert not lab.reachable("app/c", B, 80)
    assert until(lambda: value(lab, rule) > rule_before and value(lab, drop) > drop_before, timeout=20)
    assert value(lab, 'stockade_syncs_total{result="success"}') >= 1
    assert value(lab, "stockade_endpoints") == 3

    # The exposition passes promtool's lint.
    _, text = lab.http_get(f"http://{METRICS}/metrics")
    lint = subprocess.run([_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # A deleted policy's series disappear at once (read at scrape time, nothing stale).
    write(src, cluster(a={"app": "a", "role": "client"}))
    assert until(lambda: 'policy="a-to-b"' not in lab.http_get(f"http://{METRICS}/metrics")[1])


def _drops(lab: Lab) -> list[dict]:
    out = lab.stockade("drops", "--agent", METRICS, "--output", "json")
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_drops_name_the_deciding_policy_and_audit_lets_it_pass(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    build(lab)
    src = tmp_path / "src"
    write(src, [*cluster(a={"app": "a", "role": "client"}), DENY_B, ALLOW_A_TO_B])
    agent = lab.spawn_agent("run", "--source", str(src), "--node", "lab", "--dataplane", dataplane,
                            "--state-dir", str(tmp_path / "state"), "--metrics-address", METRICS)
    assert until(lambda: lab.http_get(f"http://{METRICS}/readyz")[0] == 200, 60)  # eBPF compiles first
    assert not lab.reachable("app/c", B, 80)

    def denied_probe(audit: bool) -> list[dict]:
        return [d for d in _drops(lab) if d["src"] == "10.20.0.3" and d["dst"] == B and d["dport"] == 80
                and d["audit"] is audit]

    assert until(lambda: bool(denied_probe(False)))
    d = denied_probe(False)[0]
    assert d["endpoint"] == "app/b" and d["direction"] == "ingress" and d["protocol"] == "tcp"
    assert d["reason"] == "default-deny" and d["policies"] == ["app/a-to-b", "app/deny-b"]
    text = lab.stockade("drops", "--agent", METRICS).stdout
    assert "default deny of app/a-to-b, app/deny-b" in text and "10.20.0.3" in text

    # Audit mode: the same probe passes, and is reported as a would-be drop and counted.
    agent.terminate()
    agent.wait(timeout=10)
    lab.spawn_agent("run", "--source", str(src), "--node", "lab", "--dataplane", dataplane, "--mode", "audit",
                    "--state-dir", str(tmp_path / "state"), "--metrics-address", METRICS)
    assert until(lambda: lab.http_get(f"http://{METRICS}/readyz")[0] == 200, 60)  # eBPF compiles first
    assert until(lambda: lab.reachable("app/c", B, 80, timeout=0.5))
    assert until(lambda: bool(denied_probe(True)))
    metrics = lab.http_get(f"http://{METRICS}/metrics")[1]
    line = next(m for m in metrics.splitlines() if m.startswith("stockade_drop_packets_total")
                and 'endpoint="app/b"' in m)
    assert float(line.rsplit(" ", 1)[1]) > 0


ROOT = Path(__file__).resolve().parents[2]


def test_alert_rules_and_dashboard_are_valid() -> None:
    res = subprocess.run([_tool("promtool"), "check", "rules", str(ROOT / "deploy/monitoring/stockade-alerts.yml")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    dash = json.loads((ROOT / "deploy/monitoring/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    # Every metric the dashboard plots is one the agent exports.
    exported = ("stockade_drop_packets_total", "stockade_rule_packets_total", "stockade_syncs_total",
                "stockade_last_successful_sync_timestamp_seconds", "stockade_policy_programming_latency_seconds",
                "stockade_sync_duration_seconds", "stockade_endpoints", "stockade_policies",
                "stockade_invalid_objects", "stockade_source_errors_total", "stockade_dataplane_objects",
                "stockade_dataplane_map_fill_ratio")
    for e in exprs:
        assert any(name in e for name in exported), e
