"""`stockade run --dns-egress` on both dataplanes, by real packets: a pod allowed only
`*.example.test` (TCP/80) and its DNS server resolves a name with dnspython's stub resolver
and connects AT ONCE to the answered address: the first connection is allowed (the answer
was held until the address was in the kernel). An address never answered stays denied, a
name the rule does not match teaches nothing, and another pod (also a subject) does not
share what this one learned; AAAA over IPv6 likewise; answers over TCP likewise, in one
segment or cut in three; past its TTL (with the floor set to
0) a learned address is denied again; with the agent killed, answers pass after the
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

SERVER_PY = f"""
import select, socket, struct, threading, time
import dns.message, dns.rrset, dns.rdatatype
socks = []
for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, 53))
    socks.append(s)


def reply(data):
    q = dns.message.from_wire(data)
    r = dns.message.make_response(q)
    name, rdtype = q.question[0].name, q.question[0].rdtype
    text = name.to_text().lower()
    ttl = 2 if text.startswith("short.") else 5
    if rdtype == dns.rdatatype.A and text.endswith(".example.test."):
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", "{WEB}"))
    elif rdtype == dns.rdatatype.AAAA and text.endswith(".example.test."):
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", "AAAA", "{WEB6}"))
    elif rdtype == dns.rdatatype.A and text == "web.elsewhere.test.":
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", "{NOT_ANSWERED}"))
    return r.to_wire()


def serve_tcp():  # one query per connection; "split." names answered in three segments
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", 53))
    tcp.listen()
    while True:
        c, _ = tcp.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with c, c.makefile("rb") as f:
            q = f.read(struct.unpack("!H", f.read(2))[0])
            out = reply(q)
            out = struct.pack("!H", len(out)) + out
            for part in ((out[:2], out[2:20], out[20:]) if b"split" in q else (out,)):
                c.sendall(part)
                time.sleep(0.02)  # one segment each (no coalescing); not a measured wait


threading.Thread(target=serve_tcp, daemon=True).start()
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(4096)
        s.sendto(reply(data), peer)
"""

# resolve, then connect at once to every answered address (and to `also`)
CLIENT_PY = """
import json, socket, sys
import dns.resolver
res = dns.resolver.Resolver(configure=False)
res.nameservers = [sys.argv[1]]
res.timeout, res.lifetime = 1.0, 10.0  # retries: an answer lost while a dead agent held it
addrs = sorted(r.address for r in res.resolve(sys.argv[2], sys.argv[3], tcp=sys.argv[4] == "tcp"))
def connect(a):
    try:
        socket.create_connection((a, 80), timeout=1.0).close()
        return True
    except OSError:
        return False
print(json.dumps({"addrs": addrs, "connected": {a: connect(a) for a in [*addrs, *sys.argv[5:]]}}))
"""


def setup(lab: Lab, tmp: Path) -> Path:
    return dns_lab.setup(lab, tmp, PODS, DOCS, SERVER_PY)


def resolve_and_connect(lab: Lab, src_pod: str, name: str, *also: str, rdtype: str = "A",
                        server: str = SERVER, tcp: bool = False) -> dict[str, Any]:
    out = subprocess.run(["ip", "netns", "exec", lab.pods[src_pod].netns, sys.executable, "-c", CLIENT_PY,
                          server, name, rdtype, "tcp" if tcp else "udp", *also],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


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
