"""`stockade run --dns-egress` on both dataplanes, by real packets: a pod allowed only
`*.example.test` (TCP/80) and its DNS server resolves a name with dnspython's stub resolver
and connects AT ONCE to the answered address: the first connection is allowed (the answer
was held until the address was in the kernel). An address never answered stays denied, a
name the rule does not match teaches nothing, and another pod (also a subject) does not
share what this one learned. Without --dns-egress the rule matches nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.kit import Lab, until
from tests.kit.builders import ns, pod
from tests.kit.enforcement import write

CLIENT, OTHER, SERVER = "10.36.0.1", "10.36.0.2", "10.36.0.53"
WEB, NOT_ANSWERED = "10.36.1.80", "10.36.1.81"
POLICY = {
    "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
    "metadata": {"name": "egress-names"},
    "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {"matchLabels": {"team": "app"}}},
             "egress": [
                 {"name": "dns", "action": "Accept", "to": [{"namespaces": {"matchLabels": {"team": "dns"}}}],
                  "protocols": [{"udp": {"destinationPort": {"number": 53}}}]},
                 {"name": "names", "action": "Accept", "to": [{"domainNames": ["*.example.test"]}],
                  "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
                 {"name": "rest", "action": "Deny", "to": [{"networks": ["0.0.0.0/0", "::/0"]}]},
             ]},
}
DOCS: list[dict[str, Any]] = [
    ns("app", team="app"), ns("dns", team="dns"), ns("ext", team="ext"),
    pod("app/client", [CLIENT]), pod("app/other", [OTHER]), pod("dns/server", [SERVER]),
    pod("ext/web", [WEB]), pod("ext/never", [NOT_ANSWERED]), POLICY,
]

SERVER_PY = f"""
import socket
import dns.message, dns.rrset, dns.rdatatype
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    q = dns.message.from_wire(data)
    r = dns.message.make_response(q)
    name = q.question[0].name
    if q.question[0].rdtype == dns.rdatatype.A:
        text = name.to_text().lower()
        if text.endswith(".example.test."):
            r.answer.append(dns.rrset.from_text(name, 5, "IN", "A", "{WEB}"))
        elif text == "web.elsewhere.test.":
            r.answer.append(dns.rrset.from_text(name, 5, "IN", "A", "{NOT_ANSWERED}"))
    s.sendto(r.to_wire(), peer)
"""

# resolve, then connect at once to every answered address (and to `also`)
CLIENT_PY = """
import json, socket, sys
import dns.resolver
res = dns.resolver.Resolver(configure=False)
res.nameservers = [sys.argv[1]]
res.timeout = res.lifetime = 5.0
addrs = sorted(r.address for r in res.resolve(sys.argv[2], "A"))
def connect(a):
    try:
        socket.create_connection((a, 80), timeout=1.0).close()
        return True
    except OSError:
        return False
print(json.dumps({"addrs": addrs, "connected": {a: connect(a) for a in [*addrs, *sys.argv[3:]]}}))
"""


def setup(lab: Lab, tmp: Path) -> Path:
    for key, ip in (("app/client", CLIENT), ("app/other", OTHER), ("dns/server", SERVER), ("ext/web", WEB),
                    ("ext/never", NOT_ANSWERED)):
        lab.add_pod(key, [ip])
    proc = subprocess.Popen(["ip", "netns", "exec", lab.pods["dns/server"].netns, sys.executable, "-c", SERVER_PY],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lab.procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    src = tmp / "src"
    write(src, DOCS)
    return src


def resolve_and_connect(lab: Lab, src_pod: str, name: str, *also: str) -> dict[str, Any]:
    out = subprocess.run(["ip", "netns", "exec", lab.pods[src_pod].netns, sys.executable, "-c", CLIENT_PY,
                          SERVER, name, *also], capture_output=True, text=True, timeout=60)
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


def test_without_dns_egress_domain_names_match_nothing(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    src = setup(lab, tmp_path)
    start(lab, src, tmp_path, dataplane)
    got = resolve_and_connect(lab, "app/client", "www.example.test")
    assert got == {"addrs": [WEB], "connected": {WEB: False}}
