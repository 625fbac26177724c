"""The NetBird packet lab: peers on a relayed wt0, the management-API server in the node
namespace, the agent's command line (`env` fixture), the expected flow tables, and the
main scenario (also run under the unit's confinement)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.kit import ROOT, Lab
from tests.kit.netbird_api import TOKEN, ManagementApi, peer, serve
from tests.kit.netbird_lab import LOCAL, NetbirdLab, wait_for

METRICS = "127.0.0.1:9754"
PORTS = (80, 81)

IPS = {  # peer -> (overlay IPv4, IPv6)
    LOCAL: ("100.64.0.1", "fd00:4e42::1"),
    "alice": ("100.64.0.2", "fd00:4e42::2"),
    "bob": ("100.64.0.3", "fd00:4e42::3"),
    "carol": ("100.64.0.4", "fd00:4e42::4"),
}

IDS = {LOCAL: "pL", "alice": "pA", "bob": "pB", "carol": "pC"}


def _group(gid: str, name: str, members: list[str]) -> dict[str, Any]:
    return {"id": gid, "name": name, "peers_count": len(members), "resources_count": 0, "issued": "api",
            "peers": [{"id": IDS[m], "name": m} for m in members], "resources": None}


def _ref(group: dict[str, Any]) -> dict[str, Any]:
    return {k: group[k] for k in ("id", "name", "peers_count", "resources_count", "issued")}


def _rule(name: str, action: str, protocol: str, src: dict[str, Any], dst: dict[str, Any],
          ports: list[str] | None = None, bidirectional: bool = False) -> dict[str, Any]:
    return {"id": name, "name": name, "description": "", "enabled": True, "action": action,
            "bidirectional": bidirectional, "protocol": protocol, "ports": ports, "port_ranges": None,
            "sources": [_ref(src)], "destinations": [_ref(dst)]}


def account() -> dict[str, Any]:
    every = _group("gAll", "All", [LOCAL, "alice", "bob", "carol"])
    clients = _group("gClients", "web-clients", ["alice", "bob"])
    servers = _group("gServers", "servers", [LOCAL])
    blocked = _group("gBlocked", "blocked", ["bob"])
    backup = _group("gBackup", "backup", ["carol"])
    policies = [
        # (policy name, rule): one rule per policy, as the NetBird dashboard makes them.
        ("web", _rule("web", "accept", "tcp", clients, servers, ["80"])),
        ("block-bob", _rule("block-bob", "drop", "tcp", blocked, servers, ["80"])),  # beats "web"
        ("sync", _rule("sync", "accept", "udp", servers, backup, ["81"], bidirectional=True)),
        ("ping", _rule("ping", "accept", "icmp", every, servers)),
        ("admin", _rule("admin", "accept", "tcp", servers, clients, ["81"])),  # one-way, outbound
        ("disabled", {**_rule("disabled", "accept", "all", every, every), "enabled": False}),
    ]
    return {
        "policies": [{"id": f"pol-{n}", "name": n, "description": "", "enabled": True,
                      "source_posture_checks": None, "rules": [r]} for n, r in policies],
        "groups": [every, clients, servers, blocked, backup],
        "peers": [peer(IDS[n], n, v4, ipv6=v6) for n, (v4, v6) in IPS.items()],
        "posture-checks": [],
    }


@dataclass(frozen=True)
class Flow:
    src: str
    dst: str
    proto: str  # tcp | udp | icmp
    port: int | None = None
    family: int = 4

    def addr(self, who: str) -> str:
        return IPS[who][0 if self.family == 4 else 1]

    @property
    def spec(self) -> str:
        dst = self.addr(self.dst)
        return f"icmp:{dst}" if self.proto == "icmp" else f"{self.proto}:{dst}:{self.port}"

    def __str__(self) -> str:
        what = self.proto if self.port is None else f"{self.proto}/{self.port}"
        return f"{self.src}->{self.dst} {what} v{self.family}"


def F(src: str, dst: str, proto: str, port: int | None = None, family: int = 4) -> Flow:
    return Flow(src, dst, proto, port, family)


INBOUND = {  # peer -> local peer: judged by the agent's ingress on wt0
    F("alice", LOCAL, "tcp", 80): "allow",  # web
    F("alice", LOCAL, "tcp", 80, 6): "allow",
    F("alice", LOCAL, "tcp", 81): "deny",  # admin is one-way: local -> clients only
    F("alice", LOCAL, "udp", 81): "deny",
    F("alice", LOCAL, "icmp"): "allow",  # ping from All
    F("bob", LOCAL, "tcp", 80): "deny",  # block-bob (drop) beats web (accept)
    F("bob", LOCAL, "tcp", 80, 6): "deny",
    F("bob", LOCAL, "icmp"): "allow",  # the drop is tcp/80 only
    F("carol", LOCAL, "tcp", 80): "deny",  # not a web client
    F("carol", LOCAL, "udp", 81): "allow",  # sync is bidirectional
    F("carol", LOCAL, "udp", 81, 6): "allow",
    F("carol", LOCAL, "icmp", None, 6): "allow",
}

OUTBOUND = {  # local peer -> peer: judged by the agent's egress on wt0 (stricter than NetBird)
    F(LOCAL, "alice", "tcp", 81): "allow",  # admin
    F(LOCAL, "alice", "tcp", 81, 6): "allow",
    F(LOCAL, "bob", "tcp", 81): "allow",
    F(LOCAL, "alice", "tcp", 80): "deny",  # web is one-way: clients -> local only
    F(LOCAL, "alice", "icmp"): "deny",  # ping is one-way too
    F(LOCAL, "carol", "udp", 81): "allow",  # sync, mirror direction
    F(LOCAL, "carol", "udp", 81, 6): "allow",
    F(LOCAL, "carol", "tcp", 81): "deny",
}


class NbEnv:
    """The lab, the overlay, the API server and the agent's command line."""

    def __init__(self, lab: Lab, nb: NetbirdLab, api: ManagementApi, url: str, tmp: Path, dataplane: str) -> None:
        self.lab, self.nb, self.api, self.url, self.tmp, self.dataplane = lab, nb, api, url, tmp, dataplane
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.token_file.chmod(0o600)
        self.agent: subprocess.Popen | None = None

    def source_args(self, inbound_only: bool = False) -> list[str]:
        return ["--source", "netbird", "--netbird-url", self.url, "--netbird-token-file", str(self.token_file),
                "--interface", "wt0", *(["--netbird-inbound-only"] if inbound_only else [])]

    def start_agent(self, inbound_only: bool = False) -> None:
        args = ["run", *self.source_args(inbound_only), "--netbird-interval", "0.5",
                "--dataplane", self.dataplane, "--state-dir", str(self.tmp / "state"),
                "--metrics-address", METRICS]
        self.agent = self.lab.spawn_agent(*args)

    def agent_log(self) -> str:
        return self.lab.agent_output(self.agent) if self.agent is not None else ""

    def get(self, path: str) -> tuple[int, str]:
        return self.lab.http_get(f"http://{METRICS}{path}")

    def alive(self) -> None:
        assert self.agent is not None and self.agent.poll() is None, f"agent exited:\n{self.agent_log()}"

    def wait_ready(self) -> None:
        agent = self.agent
        assert agent is not None
        ok = wait_for(lambda: agent.poll() is not None or self.get("/readyz")[0] == 200, timeout=30)
        self.alive()
        assert ok, f"agent never became ready:\n{self.agent_log()}"

    def metric(self, name: str, **labels: str) -> float:
        text = self.get("/metrics")[1]
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        pattern = rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? ([0-9.e+]+)$" if want else \
            rf"^{re.escape(name)} ([0-9.e+]+)$"
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else 0.0

    def probe(self, flows: list[Flow]) -> dict[Flow, str]:
        targets: dict[str, list[str]] = {}
        for f in flows:
            targets.setdefault(f.src, []).append(f.spec)
        got = self.nb.probe_many(targets)
        return {f: "allow" if got[f.src][f.spec] else "deny" for f in flows}

    def explain(self, flows: list[Flow], inbound_only: bool = False) -> dict[Flow, str]:
        """`stockade explain --output json` per flow, run concurrently in the node namespace."""
        running = {}
        for f in flows:
            args = ["explain", *self.source_args(inbound_only), "--from", f.addr(f.src), "--to", f.addr(f.dst),
                    "--protocol", f.proto, "--output", "json"]
            if f.port is not None:
                args += ["--port", str(f.port)]
            running[f] = subprocess.Popen(
                ["ip", "netns", "exec", self.lab.node, sys.executable, "-m", "agent.cli", *args],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        out = {}
        for f, proc in running.items():
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"explain {f} failed: {stderr}"
            out[f] = json.loads(stdout)["verdict"]
        return out


@pytest.fixture
def env(lab: Lab, dataplane: str, tmp_path: Path) -> Iterator[NbEnv]:
    with NetbirdLab(lab) as nb:
        for name, (v4, v6) in IPS.items():
            if name == LOCAL:
                nb.add_local(v4, v6, PORTS)
            else:
                nb.add_peer(name, v4, v6, PORTS)
        nb.start()
        api = ManagementApi(account())
        with serve(api, netns=lab.node) as url:
            e = NbEnv(lab, nb, api, url, tmp_path, dataplane)
            try:
                yield e
            finally:
                if e.agent is not None and e.agent.poll() is None:
                    e.agent.terminate()  # SIGTERM: the daemon stops cleanly; lab.close() kills if not
                    try:
                        e.agent.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        e.agent.kill()


def diff_flows(got: dict[Flow, str], want: dict[Flow, str]) -> list[str]:
    return [f"{f}: got {got[f]}, want {want[f]}" for f in want if got[f] != want[f]]


def netbird_policies_enforced_on_wt0_both_directions(env: NbEnv) -> None:
    want = {**INBOUND, **OUTBOUND}
    flows = list(want)
    explained = env.explain(flows)
    assert not diff_flows(explained, want), "explain disagrees with the expected table"

    env.start_agent()
    env.wait_ready()
    assert not diff_flows(env.probe(flows), want), env.agent_log()

    # NetBird's own client puts "iifname wt0 accept" at the top of every other table's
    # input and forward chains. Stockade judges wt0 in prerouting: nothing opens.
    for cmd in ("add table inet netbird",
                "add chain inet netbird input { type filter hook input priority 0; policy accept; }",
                "add chain inet netbird forward { type filter hook forward priority 0; policy accept; }",
                'insert rule inet netbird input iifname "wt0" accept',
                'insert rule inet netbird forward iifname "wt0" accept'):
        env.lab.node_sh("nft", cmd)
    if env.dataplane == "nftables":
        # It does so in Stockade's own table too (it reaches every ip/inet table): judging
        # wt0 in prerouting is what keeps that rule from opening anything.
        for chain in ("input", "forward"):
            env.lab.node_sh("nft", f'insert rule inet stockade {chain} iifname "wt0" accept')
    assert not diff_flows(env.probe(list(INBOUND)), INBOUND), "NetBird's input accept bypassed Stockade"

    # API outage: the last good state stays in force, even though the account changed.
    env.api.fault = "500"
    env.api.data["groups"][1]["peers"].append({"id": "pC", "name": "carol"})  # carol joins web-clients
    env.api.data["groups"][1]["peers_count"] = 3
    assert wait_for(lambda: env.metric("stockade_source_errors_total", cause="server") >= 2), env.agent_log()
    assert env.get("/readyz")[0] == 200  # still enforcing a real state
    carol_web = F("carol", LOCAL, "tcp", 80)
    assert not diff_flows(env.probe(flows), want), "the outage changed what is enforced"
    env.alive()

    # Recovery applies the change (so the agent was polling all along), and NetBird's
    # table is left alone.
    env.api.fault = None
    assert wait_for(lambda: env.probe([carol_web])[carol_web] == "allow", timeout=30), env.agent_log()
    assert env.explain([carol_web])[carol_web] == "allow"
    after = {F("bob", LOCAL, "tcp", 80): "deny", F(LOCAL, "carol", "tcp", 81): "allow",  # admin: carol is a client
             F(LOCAL, "carol", "tcp", 80): "deny"}
    assert not diff_flows(env.probe(list(after)), after)
    assert "iifname" in env.lab.node_sh("nft", "list", "chain", "inet", "netbird", "input").stdout
