"""`stockade run --dns-egress` on both dataplanes, by real packets: a pod allowed only
`*.example.test` (TCP/80) and its DNS server resolves a name with dnspython's stub resolver
and connects AT ONCE to the answered address: the first connection is allowed (the answer
was held until the address was in the kernel). An address never answered stays denied, a
name the rule does not match teaches nothing, and another pod (also a subject) does not
share what this one learned; AAAA over IPv6 likewise; answers over TCP likewise, in one
segment or cut in three; past its TTL (with the floor set to 0) a learned address is
denied again; with the agent killed, answers pass after the
heartbeat ran out and what was learned stays. Without --dns-egress the rule matches nothing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.kit import Lab, dns_lab, until
from tests.kit.dns_lab import manifests, names_policy

CLIENT, OTHER, SERVER = "10.36.0.1", "10.36.0.2", "10.36.0.53"
CLIENT6, SERVER6 = "fd00:36::1", "fd00:36::53"
WEB, NOT_ANSWERED, WEB6 = "10.36.1.80", "10.36.1.81", "fd00:36:1::80"
POLICY = names_policy(["0.0.0.0/0", "::/0"])
PODS = {"app/client": [CLIENT, CLIENT6], "app/other": [OTHER], "dns/server": [SERVER, SERVER6],
        "ext/web": [WEB, WEB6], "ext/never": [NOT_ANSWERED]}
DOCS = manifests(PODS, POLICY)

SERVER_PY = dns_lab.server_script(WEB, WEB6, NOT_ANSWERED)


def setup(lab: Lab, tmp: Path) -> Path:
    return dns_lab.setup(lab, tmp, PODS, DOCS, SERVER_PY)


def resolve_and_connect(lab: Lab, src_pod: str, name: str, *also: str, rdtype: str = "A",
                        server: str = SERVER, tcp: bool = False) -> dict[str, Any]:
    return dns_lab.resolve_and_connect(lab, src_pod, server, name, *also, rdtype=rdtype, tcp=tcp)


def start(lab: Lab, src: Path, tmp: Path, dataplane: str, *extra: str) -> subprocess.Popen:
    agent = lab.spawn_agent("run", "--source", str(src), "--node", "n1", "--dataplane", dataplane,
                            "--state-dir", str(tmp / "state"), "--metrics-address", "127.0.0.1:9754", *extra)
    assert until(lambda: lab.http_get("http://127.0.0.1:9754/readyz")[0] == 200, 60), lab.agent_output(agent)
    return agent


def test_first_connection_to_a_resolved_name_is_allowed(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    src = setup(lab, tmp_path)
    agent = start(lab, src, tmp_path, dataplane, "--dns-egress")
    got = resolve_and_connect(lab, "app/client", "www.example.test", NOT_ANSWERED)
    assert got == {"addrs": [WEB], "connected": {WEB: True, NOT_ANSWERED: False}}, lab.agent_output(agent)
    # a name no rule matches teaches nothing; the other pod shares nothing the client learned
    got = resolve_and_connect(lab, "app/client", "web.elsewhere.test")
    assert got == {"addrs": [NOT_ANSWERED], "connected": {NOT_ANSWERED: False}}
    assert not lab.reachable("app/other", WEB, 80)
    got = resolve_and_connect(lab, "app/other", "api.example.test")
    assert got["connected"] == {WEB: True}
    # AAAA over IPv6: the same, for the IPv6 address
    assert not lab.reachable("app/client", WEB6, 80)
    got = resolve_and_connect(lab, "app/client", "v6.example.test", rdtype="AAAA", server=SERVER6)
    assert got == {"addrs": [WEB6], "connected": {WEB6: True}}
    # /metrics: the answers by outcome, the entries, the hold time
    status, text = lab.http_get("http://127.0.0.1:9754/metrics")
    assert status == 200
    metrics = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("stockade_dns_"))
    assert float(metrics['stockade_dns_answers_total{outcome="learned"}']) == 3
    assert float(metrics['stockade_dns_answers_total{outcome="nothing"}']) == 1
    assert float(metrics["stockade_dns_learned_entries"]) == 3  # client: WEB, WEB6; other: WEB
    assert float(metrics["stockade_dns_hold_seconds_count"]) == 4
    assert float(metrics["stockade_dns_kernel_updates_total"]) == 3  # one per answer that taught something new


def test_first_connection_after_a_tcp_answer_is_allowed(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    src = setup(lab, tmp_path)
    agent = start(lab, src, tmp_path, dataplane, "--dns-egress")
    assert not lab.reachable("app/client", WEB, 80)
    got = resolve_and_connect(lab, "app/client", "www.example.test", NOT_ANSWERED, tcp=True)
    assert got == {"addrs": [WEB], "connected": {WEB: True, NOT_ANSWERED: False}}, lab.agent_output(agent)
    # an answer cut across three segments: learned once complete, before its last segment arrived
    got = resolve_and_connect(lab, "app/other", "split.example.test", tcp=True)
    assert got == {"addrs": [WEB], "connected": {WEB: True}}, lab.agent_output(agent)
    _, text = lab.http_get("http://127.0.0.1:9754/metrics")
    metrics = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("stockade_dns_"))
    assert float(metrics['stockade_dns_answers_total{outcome="learned"}']) == 2
    assert float(metrics["stockade_dns_hold_seconds_count"]) == 2  # answers, not bare segments


def test_a_learned_address_is_denied_after_its_ttl(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    src = setup(lab, tmp_path)
    start(lab, src, tmp_path, dataplane, "--dns-egress", "--dns-ttl-floor", "0")
    got = resolve_and_connect(lab, "app/client", "short.example.test")  # TTL 2 s
    assert got == {"addrs": [WEB], "connected": {WEB: True}}
    assert until(lambda: not lab.reachable("app/client", WEB, 80, timeout=0.5), timeout=30), "never expired"


def test_without_dns_egress_domain_names_match_nothing(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    src = setup(lab, tmp_path)
    start(lab, src, tmp_path, dataplane)
    got = resolve_and_connect(lab, "app/client", "www.example.test")
    assert got == {"addrs": [WEB], "connected": {WEB: False}}


def test_agent_killed_answers_pass_and_learned_addresses_stay(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    src = setup(lab, tmp_path)
    agent = start(lab, src, tmp_path, dataplane, "--dns-egress")
    assert resolve_and_connect(lab, "app/client", "www.example.test")["connected"] == {WEB: True}
    agent.kill()  # no cleanup: the heartbeat stops, the TAP device goes
    agent.wait()
    # within the 1 s grace the answer is lost (the resolver retries); then it passes unheld
    got = resolve_and_connect(lab, "app/client", "again.example.test")
    assert got == {"addrs": [WEB], "connected": {WEB: True}}  # learned before: still allowed
    assert not lab.reachable("app/client", WEB6, 80)  # nothing new is learned meanwhile
