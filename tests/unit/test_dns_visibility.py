"""DNS egress visibility without a kernel: the learned table as `/dns` serves it, `explain
--to-name` (rows, text, JSON through the CLI) and the "not a learned address" drop label."""

from __future__ import annotations

import io
import ipaddress
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dns.message
import dns.rrset
import pytest
from prometheus_client import CollectorRegistry

from agent.dataplane.base import DropEvent
from agent.dns.egress import DnsEgress
from agent.drops import describe, drop_text
from agent.endpoint import http_app
from agent.ir import Direction, Program
from agent.query import QueryError, merge_learned, to_name, to_name_text
from tests.kit.builders import BASE, snapshot_of
from tests.kit.enforcement import write

WEB, API, CLI, OUT, OTHER = "10.0.0.1", "10.0.0.2", "10.0.1.1", "192.0.2.7", "192.0.2.9"  # BASE pods
CNP = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
       "metadata": {"name": "names"},
       "spec": {"tier": "Admin", "priority": 7, "subject": {"namespaces": {"matchLabels": {"team": "red"}}},
                "egress": [{"name": "web", "action": "Accept", "to": [{"domainNames": ["*.example.test", "x.io"]}],
                            "protocols": [{"tcp": {"destinationPort": {"number": 443}}}]},
                           {"name": "rest", "action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}]}}
ORIGIN = "ClusterNetworkPolicy names (Admin, priority 7) egress rule 0 (web)"
RULE = "file:cnp:names/egress/0"


class FakeHold:
    def __init__(self, on_answer: Callable[..., None], **kw: Any) -> None:
        self.on_answer = on_answer

    def device_for(self, ip: Any) -> str:
        return f"veth-{ip}"

    def attach(self, dev: str) -> None:
        pass


class FakeDaemon:
    def __init__(self, base: Program) -> None:
        self.transform: Callable[[Program], Program] | None = None
        self.on_synced: list[Callable[[Any], None]] = []
        self.registry = CollectorRegistry()
        self.base, self.program = base, base

    def reapply(self) -> bool:
        assert self.transform is not None
        self.program = self.transform(self.base)
        return True


def answer(name: str, ip: str, ttl: int = 100) -> bytes:
    r = dns.message.make_response(dns.message.make_query(name, "A"))
    r.answer.append(dns.rrset.from_text(name + ".", ttl, "IN", "A", ip))
    return r.to_wire()


@pytest.fixture
def learned() -> tuple[DnsEgress, FakeDaemon, list[float]]:
    now = [1000.0]
    snap = snapshot_of([*BASE, CNP])
    d = FakeDaemon(snap.program)
    egress = DnsEgress(d, floor=60, clock=lambda: now[0], hold=FakeHold)  # type: ignore[arg-type]
    for cb in d.on_synced:
        cb(snap)
    d.reapply()
    egress.on_answer(ipaddress.ip_address(WEB), answer("WWW.example.test", OUT, ttl=300))
    now[0] += 10
    return egress, d, now


def test_view_lists_each_pod_rule_and_learned_address(learned: Any) -> None:
    egress, _, now = learned
    view = egress.view()
    assert view["enabled"] is True
    assert [p["endpoint"] for p in view["pods"]] == ["a/api", "a/web"]
    web = view["pods"][1]["rules"]
    assert len(web) == 1
    r = web[0]
    assert (r["rule"], r["policy"], r["tier"], r["priority"]) == (RULE, ORIGIN, "admin", 7)
    assert r["patterns"] == ["*.example.test", "x.io"] and r["ports"] == ["tcp/443"]
    assert [(e["address"], e["name"], e["expires_in"]) for e in r["learned"]] == [(OUT, "www.example.test", 290.0)]
    assert view["pods"][0]["rules"][0]["learned"] == []  # a/api shares nothing a/web learned
    json.dumps(view)  # served as is
    now[0] += 300  # past its expiry: gone from the view even before the timer re-applied
    assert egress.view()["pods"][1]["rules"][0]["learned"] == []


def _get(app: Any, path: str, peer: str = "127.0.0.1") -> tuple[str, bytes]:
    out: dict[str, str] = {}
    body = app({"PATH_INFO": path, "REMOTE_ADDR": peer, "QUERY_STRING": "", "wsgi.input": io.BytesIO()},
               lambda status, headers: out.setdefault("status", status))
    return out["status"], b"".join(body)


def test_http_dns_route(learned: Any) -> None:
    egress, d, _ = learned
    metrics = SimpleNamespace(http_rejected=SimpleNamespace(labels=lambda *a: SimpleNamespace(inc=lambda: None)))
    d.metrics, d.drops = metrics, None
    status, body = _get(http_app(d), "/dns")  # type: ignore[arg-type]
    assert status == "200 OK" and json.loads(body) == json.loads(json.dumps(egress.view()))
    status, _ = _get(http_app(d), "/dns", peer="10.1.2.3")  # type: ignore[arg-type]
    assert status == "403 Forbidden"
    assert _get(http_app(d, drops_public=True), "/dns", peer="10.1.2.3")[0] == "200 OK"  # type: ignore[arg-type]
    off = SimpleNamespace(registry=CollectorRegistry(), metrics=metrics)  # run without --dns-egress
    assert json.loads(_get(http_app(off), "/dns")[1]) == {"enabled": False, "pods": []}  # type: ignore[arg-type]


def test_to_name_rows_text_and_learned(learned: Any) -> None:
    egress, _, _ = learned
    snap = snapshot_of([*BASE, CNP])
    rows = to_name(snap, "API.Example.Test.")
    assert [(r["endpoint"], r["policy"], r["patterns"], r["ports"]) for r in rows] == [
        ("a/api", ORIGIN, ["*.example.test"], ["tcp/443"]), ("a/web", ORIGIN, ["*.example.test"], ["tcp/443"])]
    assert [r["endpoint"] for r in to_name(snap, "x.io", "a/web")] == ["a/web"]
    assert to_name(snap, "example.test") == []  # the wildcard needs one label more
    assert to_name(snap, "www.example.test", "b/cli") == []  # not a subject
    for bad in ("*.example.test", "no spaces.test", "a..b"):
        with pytest.raises(QueryError):
            to_name(snap, bad)
    with pytest.raises(QueryError, match="no pod"):
        to_name(snap, "x.io", "a/nope")

    merged = merge_learned(rows, egress.view())
    assert merged[0]["learned"] == [] and merged[1]["learned"][0]["address"] == OUT
    text = "\n".join(to_name_text("api.example.test", merged, None))
    assert text.splitlines()[0] == "api.example.test: selected by 1 domainNames rule(s) for 2 pod(s)"
    assert f"  a/web: {ORIGIN} tcp/443 (*.example.test)" in text
    assert "    learned: nothing yet" in text
    assert f"    {OUT:<39} for www.example.test, expires in 290 s" in text
    unknown = to_name_text("api.example.test", rows, "cannot reach the agent at 127.0.0.1:9754: refused")
    assert unknown.count("    learned: unknown (cannot reach the agent at 127.0.0.1:9754: refused)") == 2
    assert merge_learned(rows, {"enabled": True, "pods": []})[0]["learned"] is None  # not the agent's pod
    assert "not a pod of the agent's node" in "\n".join(to_name_text("n", merge_learned(rows, {"pods": []}), None))
    assert "no domainNames rule selects" in to_name_text("example.test", [], None)[0]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])


def test_cli_explain_to_name_without_agent(tmp_path: Path) -> None:
    write(tmp_path, [*BASE, CNP])
    src = ["explain", "--source", str(tmp_path), "--state-dir="]
    out = _cli(*src, "--to-name", "www.example.test", "--from", "a/web", "--agent", "127.0.0.1:1", "--output", "json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["agent_error"].startswith("cannot reach the agent at 127.0.0.1:1")
    assert [(r["endpoint"], r["policy"], r["learned"]) for r in got["rules"]] == [("a/web", ORIGIN, None)]
    text = _cli(*src, "--to-name", "www.example.test", "--agent", "127.0.0.1:1").stdout.splitlines()
    assert text[0] == "www.example.test: selected by 1 domainNames rule(s) for 2 pod(s)"
    assert text[2].startswith("    learned: unknown (cannot reach the agent at 127.0.0.1:1")
    bad = _cli(*src, "--to", "a/web", "--port", "80")
    assert bad.returncode != 0 and "explain --to needs --from" in bad.stderr
    bad = _cli(*src, "--to-name", "*.example.test")
    assert bad.returncode != 0 and "a name, not a pattern" in bad.stderr


def _drop(dst: str, port: int, rule_id: str | None = None, proto: str = "tcp") -> DropEvent:
    return DropEvent("a/web", Direction.EGRESS, rule_id, proto, WEB, dst, 40000, port)


def test_drop_to_a_non_learned_address_is_labelled(learned: Any) -> None:
    _, d, _ = learned
    prog = d.program
    deny = next(r for r in prog.endpoints["a/web"].egress.rules if r.verdict.value == "drop")
    got = describe(_drop(OTHER, 443, deny.id), prog)
    assert got["not_learned"] == [ORIGIN] and got["policies"] == [str(deny.origin)]  # existing fields kept
    text = drop_text({**got, "time": 0})
    assert text.endswith(f"deny by {deny.origin}; not a learned address of domainNames rule {ORIGIN}")
    assert describe(_drop(OTHER, 80, deny.id), prog)["not_learned"] == []  # not the rule's port
    assert describe(_drop(OTHER, 443, deny.id, "udp"), prog)["not_learned"] == []
    assert describe(_drop(OUT, 443, deny.id), prog)["not_learned"] == []  # learned: dropped for another reason
    ingress = DropEvent("a/web", Direction.INGRESS, None, "tcp", OTHER, WEB, 1, 443)
    assert describe(ingress, prog)["not_learned"] == []
    assert describe(_drop(OTHER, 443, deny.id), None)["not_learned"] == []
    old = {k: v for k, v in got.items() if k != "not_learned"}  # an older agent's drop
    assert "learned" not in drop_text({**old, "time": 0})
