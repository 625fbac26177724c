"""The eBPF dataplane on a raw-IP (L3, no Ethernet header) TUN device standing in for
NetBird's wt0, IPv4 and IPv6: the endpoint is the node itself, so tc ingress judges its
ingress and tc egress its egress.

A relay process copies packets between the node's TUN and a peer namespace's TUN
(what userspace WireGuard does between two hosts).
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import sys
from collections.abc import Iterator

from agent.dataplane.ebpf import EbpfDataplane
from agent.ir import Direction, DirectionProgram, EndpointProgram, Origin, PeerSet, PortMatch, Program, Rule
from agent.policy.netbird import bootstrap_program
from tests.kit import NETPROBE, ROOT, Lab, sh, tunrelay

HOST4, PEER4 = "100.64.0.1", "100.64.0.2"
HOST6, PEER6 = "fd00:64::1", "fd00:64::2"
ROUTED = "10.31.0.5"  # behind the node, not on wt0


def _probe(ns: str, *specs: str) -> dict[str, bool]:
    import json

    return json.loads(sh(sys.executable, str(NETPROBE), "probe", "0.8", *specs, ns=ns).stdout)


@contextlib.contextmanager
def tun_pair(lab: Lab) -> Iterator[str]:
    """wt0 in the node namespace and in a peer namespace, relayed; servers on 80 and 81
    on both sides. Yields the peer namespace."""
    peer = f"{lab.prefix}-tunpeer"
    sh("ip", "netns", "add", peer)
    procs: list[subprocess.Popen[str]] = []
    try:
        relay = subprocess.Popen(tunrelay.command("wt0", {lab.node: "*", peer: "*"}),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(relay)
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready", relay.stderr
        for ns, a4, a6 in ((lab.node, HOST4, HOST6), (peer, PEER4, PEER6)):
            sh("ip", "link", "set", "lo", "up", ns=ns)
            sh("ip", "addr", "add", f"{a4}/16", "dev", "wt0", ns=ns)
            sh("ip", "addr", "add", f"{a6}/64", "dev", "wt0", "nodad", ns=ns)
            sh("ip", "link", "set", "wt0", "up", ns=ns)
            srv = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(NETPROBE), "serve", "80", "81"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(srv)
            assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        assert _probe(peer, f"tcp:{HOST4}:81")[f"tcp:{HOST4}:81"]  # plumbing works unfiltered
        yield peer
    finally:
        for p in procs:
            p.kill()
            p.wait()
        sh("ip", "netns", "del", peer, check=False)


def host_program() -> Program:
    o = Origin("netbird", "", "pol", Direction.INGRESS, 0, "web")
    host = EndpointProgram(
        "host", (ipaddress.ip_address(HOST4), ipaddress.ip_address(HOST6)),
        ingress=DirectionProgram(True, (
            Rule(o, PeerSet.of([ipaddress.ip_network(PEER4), ipaddress.ip_network(PEER6)]),
                 (PortMatch("tcp", 80, 80), PortMatch("udp", 80, 80)), key="peer-web"),)),
        egress=DirectionProgram(True, (
            Rule(Origin("netbird", "", "pol", Direction.EGRESS, 1), None, (PortMatch("tcp", 81, 81),),
                 key="out-81"),)),
        interface="wt0",
    )
    return Program("netbird", {"host": host})


INTO = {f"{p}:{a}:{n}" for a in (HOST4, HOST6) for p in ("tcp", "udp") for n in (80, 81)}


def test_tun_l3_both_families(lab: Lab, pin_root: str) -> None:
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    with tun_pair(lab) as peer:
        try:
            prog = host_program()
            host = prog.endpoints["host"]
            dp.apply(prog)
            assert not dp.unattached
            into = _probe(peer, *sorted(INTO))
            assert into == {f"tcp:{HOST4}:80": True, f"udp:{HOST4}:80": True, f"tcp:{HOST4}:81": False,
                            f"udp:{HOST4}:81": False, f"tcp:{HOST6}:80": True, f"udp:{HOST6}:80": True,
                            f"tcp:{HOST6}:81": False, f"udp:{HOST6}:81": False}
            out = _probe(lab.node, *(f"tcp:{a}:{n}" for a in (PEER4, PEER6) for n in (80, 81)))
            assert out == {f"tcp:{PEER4}:80": False, f"tcp:{PEER4}:81": True,
                           f"tcp:{PEER6}:80": False, f"tcp:{PEER6}:81": True}
            c = dp.counters()
            assert c.rules[("host", host.ingress.rules[0].id, Direction.INGRESS)].packets >= 4
            assert c.rules[("host", host.egress.rules[0].id, Direction.EGRESS)].packets >= 2
            assert c.drops[("host", Direction.EGRESS)].packets >= 2
        finally:
            dp.cleanup()


def test_bound_endpoint_without_addresses_then_takeover(lab: Lab, pin_root: str) -> None:
    """NetBird before its first sync: an endpoint bound to wt0 with no addresses, ingress
    isolated. New inbound flows are denied, outbound ones and their replies pass. The
    local peer's endpoint then takes over its id (one generation switch, flows kept),
    also from a restarted agent, and the bootstrap endpoint takes it back."""
    boot = bootstrap_program("wt0")
    bkey = next(iter(boot.endpoints))
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    with tun_pair(lab) as peer:
        try:
            dp.apply(boot)
            assert not dp.unattached
            assert dp.eps is not None
            ep_id = dp.eps[bkey].ep_id
            assert _probe(peer, *sorted(INTO)) == dict.fromkeys(INTO, False)
            out = [f"{p}:{a}:{n}" for a in (PEER4, PEER6) for p in ("tcp", "udp") for n in (80, 81)]
            assert _probe(lab.node, *out) == dict.fromkeys(out, True)  # replies pass
            assert dp.counters().drops[(bkey, Direction.INGRESS)].packets >= 8
            opened = {(f.src, f.dport) for f in dp.established()}
            assert (ipaddress.ip_address(HOST4), 80) in opened

            # packets routed through wt0 (a routing peer: to no node address) are not the
            # node's, as `fib daddr type != local return` leaves them under nftables
            lab.add_pod("lan/r", [ROUTED])
            sh("ip", "route", "add", f"{ROUTED}/32", "dev", "wt0", ns=peer)
            assert _probe(peer, f"tcp:{ROUTED}:80")[f"tcp:{ROUTED}:80"]

            dp.close()  # restart: a new agent adopts the pinned maps and takes over the id
            dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
            prog = host_program()
            stats = dp.apply(prog)
            assert dp.eps is not None and set(dp.eps) == {"host"}
            assert dp.eps["host"].ep_id == ep_id and stats.chains_written == 1
            assert {(f.src, f.dport) for f in dp.established()} >= opened  # flows survived
            c = dp.counters()
            assert c.drops[("host", Direction.INGRESS)].packets == 0  # counted afresh
            assert _probe(peer, f"tcp:{HOST4}:80", f"tcp:{HOST4}:81") == {
                f"tcp:{HOST4}:80": True, f"tcp:{HOST4}:81": False}

            stats = dp.apply(boot)  # and back (e.g. the peer was renamed away)
            assert dp.eps is not None and set(dp.eps) == {bkey} and dp.eps[bkey].ep_id == ep_id
            assert _probe(peer, *sorted(INTO)) == dict.fromkeys(INTO, False)
            assert _probe(lab.node, f"tcp:{PEER4}:80")[f"tcp:{PEER4}:80"]
            assert dp.fill()["ports"][0] == 0  # the peer's generation is gone

            dp.apply(Program("netbird", {}))  # nothing bound any more: wt0 is left alone
            assert _probe(peer, f"tcp:{HOST4}:81")[f"tcp:{HOST4}:81"]
        finally:
            dp.cleanup()
