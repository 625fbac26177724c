"""Direct delivery on the eBPF dataplane (`--ebpf-deliver peer`; bpf/stockade.c `deliver`,
`stk_deliver`, docs/ebpf.md "Direct delivery") on real packets: a packet between two pods of the
node, judged for both ends at the source pod's hook, goes from there straight into the
destination pod's network namespace.

- the node's forwarding sees a pod's first flow's first packet only (it teaches how the node
  addresses frames to the pod); every later packet, and every packet of later flows, is
  delivered (an nft counter in the node's forward hook; "stack" delivery: every packet);
  delivered packets arrive routed as the node routes them (TTL / hop limit decremented,
  frames addressed by the node's device to the pod's), both ways, IPv4 and IPv6, UDP and TCP;
  denied pairs stay denied;
- a TCP connection's FIN and RST, and an ICMP error about a known flow, are delivered too, the
  destination's entry changed as its hook would change it (an RST deletes the flow at both
  ends): the node's connection tracking, which saw none of these flows, never judges their
  close (a kube-proxy-like `ct state invalid drop` in the node's forward hook drops nothing);
- a packet whose TTL would expire takes the node's path (the node drops it, as a router);
- only a veth whose other end is in another namespace is a delivery target.

Privileged: fails (not skips) without root, bpffs, bcc or kernel headers.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.dataplane.base import DataplaneError
from agent.dataplane.ebpf import EbpfDataplane, bpfsys
from agent.dataplane.ebpf.attach import Devices
from agent.dataplane.ebpf.builds import PIN_ROOT_ENV
from agent.dataplane.ebpf.layout import DELIVER_ENV, Config, parse_delivery, u32, v_config
from agent.ir import EndpointProgram, Program
from tests.kit import Lab, enforcement, expect, sh, until
from tests.kit.ebpf_lab import A6, B6, A, B, C, build, program
from tests.kit.netns import call_in
from tests.kit.nftns import counter_packets, nft_file

UDP_PORT, TCP_PORT = 8002, 8080  # allowed from a by b's ingress (ebpf_lab.program); no lab server on them
CLOSED_UDP_PORT = 8001  # allowed from a, nobody listens
IP_RECVTTL = 12  # linux/in.h (not in Python 3.11's socket module)


@pytest.fixture
def peer_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DELIVER_ENV, "peer")


def count_forwarded(lab: Lab, invalid_drop: bool = False) -> None:
    """Named counters in the node's forward hook: packets to b and to a (each family); with
    `invalid_drop`, conntrack-invalid packets are dropped and counted there, as kube-proxy does."""
    drop = "ct state invalid counter name invalid drop" if invalid_drop else ""
    nft_file(lab.node, f"""
table inet stkfwd {{
  counter to_b {{}}
  counter to_a {{}}
  counter invalid {{}}
  chain forwarded {{
    type filter hook forward priority 0;
    {drop}
    ip daddr {B} counter name to_b
    ip6 daddr {B6} counter name to_b
    ip daddr {A} counter name to_a
    ip6 daddr {A6} counter name to_a
  }}
}}""")


def counter(lab: Lab, name: str) -> int:
    return counter_packets(lab.node, "inet", "stkfwd", name)


def mac(ns: str, dev: str) -> bytes:
    out = sh("ip", "-j", "link", "show", dev, ns=ns).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


class Echo:
    """A UDP echo in b's namespace that reports each datagram's TTL / hop limit, and a connected
    client in a's (one 5-tuple for the whole test)."""

    def __init__(self, lab: Lab, v6: bool) -> None:
        fam = socket.AF_INET6 if v6 else socket.AF_INET
        self.v6 = v6
        dst, src = (B6, A6) if v6 else (B, A)

        def server() -> socket.socket:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            if v6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
            else:
                s.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
            s.bind((dst, UDP_PORT))
            return s

        def client() -> socket.socket:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.bind((src, 40100))
            s.connect((dst, UDP_PORT))
            return s

        self.server = call_in(lab.pods["app/b"].netns, server)
        self.server.settimeout(0.5)
        self.client = call_in(lab.pods["app/a"].netns, client)
        self.client.settimeout(0.5)
        self.ttls: list[int] = []

    def ping(self) -> bool:
        """a -> b, b echoes -> a; the TTL b saw is kept."""
        try:
            self.client.send(b"hi")
            data, anc, _, addr = self.server.recvmsg(64, socket.CMSG_SPACE(4))
            self.ttls += [struct.unpack("i", d[:4])[0] for _, _, d in anc]
            self.server.sendto(data, addr)
            return self.client.recv(64) == b"hi"
        except OSError:
            return False

    def close(self) -> None:
        self.server.close()
        self.client.close()


class Sniffer:
    """Ethernet frames arriving on b's eth0 (a packet socket in b's namespace)."""

    def __init__(self, lab: Lab) -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            s.bind(("eth0", 0))
            s.settimeout(0.05)
            return s

        self.s = call_in(lab.pods["app/b"].netns, make)

    def frames(self) -> Iterator[bytes]:
        while True:
            try:
                frame, (_, _, pkttype, _, _) = self.s.recvfrom(2048)
            except OSError:
                return
            if pkttype != socket.PACKET_OUTGOING:
                yield frame


def test_delivery_is_stack_or_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_delivery("peer") == "peer" and parse_delivery(" Stack ") == "stack"
    with pytest.raises(ValueError):
        parse_delivery("redirect")
    monkeypatch.setenv(DELIVER_ENV, "fast")
    with pytest.raises(DataplaneError, match=DELIVER_ENV):
        v_config(False, 10, 20)
    monkeypatch.setenv(DELIVER_ENV, "peer")
    assert Config.from_buffer_copy(v_config(False, 10, 20)).deliver == 1
    monkeypatch.delenv(DELIVER_ENV)
    assert Config.from_buffer_copy(v_config(False, 10, 20)).deliver == 0


@pytest.mark.parametrize("delivery", ["peer", "stack"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_known_flows_go_straight_into_the_pod(lab: Lab, pin_root: str, delivery: str, v6: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DELIVER_ENV, delivery)
    build(lab)
    count_forwarded(lab)
    sniff = Sniffer(lab)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    echo = None
    try:
        dp.apply(program())
        echo = Echo(lab, v6)
        assert expect(echo.ping, what="a -> b UDP")
        assert all(echo.ping() for _ in range(20))
        to_b, to_a = counter(lab, "to_b"), counter(lab, "to_a")
        if delivery == "peer":
            # the first packet (judged for both ends) takes the node's path and teaches b's
            # device; a's own hook wrote a's entry knowing a's device: every reply is delivered
            assert to_b <= 2 and to_a == 0, (to_b, to_a)
        else:
            assert to_b >= 21 and to_a >= 21, (to_b, to_a)
        # routed as the node routes: one hop, whichever path
        assert echo.ttls and set(echo.ttls) == {63}, echo.ttls
        # addressed as the node addresses frames to b: from b's node-side device to b's eth0
        want = mac(lab.node, lab.pods["app/b"].host_if) + mac(lab.pods["app/b"].netns, "eth0")
        ethertype, l4 = (b"\x86\xdd", 20) if v6 else (b"\x08\x00", 23)  # l4: the protocol byte
        seen = [f for f in sniff.frames() if f[12:14] == ethertype and f[l4] in (6, 17)]  # not ND, not ICMP
        assert len(seen) >= 21
        assert all(f[6:12] + f[0:6] == want for f in seen)
        # TCP both ways over one connection
        conn = lab.hold("app/a", B6 if v6 else B, 80)
        assert all(conn.ping() for _ in range(10))
        # denied pairs stay denied (c -> b TCP 80 is an explicit drop; b's egress is isolated)
        assert lab.probe_many({"app/c": [f"tcp:{B}:80", f"tcp:{B}:1024"], "app/b": [f"tcp:{C}:80"]}) == {
            "app/c": {f"tcp:{B}:80": False, f"tcp:{B}:1024": True}, "app/b": {f"tcp:{C}:80": False}}
    finally:
        if echo:
            echo.close()
        sniff.s.close()
        dp.cleanup()


def tcp_pair(lab: Lab, client: str = "app/a", to: str = B, port: int = TCP_PORT) -> tuple[socket.socket, socket.socket]:
    """(client in pod `client`, accepted server end in b) of one TCP connection to `to`."""
    lst = call_in(lab.pods["app/b"].netns, lambda: socket.create_server((B, port)))

    def connect() -> socket.socket:
        s = socket.socket()
        s.settimeout(2)
        s.connect((to, port))
        return s

    cli = call_in(lab.pods[client].netns, connect)
    lst.settimeout(2)
    srv, _ = lst.accept()
    lst.close()
    srv.settimeout(2)
    return cli, srv


def exchange(cli: socket.socket, srv: socket.socket, n: int = 20) -> None:
    for i in range(n):
        cli.sendall(b"x%d" % i)
        assert srv.recv(64)
        srv.sendall(b"y%d" % i)
        assert cli.recv(64)


def test_tcp_close_and_reset_are_delivered(lab: Lab, pin_root: str, peer_delivery: None) -> None:
    build(lab)
    count_forwarded(lab, invalid_drop=True)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(program())
        # an orderly close: each FIN arrives (EOF at the other end), past a node that drops
        # what its connection tracking calls invalid
        cli, srv = tcp_pair(lab)
        exchange(cli, srv)
        cli.shutdown(socket.SHUT_WR)
        assert srv.recv(64) == b""
        srv.close()
        assert cli.recv(64) == b""
        cli.close()
        # forwarded by the node: the SYN (it taught the node's frames to b); the rest, FINs
        # included, delivered
        assert (counter(lab, "to_b"), counter(lab, "to_a")) == (1, 0)
        assert counter(lab, "invalid") == 0
        # a reset: the other end sees it, and the flow is gone at both ends
        cli, srv = tcp_pair(lab)
        exchange(cli, srv)
        port = cli.getsockname()[1]
        assert any(f.sport == port for f in dp.established())
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cli.close()
        with pytest.raises(ConnectionResetError):
            srv.recv(64)
        srv.close()
        assert until(lambda: not any(port in (f.sport, f.dport) for f in dp.established()), timeout=5)
        # the second connection, SYN included, was delivered whole: b's veth was known by then
        assert (counter(lab, "to_b"), counter(lab, "to_a"), counter(lab, "invalid")) == (1, 0, 0)
        # an ICMP error about a delivered flow is delivered too: a UDP datagram to a port of b
        # nobody listens on (allowed by b's policy; as a flow's first packet not a TCP SYN, it
        # takes the node's path) comes back as "connection refused"
        def closed_port() -> socket.socket:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.settimeout(2)
            u.connect((B, CLOSED_UDP_PORT))
            return u

        u = call_in(lab.pods["app/a"].netns, closed_port)
        try:
            u.send(b"anyone?")
            with pytest.raises(ConnectionRefusedError):
                u.recv(64)
        finally:
            u.close()
        assert (counter(lab, "to_b"), counter(lab, "to_a"), counter(lab, "invalid")) == (2, 0, 0)
    finally:
        dp.cleanup()


def test_a_departed_pods_device_is_forgotten(lab: Lab, pin_root: str, peer_delivery: None) -> None:
    """The frame addresses learned for a pod's veth go with the device (its index may name
    another pod's veth later)."""
    build(lab)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(program())
        exchange(*tcp_pair(lab))
        idx = call_in(lab.node, lambda: socket.if_nametoindex(lab.pods["app/b"].host_if))
        assert dp.maps["devmac"].lookup(u32(idx)) is not None
        rest = program()
        without_b = Program(rest.source, {k: v for k, v in rest.endpoints.items() if k != "app/b"})
        dp.apply(without_b)
        dp.apply(without_b)  # the detached device's entries go once the flip's grace has passed
        assert dp.maps["devmac"].lookup(u32(idx)) is None
    finally:
        dp.cleanup()


def test_a_packet_whose_ttl_expires_takes_the_nodes_path(lab: Lab, pin_root: str, peer_delivery: None) -> None:
    build(lab)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    echo = None
    try:
        dp.apply(program())
        echo = Echo(lab, v6=False)
        assert expect(echo.ping, what="a -> b UDP")
        assert all(echo.ping() for _ in range(5))  # delivered from here on
        echo.client.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
        echo.client.send(b"ttl1")
        with pytest.raises(TimeoutError):  # the node, as a router, does not pass it on
            echo.server.recvmsg(64, socket.CMSG_SPACE(4))
        echo.client.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
        assert expect(echo.ping, what="a -> b UDP after the expired one")
    finally:
        if echo:
            echo.close()
        dp.cleanup()


def test_only_a_veth_into_another_namespace_is_a_target(lab: Lab) -> None:
    build(lab)
    lab.node_sh("ip", "link", "add", "stkx0", "type", "veth", "peer", "name", "stkx1")  # both ends on the node
    devices = Devices(lab.node, "test")
    try:
        devices.node_addresses()  # a scan
        names = {name: idx for idx, name in devices.names().items()}
        assert devices.is_peer(names[lab.pods["app/b"].host_if])
        assert not devices.is_peer(names["stkx0"]) and not devices.is_peer(names["lo"])
    finally:
        devices.close()


def test_a_translated_flow_is_left_to_the_node(lab: Lab, pin_root: str, peer_delivery: None) -> None:
    """c connects to a Service-like address the node DNATs to b. The flow table knows that flow
    by b's address at b and by the Service address at c, so nothing of it is delivered: the
    node's conntrack translates b's packets back. Not even once the flow table forgot it and b
    speaks first: judged afresh, b's packet is no TCP SYN and c knows no flow by that tuple."""
    build(lab)
    vip, port = "10.30.0.100", 8090
    nft_file(lab.node, f"""
table ip stksvc {{
  chain pre {{
    type nat hook prerouting priority -100;
    ip daddr {vip} tcp dport {port} dnat to {B}
  }}
}}""")
    ep = ipaddress.ip_address
    open_ = Program("file", {key: EndpointProgram(key, tuple(map(ep, ips)))
                             for key, ips in (("app/a", (A, A6)), ("app/b", (B, B6)), ("app/c", (C,)))})
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(open_)
        exchange(*tcp_pair(lab))  # b's veth is known from here on (delivery possible)
        cli, srv = tcp_pair(lab, "app/c", vip, port)
        exchange(cli, srv)
        for s in (cli, srv):  # no delayed ACK left to teach the flow table again
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        assert dp.forget(dp.established()) > 0  # the flow table forgets everything
        assert until(lambda: dp.forget(dp.established()) == 0, timeout=5)
        for i in range(5):  # b speaks first
            srv.sendall(b"push%d" % i)
            assert cli.recv(64) == b"push%d" % i
            cli.sendall(b"ack%d" % i)
            assert srv.recv(64) == b"ack%d" % i
        cli.close()
        srv.close()
    finally:
        dp.cleanup()


def test_the_cli_sets_the_delivery(lab: Lab, pin_root: str, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`stockade apply --ebpf-deliver peer` writes it into the running `config` map."""
    monkeypatch.delenv(DELIVER_ENV, raising=False)
    monkeypatch.setenv(PIN_ROOT_ENV, pin_root)
    enforcement.build(lab)
    src = tmp_path / "src"
    enforcement.write(src, enforcement.cluster())
    bad = lab.stockade("apply", "--source", str(src), "--ebpf-deliver", "redirect", check=False)
    assert bad.returncode == 2 and "--ebpf-deliver" in bad.stderr
    for how, want in (("peer", 1), ("stack", 0)):
        lab.stockade("apply", "--source", str(src), "--node", "lab", "--dataplane", "ebpf", "--state-dir", "",
                     "--ebpf-deliver", how)
        build = next(d for d in os.listdir(pin_root) if not d.startswith("shared-"))
        config = bpfsys.Map.pinned(f"{pin_root}/{build}/config")
        try:
            assert Config.from_buffer_copy(config.lookup(u32(0))).deliver == want
        finally:
            config.close()
    lab.stockade("cleanup", "--dataplane", "ebpf")
