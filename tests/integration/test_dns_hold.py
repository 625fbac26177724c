"""The DNS answer hold (agent/dns/hold.py, bpf/dnshold.c) on this kernel, by real queries:
the kit's DNS server (tests/kit/dns_lab.py: dnspython, answering *.example.test) in its own pod
namespace, a pod asking it with dnspython's stub resolver, the hold on the pod's host-side veth in the node namespace.

- the answer reaches the pod only after the agent processed it: while the agent's callback
  holds it the pod has no answer; released, the pod gets exactly the answer (IPv4 and IPv6),
  after the time the callback recorded, and the learner reads the addresses from it;
- the agent down (heartbeat stopped): once the deadline passed, answers pass unheld (fail-
  open), or are dropped (fail-closed) until the agent serves again;
- over TCP the segment that completes an answer is held likewise, the answer sent in one
  segment or cut in three (the agent sees it once, complete); every other segment of the
  flow goes through the agent too, in order;
- a UDP reply from any other port is never held;
- `remove_filters` (what `stockade cleanup` calls) takes the hold off the devices.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from agent.dns.hold import CFG_DEADLINE, Hold, remove_filters
from agent.dns.learn import updates
from agent.inventory import IPAddress
from agent.policy.cluster import DomainRule, parse_domain
from tests.kit import Lab, dns_lab, expect, until
from tests.kit.netns import worker

CLIENT, CLIENT6 = "10.34.0.1", "fd00:34::1"
SERVER, SERVER6 = "10.34.0.53", "fd00:34::53"
ANSWER_A, ANSWER_AAAA = "192.0.2.80", "2001:db8::80"

# the kit's DNS server: any *.example.test -> ANSWER_A / ANSWER_AAAA; over TCP (IPv4 only) one
# query per connection, names starting with "split." answered in three segments
SERVER_PY = dns_lab.server_script(ANSWER_A, ANSWER_AAAA, "192.0.2.81")

CLIENT_PY = """
import json, sys, time
import dns.resolver
res = dns.resolver.Resolver(configure=False)
res.nameservers = [sys.argv[1]]
res.timeout = res.lifetime = float(sys.argv[4])
try:
    ans = res.resolve(sys.argv[2], sys.argv[3], tcp=len(sys.argv) > 5)
    print(json.dumps({"addrs": sorted(r.address for r in ans), "t": time.monotonic()}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "t": time.monotonic()}))
"""

RULES = [DomainRule("r", (parse_domain("*.example.test", "f"),))]


class Agent:
    """The agent's side: records each answer, optionally holding it until released."""

    def __init__(self) -> None:
        self.seen: list[tuple[IPAddress, bytes, float]] = []
        self.gate = threading.Event()
        self.gate.set()

    def on_answer(self, dst: IPAddress, payload: bytes) -> None:
        self.seen.append((dst, payload, time.monotonic()))
        self.gate.wait(30)


@pytest.fixture
def lab_pods(lab: Lab) -> Iterator[Lab]:
    lab.add_pod("app/client", [CLIENT, CLIENT6])
    server = lab.add_pod("dns/server", [SERVER, SERVER6])
    dns_lab.start_dns_server(lab, server.netns, SERVER_PY)
    yield lab


@pytest.fixture
def node(lab_pods: Lab) -> Iterator[ThreadPoolExecutor]:
    pool = worker(lab_pods.node)
    try:
        yield pool
    finally:
        pool.shutdown()


def make_hold(lab: Lab, node: ThreadPoolExecutor, agent: Agent, fail_closed: bool = False) -> Hold:
    hold = node.submit(lambda: Hold(agent.on_answer, lab.node, grace=1.0, fail_closed=fail_closed)).result()
    node.submit(lambda: hold.attach(lab.pods["app/client"].host_if)).result()
    return hold


def ask(lab: Lab, server: str, name: str, rdtype: str = "A", timeout: float = 5.0,
        tcp: bool = False) -> subprocess.Popen:
    argv = [sys.executable, "-c", CLIENT_PY, server, name, rdtype, str(timeout), *(["tcp"] if tcp else [])]
    return subprocess.Popen(["ip", "netns", "exec", lab.pods["app/client"].netns, *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out)


SYN_PY = f"""
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.bind(("{SERVER6}", 53))  # the server's TCP listener is IPv4 only
s.settimeout(10)
try:
    s.connect(("{CLIENT6}", 9))
    print("connected")
except OSError as e:
    print(type(e).__name__)
"""


def syn_from_53(lab: Lab) -> str:
    """A connection opened from the server's port 53 to the pod (nothing listens there)."""
    out = subprocess.run(["ip", "netns", "exec", lab.pods["dns/server"].netns, sys.executable, "-c", SYN_PY],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def heartbeat_stopped(hold: Hold) -> None:
    hold.stop()
    until(lambda: time.monotonic_ns() > hold.stat(CFG_DEADLINE), timeout=10)


def test_answer_reaches_the_pod_only_after_the_agent_processed_it(lab_pods: Lab, node: ThreadPoolExecutor) -> None:
    agent = Agent()
    hold = make_hold(lab_pods, node, agent)
    try:
        hold.start()
        for server, rdtype, want in ((SERVER, "A", ANSWER_A), (SERVER6, "AAAA", ANSWER_AAAA)):
            agent.gate.clear()
            n = len(agent.seen)
            proc = ask(lab_pods, server, "www.example.test", rdtype)
            expect(lambda n=n: len(agent.seen) > n, timeout=30, what="the agent has the answer")
            dst, payload, t_agent = agent.seen[-1]
            # the only copy is in the agent's hands: the pod has no answer yet
            assert proc.poll() is None
            assert dst == ipaddress.ip_address(CLIENT if rdtype == "A" else CLIENT6)
            learned = updates("app/client", RULES, payload, 0.0)
            assert [(r, str(ip)) for _, r, ip, _ in learned] == [("r", want)]
            agent.gate.set()
            got = result(proc)
            assert got["addrs"] == [want]
            assert got["t"] > t_agent  # received after the agent processed it
        assert hold.stats == {"held": 2, "held_tcp": 0, "unheld": 0, "dropped": 0}
        assert hold.released == 2

        # TCP: the segment completing the answer is held likewise, in one piece or in three
        for name in ("tcp.example.test", "split.example.test"):
            agent.gate.clear()
            n = len(agent.seen)
            proc = ask(lab_pods, SERVER, name, tcp=True)
            expect(lambda n=n: len(agent.seen) > n, timeout=30, what="the agent has the TCP answer")
            assert proc.poll() is None
            dst, payload, t_agent = agent.seen[-1]
            assert dst == ipaddress.ip_address(CLIENT)
            assert [str(ip) for _, _, ip, _ in updates("app/client", RULES, payload, 0.0)] == [ANSWER_A]
            agent.gate.set()
            got = result(proc)
            assert got["addrs"] == [ANSWER_A] and got["t"] > t_agent
            assert len(agent.seen) == n + 1  # each answer once, however it was cut
        tcp_held = hold.stats["held_tcp"]
        assert tcp_held >= 2 + 4  # SYN-ACKs, ACKs, the answer's segments, FINs: all in order through the agent

        # not held: UDP replies from other ports (a probe to the server's 81), a SYN from port 53
        assert lab_pods.reachable("app/client", SERVER, 81, proto="udp")
        assert hold.stats["held"] - hold.stats["held_tcp"] == 2
        assert syn_from_53(lab_pods) == "ConnectionRefusedError"  # the pod's RST: its SYN went straight through
        assert hold.stats["held_tcp"] == tcp_held

        # the agent down: once its heartbeat ran out, answers pass unheld (fail-open)
        heartbeat_stopped(hold)
        assert result(ask(lab_pods, SERVER, "late.example.test"))["addrs"] == [ANSWER_A]
        assert hold.stats == {"held": 2 + tcp_held, "held_tcp": tcp_held, "unheld": 1, "dropped": 0}
    finally:
        agent.gate.set()
        node.submit(hold.close).result()


def test_fail_closed_drops_while_the_agent_is_down(lab_pods: Lab, node: ThreadPoolExecutor) -> None:
    agent = Agent()
    hold = make_hold(lab_pods, node, agent, fail_closed=True)
    try:
        hold.start()
        assert result(ask(lab_pods, SERVER, "a.example.test"))["addrs"] == [ANSWER_A]
        heartbeat_stopped(hold)
        assert "Timeout" in result(ask(lab_pods, SERVER, "b.example.test", timeout=1.0)).get("error", "")
        assert hold.stats["dropped"] >= 1 and hold.stats["unheld"] == 0
        # an agent that never comes back: `stockade cleanup` removes the filters
        assert remove_filters(lab_pods.node) == 1
        dropped = hold.stats["dropped"]
        assert result(ask(lab_pods, SERVER, "d.example.test"))["addrs"] == [ANSWER_A]
        assert hold.stats["dropped"] == dropped
        node.submit(lambda: hold.attach(lab_pods.pods["app/client"].host_if)).result()
        hold.start()  # the agent is back: held and released again
        assert result(ask(lab_pods, SERVER, "c.example.test"))["addrs"] == [ANSWER_A]
        assert len(agent.seen) == 2
    finally:
        node.submit(hold.close).result()
