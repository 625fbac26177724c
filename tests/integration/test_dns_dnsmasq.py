"""DNS egress against a real DNS server, on both dataplanes, by real packets: Debian's dnsmasq
in the dns/server pod answers a test zone; client pods resolve through glibc's stub resolver
(getaddrinfo, a resolv.conf naming dnsmasq) and connect AT ONCE to what they were answered,
with `stockade run --dns-egress` holding each answer until its addresses are in the kernel.

The policy (dns_lab.names_policy) allows app pods TCP/80 to the addresses they learned for
www.shop.test, *.wild.test, rot.shop.test, many.shop.test, short.shop.test and
chain.shop.test, and denies everything else (dnsmasq answers with TTL 300 s unless said
otherwise).
- a CNAME chain (www.shop.test -> shop.cdn.test -> edge.cdn.test, two A records and one
  AAAA): the final addresses are allowed under the rule naming only www.shop.test, on the
  first connection; an address the zone never answered is refused; edge.cdn.test asked
  directly (a name no rule selects) teaches nothing;
- another pod shares nothing the client learned, and learns for itself;
- AAAA over IPv6 (IPv6 transport to dnsmasq, IPv6 connection) likewise;
- `*.wild.test` allows a.b.wild.test, not wild.test (dnsmasq answers both, same address);
- rotating addresses: dnsmasq answers a name's several addresses in a rotating order; all
  are allowed; the zone changed and reloaded (SIGHUP), the new address is allowed at once;
- an answer over TCP (glibc's `use-vc`) likewise, and one too large for UDP (32 addresses:
  dnsmasq sends 30 of them with TC set, glibc asks again over TCP: all 32 are allowed);
- past its TTL (2 s, with --dns-ttl-floor 0) a learned address is refused for new
  connections while one opened before stays up, and an address with a long TTL stays; an
  address answered through a CNAME of TTL 2 s (its own A record 300 s) expires likewise.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.kit import Lab, dns_lab, until
from tests.kit.dns_lab import Dnsmasq, manifests, names_policy
from tests.kit.enforcement import write

CLIENT, CLIENT6, OTHER = "10.39.0.1", "fd00:39::1", "10.39.0.2"
SERVER, SERVER6 = "10.39.0.53", "fd00:39::53"
EDGE1, EDGE2, EDGE6 = "10.39.1.10", "10.39.1.11", "fd00:39:1::10"
WILD, SHORT, FAR, NEVER = "10.39.1.20", "10.39.1.30", "10.39.1.31", "10.39.1.99"
ROT1, ROT2, ROT3 = "10.39.2.1", "10.39.2.2", "10.39.2.3"
MANY = [f"10.39.3.{i}" for i in range(1, 33)]  # 32 A records: more than a 512-byte UDP answer holds
# every answered (and the never answered) address is one pod's, serving TCP/80
PODS = {"app/client": [CLIENT, CLIENT6], "app/other": [OTHER], "dns/server": [SERVER, SERVER6],
        "ext/web": [EDGE1, EDGE2, EDGE6, WILD, SHORT, FAR, NEVER, ROT1, ROT2, ROT3, *MANY]}
NAMES = ["www.shop.test", "*.wild.test", "rot.shop.test", "short.shop.test", "chain.shop.test", "many.shop.test"]
POLICY = names_policy(["0.0.0.0/0", "::/0"], NAMES)
ZONE = [
    "--cname=www.shop.test,shop.cdn.test",
    "--cname=shop.cdn.test,edge.cdn.test",
    f"--host-record=edge.cdn.test,{EDGE1},{EDGE6}",
    f"--host-record=edge.cdn.test,{EDGE2}",
    f"--address=/wild.test/{WILD}",  # wild.test and every name under it
    f"--host-record=short.shop.test,{SHORT},2",  # TTL 2 s
    "--cname=chain.shop.test,far.cdn.test,2",  # the chain's TTL is its smallest: 2 s
    f"--host-record=far.cdn.test,{FAR},300",
]
ROTATING = {"rot.shop.test": [ROT1, ROT2], "many.shop.test": MANY}  # the hosts file, re-read on SIGHUP


@dataclass
class Env:
    lab: Lab
    dns: Dnsmasq
    src: Path
    tmp: Path

    def resolve(self, pod: str, name: str, *also: str, family: int = 4, tcp: bool = False) -> dict[str, Any]:
        server = SERVER6 if family == 6 else SERVER
        return dns_lab.stub_resolve_and_connect(self.lab, pod, server, name, *also, family=family, tcp=tcp,
                                                workdir=self.tmp)

    def start(self, dataplane: str, *extra: str) -> subprocess.Popen:
        return dns_lab.start_agent(self.lab, self.src, self.tmp / "state", dataplane, "--dns-egress", *extra)


@pytest.fixture
def env(lab: Lab, tmp_path: Path) -> Iterator[Env]:
    for key, ips in PODS.items():
        lab.add_pod(key, ips)
    src = tmp_path / "src"
    write(src, manifests(PODS, POLICY))
    with dns_lab.dnsmasq(lab, "dns/server", tmp_path / "dns", ZONE, ROTATING) as dns:
        yield Env(lab, dns, src, tmp_path)


def test_names_resolved_through_dnsmasq_are_allowed_on_the_first_connection(env: Env, dataplane: str) -> None:
    lab = env.lab
    agent = env.start(dataplane)

    def why() -> str:
        return lab.agent_output(agent) + env.dns.output()

    # the CNAME chain: the final addresses, under the rule naming only www.shop.test
    got = env.resolve("app/client", "www.shop.test", NEVER)
    assert got == {"addrs": [EDGE1, EDGE2], "connected": {EDGE1: True, EDGE2: True, NEVER: False}}, why()
    # the other pod shares none of it; the chain's last name, asked directly, teaches nothing
    got = env.resolve("app/other", "edge.cdn.test")
    assert got == {"addrs": [EDGE1, EDGE2], "connected": {EDGE1: False, EDGE2: False}}, why()
    got = env.resolve("app/other", "www.shop.test")
    assert got["connected"] == {EDGE1: True, EDGE2: True}, why()

    # AAAA over IPv6
    assert not lab.reachable("app/client", EDGE6, 80)
    got = env.resolve("app/client", "www.shop.test", family=6)
    assert got == {"addrs": [EDGE6], "connected": {EDGE6: True}}, why()

    # the wildcard: names under wild.test, not wild.test itself
    got = env.resolve("app/client", "wild.test")
    assert got == {"addrs": [WILD], "connected": {WILD: False}}, why()
    got = env.resolve("app/client", "a.b.wild.test")
    assert got == {"addrs": [WILD], "connected": {WILD: True}}, why()

    # rotating addresses: every address of the answer, whatever dnsmasq's order
    got = env.resolve("app/client", "rot.shop.test", ROT3)
    assert got == {"addrs": [ROT1, ROT2], "connected": {ROT1: True, ROT2: True, ROT3: False}}, why()
    env.dns.reload({**ROTATING, "rot.shop.test": [ROT3]}, until_served=("rot.shop.test", [ROT3]))
    got = env.resolve("app/client", "rot.shop.test")
    assert got == {"addrs": [ROT3], "connected": {ROT3: True}}, why()
    assert lab.reachable("app/client", ROT1, 80)  # answered before, within its TTL

    # over TCP (glibc's use-vc; dnsmasq answers in a child process per connection) likewise
    assert not lab.reachable("app/other", ROT3, 80)
    got = env.resolve("app/other", "rot.shop.test", tcp=True)
    assert got == {"addrs": [ROT3], "connected": {ROT3: True}}, why()
    # an answer too large for UDP: dnsmasq truncates it, glibc asks again over TCP
    got = env.resolve("app/other", "many.shop.test")
    assert got == {"addrs": sorted(MANY), "connected": dict.fromkeys(sorted(MANY), True)}, why()


def test_a_learned_address_past_its_ttl_is_refused(env: Env, dataplane: str) -> None:
    lab = env.lab
    agent = env.start(dataplane, "--dns-ttl-floor", "0")
    got = env.resolve("app/client", "www.shop.test")  # TTL 300 s
    assert got["connected"] == {EDGE1: True, EDGE2: True}, lab.agent_output(agent)
    got = env.resolve("app/client", "chain.shop.test")  # CNAME TTL 2 s -> A TTL 300 s
    assert got == {"addrs": [FAR], "connected": {FAR: True}}, lab.agent_output(agent)
    got, opened = dns_lab.stub_resolve_and_hold(lab, "app/client", SERVER, "short.shop.test", workdir=env.tmp)
    assert got == {"addrs": [SHORT], "connected": {SHORT: True}}, lab.agent_output(agent)  # TTL 2 s

    def expired() -> bool:
        seen = lab.probe_many({"app/client": [f"tcp:{SHORT}:80", f"tcp:{FAR}:80"]}, timeout=0.5)["app/client"]
        return not any(seen.values())

    assert until(expired, timeout=30), "never expired"
    assert opened.ping()  # a connection opened before the expiry stays up
    assert lab.reachable("app/client", EDGE1, 80)  # and an address within its TTL stays allowed
