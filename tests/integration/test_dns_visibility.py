"""What `stockade run --dns-egress` learned, seen from outside, on both dataplanes by real
packets: a pod resolves a name with a real stub resolver against a DNS server in the lab
and connects; then the agent's `/dns` lists the address under the pod's domainNames rule
(with the name that taught it and its expiry), `stockade explain --to-name` (the CLI, run
against the live agent) names the rule and that address for that pod and nothing for the
other subject, and a connection to an address never answered shows in `stockade drops` as
"not a learned address of domainNames rule ...". With the agent gone, explain still names
the rules and says the learned addresses are unknown.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.kit import Lab, dns_lab, until
from tests.kit.dns_lab import manifests, names_policy

CLIENT, OTHER, SERVER = "10.37.0.1", "10.37.0.2", "10.37.0.53"
WEB, NOT_ANSWERED = "10.37.1.80", "10.37.1.81"
AGENT = "127.0.0.1:9754"
ORIGIN = "ClusterNetworkPolicy egress-names (Admin, priority 10) egress rule 1 (names)"
POLICY = names_policy(["0.0.0.0/0"])
PODS = {"app/client": [CLIENT], "app/other": [OTHER], "dns/server": [SERVER],
        "ext/web": [WEB], "ext/never": [NOT_ANSWERED]}
DOCS = manifests(PODS, POLICY)

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
    if q.question[0].rdtype == dns.rdatatype.A and name.to_text().lower().endswith(".example.test."):
        r.answer.append(dns.rrset.from_text(name, 300, "IN", "A", "{WEB}"))
    s.sendto(r.to_wire(), peer)
"""

CLIENT_PY = """
import socket, sys
import dns.resolver
res = dns.resolver.Resolver(configure=False)
res.nameservers = [sys.argv[1]]
res.timeout, res.lifetime = 1.0, 10.0
addrs = sorted(r.address for r in res.resolve(sys.argv[2], "A"))
socket.create_connection((addrs[0], 80), timeout=2.0).close()  # at once: the first connection
print(addrs[0])
"""


def setup(lab: Lab, tmp: Path) -> Path:
    return dns_lab.setup(lab, tmp, PODS, DOCS, SERVER_PY)


def test_dns_view_explain_to_name_and_drop_label(lab: Lab, dataplane: str, tmp_path: Path) -> None:
    src = setup(lab, tmp_path)
    agent = lab.spawn_agent("run", "--source", str(src), "--node", "n1", "--dataplane", dataplane,
                            "--state-dir", str(tmp_path / "state"), "--metrics-address", AGENT, "--dns-egress")
    assert until(lambda: lab.http_get(f"http://{AGENT}/readyz")[0] == 200, 60), lab.agent_output(agent)
    out = subprocess.run(["ip", "netns", "exec", lab.pods["app/client"].netns, sys.executable, "-c", CLIENT_PY,
                          SERVER, "www.example.test"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == WEB, (out.stderr, lab.agent_output(agent))

    # /dns: the learned table, per local pod and rule
    status, body = lab.http_get(f"http://{AGENT}/dns")
    assert status == 200, body
    view = json.loads(body)
    rules = {p["endpoint"]: p["rules"] for p in view["pods"]}
    assert view["enabled"] and sorted(rules) == ["app/client", "app/other"]
    [names] = rules["app/client"]
    assert (names["policy"], names["ports"], names["patterns"]) == (ORIGIN, ["tcp/80"], ["*.example.test"])
    [learned] = names["learned"]
    assert (learned["address"], learned["name"]) == (WEB, "www.example.test")
    assert 0 < learned["expires_in"] <= 300
    assert rules["app/other"][0]["learned"] == []

    # explain --to-name, the CLI against the live agent: text and JSON
    base = ["explain", "--source", str(src), "--state-dir=", "--agent", AGENT]
    text = lab.stockade(*base, "--to-name", "API.example.test").stdout
    assert text.splitlines()[0] == "API.example.test: selected by 1 domainNames rule(s) for 2 pod(s)", text
    assert f"  app/client: {ORIGIN} tcp/80 (*.example.test)" in text
    assert f"    {WEB:<39} for www.example.test, expires in " in text
    assert "  app/other: " in text and "    learned: nothing yet" in text
    got = json.loads(lab.stockade(*base, "--to-name", "www.example.test", "--from", "app/client",
                                  "--output", "json").stdout)
    assert got["agent_error"] is None
    assert [(r["endpoint"], [e["address"] for e in r["learned"]]) for r in got["rules"]] == [("app/client", [WEB])]
    none = lab.stockade(*base, "--to-name", "www.elsewhere.test").stdout
    assert none.startswith("www.elsewhere.test: no domainNames rule selects this name")

    # a connection to an address never answered: dropped by the later Deny, labelled
    label = f"not a learned address of domainNames rule {ORIGIN}"

    def labelled() -> bool:
        lab.reachable("app/client", NOT_ANSWERED, 80, timeout=0.3)
        lines = lab.stockade("drops", "--agent", AGENT).stdout.splitlines()
        return any(f"-> {NOT_ANSWERED}" in ln and ln.endswith(label) for ln in lines)

    assert until(labelled, timeout=60), lab.stockade("drops", "--agent", AGENT).stdout
    drops = [json.loads(ln) for ln in lab.stockade("drops", "--agent", AGENT, "--output", "json").stdout.splitlines()]
    assert any(d["dst"] == NOT_ANSWERED and d["not_learned"] == [ORIGIN] and d["policies"] for d in drops)

    # agent gone: the rules from the source, the addresses unknown (a clear message, exit 0)
    agent.terminate()
    agent.wait(timeout=60)
    text = lab.stockade(*base, "--to-name", "www.example.test", "--from", "app/client").stdout
    assert f"  app/client: {ORIGIN} tcp/80 (*.example.test)" in text
    assert f"    learned: unknown (cannot reach the agent at {AGENT}" in text
