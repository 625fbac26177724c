"""The DNS-egress lab shared by the DNS packet tests and bench/dnshold: the egress-names
ClusterNetworkPolicy, pods and their manifests from one address table, a DNS server script
(UDP and TCP) started in a pod's namespace, and a pod's resolve-then-connect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.kit import Lab
from tests.kit.builders import ns, pod
from tests.kit.enforcement import write


def names_policy(deny: list[str]) -> dict[str, Any]:
    """Pods of team=app may ask team=dns on UDP/53 and TCP/53, reach answered *.example.test addresses
    on TCP/80 (rule 1, "names"), and nothing else in `deny`."""
    return {
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "egress-names"},
        "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {"matchLabels": {"team": "app"}}},
                 "egress": [
                     {"name": "dns", "action": "Accept", "to": [{"namespaces": {"matchLabels": {"team": "dns"}}}],
                      "protocols": [{"udp": {"destinationPort": {"number": 53}}},
                                    {"tcp": {"destinationPort": {"number": 53}}}]},
                     {"name": "names", "action": "Accept", "to": [{"domainNames": ["*.example.test"]}],
                      "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
                     {"name": "rest", "action": "Deny", "to": [{"networks": deny}]},
                 ]},
    }


def manifests(pods: dict[str, list[str]], *extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Each pod's namespace (labelled team=<namespace>), the pods, then `extra`."""
    namespaces = sorted({key.split("/")[0] for key in pods})
    return [*(ns(n, team=n) for n in namespaces), *(pod(key, ips) for key, ips in pods.items()), *extra]


def start_dns_server(lab: Lab, netns: str, script: str) -> subprocess.Popen[str]:
    """Run `script` (a DNS server printing "ready" once bound) in `netns`; the lab stops it."""
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lab.procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def setup(lab: Lab, tmp: Path, pods: dict[str, list[str]], docs: list[dict[str, Any]], server_script: str) -> Path:
    """The pods in the lab, the DNS server in dns/server, `docs` in a manifest directory."""
    for key, ips in pods.items():
        lab.add_pod(key, ips)
    start_dns_server(lab, lab.pods["dns/server"].netns, server_script)
    src = tmp / "src"
    write(src, docs)
    return src


_SERVER_PY = """
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
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", "{web}"))
    elif rdtype == dns.rdatatype.AAAA and text.endswith(".example.test."):
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", "AAAA", "{web6}"))
    elif rdtype == dns.rdatatype.A and text == "web.elsewhere.test.":
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", "{elsewhere}"))
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


def server_script(web: str, web6: str, elsewhere: str) -> str:
    """A DNS server (dnspython) on UDP (IPv4, IPv6) and TCP (IPv4) port 53: A/AAAA of any
    *.example.test name -> `web`/`web6` (TTL 5 s, 2 s for names starting with "short."),
    A of web.elsewhere.test -> `elsewhere`; over TCP one query per connection, and names
    starting with "split." answered in three segments (length, then the message in two)."""
    return _SERVER_PY.format(web=web, web6=web6, elsewhere=elsewhere)


_CLIENT_PY = """
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


def resolve_and_connect(lab: Lab, src_pod: str, server: str, name: str, *also: str, rdtype: str = "A",
                        tcp: bool = False) -> dict[str, Any]:
    """From `src_pod`: resolve `name` with dnspython's stub resolver (over TCP if `tcp`),
    then connect at once to TCP/80 of every answered address and of `also`."""
    out = subprocess.run(["ip", "netns", "exec", lab.pods[src_pod].netns, sys.executable, "-c", _CLIENT_PY,
                          server, name, rdtype, "tcp" if tcp else "udp", *also],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
