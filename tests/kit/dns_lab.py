"""The DNS-egress lab shared by the DNS packet tests and bench/dnshold: the egress-names
ClusterNetworkPolicy, pods and their manifests from one address table, a DNS server script
(UDP and TCP) started in a pod's namespace, and a pod's resolve-then-connect; a real DNS
server (Debian's dnsmasq) in a pod's namespace with a pod resolving through glibc's stub
resolver; the agent started and waited for."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.kit import NETPROBE, Connection, Lab, expect, stop, until
from tests.kit.builders import ns, pod
from tests.kit.enforcement import write

METRICS = "127.0.0.1:9754"  # the agent's HTTP address inside the lab's node namespace


def names_policy(deny: list[str], names: Sequence[str] = ("*.example.test",)) -> dict[str, Any]:
    """Pods of team=app may ask team=dns on UDP/53 and TCP/53, reach answered addresses of `names`
    on TCP/80 (rule 1, "names"), and nothing else in `deny`."""
    return {
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "egress-names"},
        "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {"matchLabels": {"team": "app"}}},
                 "egress": [
                     {"name": "dns", "action": "Accept", "to": [{"namespaces": {"matchLabels": {"team": "dns"}}}],
                      "protocols": [{"udp": {"destinationPort": {"number": 53}}},
                                    {"tcp": {"destinationPort": {"number": 53}}}]},
                     {"name": "names", "action": "Accept", "to": [{"domainNames": list(names)}],
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


def start_agent(lab: Lab, src: Path, state: Path, dataplane: str, *extra: str) -> subprocess.Popen:
    """`stockade run` on node n1 from the manifests in `src`, its HTTP endpoint on METRICS;
    returns once it reports ready (the lab stops it)."""
    agent = lab.spawn_agent("run", "--source", str(src), "--node", "n1", "--dataplane", dataplane,
                            "--state-dir", str(state), "--metrics-address", METRICS, *extra)
    assert until(lambda: lab.http_get(f"http://{METRICS}/readyz")[0] == 200, 60), lab.agent_output(agent)
    return agent


_QUERY_PY = """
import json, sys
import dns.exception, dns.resolver
res = dns.resolver.Resolver(configure=False)
res.nameservers = [sys.argv[1]]
res.timeout = res.lifetime = 1.0
try:
    ans = res.resolve(sys.argv[2], sys.argv[3], raise_on_no_answer=False)
    print(json.dumps(sorted(r.address for r in ans)))
except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):  # an answer all the same
    print(json.dumps([]))
except dns.exception.Timeout:
    print("null")
"""


@dataclass
class Dnsmasq:
    """dnsmasq serving a test zone in a pod's namespace: its configuration only from its
    arguments (`zone`) and a hosts file of its own (`hosts`, re-read on `reload`)."""

    lab: Lab
    netns: str
    listen: list[str]
    hosts: Path
    log: Path
    proc: subprocess.Popen

    def query(self, name: str, rdtype: str = "A") -> list[str] | None:
        """`name` asked from the server's own namespace (never through a pod's device): the
        sorted addresses answered, [] for no address, None for no answer at all."""
        out = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", _QUERY_PY,
                              self.listen[0], name, rdtype], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def reload(self, hosts: Mapping[str, Sequence[str]], until_served: tuple[str, list[str]]) -> None:
        """Rewrite the hosts file, SIGHUP (dnsmasq re-reads it and clears its cache) and wait
        until `until_served` (a name and its sorted IPv4 addresses) is what dnsmasq answers."""
        _write_hosts(self.hosts, hosts)
        self.proc.send_signal(signal.SIGHUP)
        name, want = until_served
        expect(lambda: self.query(name) == want, timeout=30, what=f"dnsmasq serving {name} -> {want}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _write_hosts(path: Path, hosts: Mapping[str, Sequence[str]]) -> None:
    path.write_text("".join(f"{addr} {name}\n" for name, addrs in hosts.items() for addr in addrs))


@contextlib.contextmanager
def dnsmasq(lab: Lab, server_pod: str, workdir: Path, zone: Sequence[str],
            hosts: Mapping[str, Sequence[str]] | None = None, local_ttl: int = 300) -> Iterator[Dnsmasq]:
    """dnsmasq in `server_pod`'s namespace on its addresses (UDP and TCP port 53), answering
    only from `zone` (dnsmasq options such as --host-record, --cname, --address) and `hosts`
    (name -> addresses, a file re-read on SIGHUP, answered with `local_ttl`); nothing from the
    host (no config file, /etc/hosts or upstream resolver; names under .test it does not know
    are NXDOMAIN, others REFUSED). Queries are logged to workdir/dnsmasq.log. Stopped on exit,
    and by the lab's close should the exit be skipped."""
    assert shutil.which("dnsmasq"), "dnsmasq not found: install Debian's dnsmasq-base (`make system`)"
    workdir.mkdir(parents=True, exist_ok=True)
    netns, listen = lab.pods[server_pod].netns, lab.pods[server_pod].ips
    hosts_file, log = workdir / "dnsmasq.hosts", workdir / "dnsmasq.log"
    _write_hosts(hosts_file, hosts or {})
    argv = ["dnsmasq", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--keep-in-foreground",
            "--bind-interfaces", f"--listen-address={','.join(listen)}", "--port=53",
            "--pid-file",  # none: parallel labs' servers would share the default one
            "--user=root",  # the hosts file lies under pytest's private tmp dir, re-read on SIGHUP
            "--log-facility=-", "--log-queries", "--local=/test/", f"--local-ttl={local_ttl}",
            f"--addn-hosts={hosts_file}", *zone]
    with log.open("w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    lab.procs.append(proc)
    server = Dnsmasq(lab, netns, listen, hosts_file, log, proc)
    try:
        expect(lambda: proc.poll() is not None or server.query("ready.invalid") is not None, timeout=30,
               what="dnsmasq answering")
        assert proc.poll() is None, f"dnsmasq exited: {server.output()}"
        yield server
    finally:
        stop(proc)


# `ip netns exec` runs us in a mount namespace of our own, slave to the host's: a bind mount
# over /etc/resolv.conf made there is seen by this one process tree only.
_WITH_RESOLV_CONF = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'


def _stub_argv(lab: Lab, src_pod: str, server: str, mode: str, name: str, also: Sequence[str], family: int,
               tcp: bool, workdir: Path) -> list[str]:
    conf = workdir / f"resolv-{server.replace(':', '_')}{'-tcp' if tcp else ''}.conf"
    conf.write_text(f"nameserver {server}\noptions timeout:2 attempts:3{' use-vc' if tcp else ''}\n")
    return ["ip", "netns", "exec", lab.pods[src_pod].netns, "sh", "-c", _WITH_RESOLV_CONF, str(conf),
            sys.executable, str(NETPROBE), "resolve", str(family), mode, name, *also]


def stub_resolve_and_connect(lab: Lab, src_pod: str, server: str, name: str, *also: str, family: int = 4,
                             tcp: bool = False, workdir: Path) -> dict[str, Any]:
    """From `src_pod`: resolve `name` through glibc's getaddrinfo (IPv4 or IPv6 addresses, by
    `family`; over TCP if `tcp`: resolv.conf's use-vc) with `server` as the only nameserver,
    then connect at once to TCP/80 of every answered address and of `also`. The resolv.conf
    is written to `workdir`."""
    out = subprocess.run(_stub_argv(lab, src_pod, server, "once", name, also, family, tcp, workdir),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stub_resolve_and_hold(lab: Lab, src_pod: str, server: str, name: str, *, family: int = 4,
                          workdir: Path) -> tuple[dict[str, Any], Connection]:
    """stub_resolve_and_connect, keeping the first connection that opened (the lab stops it):
    each `ping()` goes through it. Opened by the resolving process itself, at once, so even
    an address with a TTL of a second is reached before it can expire."""
    proc = subprocess.Popen(_stub_argv(lab, src_pod, server, "hold", name, (), family, False, workdir),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lab.procs.append(proc)
    assert proc.stdout is not None
    return json.loads(proc.stdout.readline()), Connection(proc)
