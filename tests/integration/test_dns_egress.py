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

import json
import subprocess
import sys
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


def _metric(lab: Lab, name: str) -> float:
    _, text = lab.http_get("http://127.0.0.1:9754/metrics")
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("stockade_dns_"))
    return float(values[name])


def test_expiry_needs_no_kernel_update(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    """Past its TTL a learned address is refused with no kernel update from the agent: on
    nftables the kernel times the set element out itself; on eBPF (which re-applies at the
    expiry, not an update an answer waits for) the counter does not move either."""
    src = setup(lab, tmp_path)
    agent = start(lab, src, tmp_path, dataplane, "--dns-egress", "--dns-ttl-floor", "0")
    got = resolve_and_connect(lab, "app/client", "short.example.test")  # TTL 2 s
    assert got == {"addrs": [WEB], "connected": {WEB: True}}, lab.agent_output(agent)
    updates = _metric(lab, "stockade_dns_kernel_updates_total")
    assert updates == 1
    assert until(lambda: not lab.reachable("app/client", WEB, 80, timeout=0.5), timeout=30), "never expired"
    assert _metric(lab, "stockade_dns_kernel_updates_total") == updates
    assert until(lambda: _metric(lab, "stockade_dns_expired_entries_total") == 1, timeout=30)  # the table forgot it


def test_a_deny_before_the_domain_names_rule_wins_for_a_learned_address(lab: Lab, dataplane: str,
                                                                       tmp_path: Path) -> None:
    """An Admin Deny of higher precedence (priority 5) for WEB on TCP/80: the client learns
    WEB from its answer, and its connection is still dropped; another name's address that
    no Deny names is allowed."""
    deny = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "deny-web"},
            "spec": {"tier": "Admin", "priority": 5, "subject": {"namespaces": {"matchLabels": {"team": "app"}}},
                     "egress": [{"name": "no-web", "action": "Deny", "to": [{"networks": [f"{WEB}/32"]}],
                                 "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]}}
    src = dns_lab.setup(lab, tmp_path, PODS, manifests(PODS, POLICY, deny), SERVER_PY)
    agent = start(lab, src, tmp_path, dataplane, "--dns-egress")
    got = resolve_and_connect(lab, "app/client", "www.example.test")
    assert got == {"addrs": [WEB], "connected": {WEB: False}}, lab.agent_output(agent)
    assert _metric(lab, "stockade_dns_learned_entries") == 1  # learned, and still denied
    got = resolve_and_connect(lab, "app/client", "v6.example.test", rdtype="AAAA", server=SERVER6)
    assert got == {"addrs": [WEB6], "connected": {WEB6: True}}, lab.agent_output(agent)


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


_LISTEN_PY = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5300))
s.settimeout(60)
print("ready", flush=True)
got = []
while True:  # until the marker's sender is heard
    data, peer = s.recvfrom(4096)
    got.append(peer[0])
    if peer[0] == sys.argv[1]:
        break
print(json.dumps(got), flush=True)
"""

_ANSWER_PY = """
import socket, sys
import dns.message, dns.rrset
r = dns.message.make_response(dns.message.make_query(sys.argv[2], "A"))
r.answer.append(dns.rrset.from_text(r.question[0].name, 60, "IN", "A", sys.argv[3]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))  # from port 53: what the hold takes for an answer
s.sendto(r.to_wire(), (sys.argv[1], 5300))
"""


def test_an_answer_the_pods_ingress_denies_is_neither_held_nor_learned(lab: Lab, dataplane: str,
                                                                        tmp_path: Path) -> None:
    """The client's ingress admits only namespace dns (UDP/5300). A forged answer from port 53
    of a pod in ext, on another node (so only the client's own device judges it), teaching
    www.example.test -> that pod's address, is dropped by the client's ingress check before
    any hold: it never arrives and teaches nothing. The
    dataplane's allowed traffic still reaches the hold: a marker from dns/relay arrives, and
    the client's own queries (replies) are still held and learned."""
    relay = "10.36.0.54"
    pods = {**PODS, "dns/relay": [relay]}
    only_dns = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "only-dns", "namespace": "app"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "dns"}}}],
                                      "ports": [{"protocol": "UDP", "port": 5300}]}]}}
    docs = manifests(pods, POLICY, only_dns)
    for doc in docs:  # ext's pods live on another node
        if doc["kind"] == "Pod" and doc["metadata"]["namespace"] == "ext":
            doc["spec"]["nodeName"] = "n2"
    src = dns_lab.setup(lab, tmp_path, pods, docs, SERVER_PY)
    agent = start(lab, src, tmp_path, dataplane, "--dns-egress")
    listener = subprocess.Popen(["ip", "netns", "exec", lab.pods["app/client"].netns, sys.executable, "-c",
                                 _LISTEN_PY, relay], stdout=subprocess.PIPE, text=True)
    lab.procs.append(listener)
    assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"

    def answer(sender: str, name: str, addr: str) -> None:
        subprocess.run(["ip", "netns", "exec", lab.pods[sender].netns, sys.executable, "-c", _ANSWER_PY,
                        CLIENT, name, addr], check=True, timeout=60)

    answer("ext/never", "www.example.test", NOT_ANSWERED)  # forged: the ingress policy denies it
    answer("dns/relay", "marker.elsewhere.test", "10.36.1.99")  # allowed: arrives (through the hold)
    out, _ = listener.communicate(timeout=90)
    assert json.loads(out) == [relay], lab.agent_output(agent)
    assert not lab.reachable("app/client", NOT_ANSWERED, 80)  # the forged answer taught nothing
    got = resolve_and_connect(lab, "app/client", "www.example.test", NOT_ANSWERED)
    assert got == {"addrs": [WEB], "connected": {WEB: True, NOT_ANSWERED: False}}, lab.agent_output(agent)
