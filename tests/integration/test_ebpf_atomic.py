"""Atomic policy switches in the eBPF dataplane, seen from packets: one global flip switches
every endpoint at once, and a packet between two local endpoints is judged for both ends
under one slot (at the source's hook), so it never meets one endpoint's old tables and
the other's new ones.

Two pods swap isolation: before, a's egress and ingress accept only c while b is open;
after, a is open and b accepts only c (on port 80) and sends only to c. a <-> b is denied by both policies, but
a's new egress with b's old ingress (or b's old egress with a's new ingress) allows it.
Hundreds of changed filler endpoints sit between a and b in program order, so a
dataplane that switched endpoint by endpoint would hold that mixture for a while.
"""

from __future__ import annotations

import ipaddress
import json
import struct
import subprocess
import sys
import time

from agent.dataplane.ebpf import EbpfDataplane
from agent.ir import Direction, DirectionProgram, EndpointProgram, Origin, PeerSet, PortMatch, Program, Rule
from tests.kit import Lab

A, B, C = "10.30.0.1", "10.30.0.2", "10.30.0.3"
FILLER = 300

# Each thread opens one fresh connection (new source port: a new flow) after another.
HAMMER = r"""
import json, socket, sys, threading, time
end = time.monotonic() + float(sys.argv[1])
out = {s: [0, 0] for s in sys.argv[2:]}
lock = threading.Lock()
def run(spec):
    proto, addr, port = spec.split(":")
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    while time.monotonic() < end:
        ok = False
        with socket.socket(socket.AF_INET, kind) as s:
            s.settimeout(0.05 if addr != sys.argv[-1].split(":")[1] else 1.0)
            try:
                s.connect((addr, int(port)))
                s.send(b"ping")
                ok = s.recv(64).startswith(b"pong")
            except OSError:
                pass
        with lock:
            out[spec][0] += 1
            out[spec][1] += ok
threads = [threading.Thread(target=run, args=(s,)) for s in sys.argv[2:] for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


def _o(i: int, d: Direction, pol: str) -> Origin:
    return Origin("file", "app", pol, d, i)


def _to(*xs: str) -> PeerSet:
    return PeerSet.of(ipaddress.ip_network(x) for x in xs)


def program(after: bool, variant: int) -> Program:
    ing, eg = Direction.INGRESS, Direction.EGRESS
    only_c_in = DirectionProgram(True, (Rule(_o(0, ing, "c"), _to(C), (), key="from-c"),))
    only_c_out = DirectionProgram(True, (Rule(_o(0, eg, "c"), _to(C), (), key="to-c"),))
    c_web_in = DirectionProgram(True, (Rule(_o(0, ing, "c"), _to(C), (PortMatch("tcp", 80, 80),), key="c-web"),))
    open_ = DirectionProgram()
    eps = {"app/a": EndpointProgram("app/a", (ipaddress.ip_address(A),),
                                    ingress=open_ if after else only_c_in, egress=open_ if after else only_c_out)}
    for i in range(FILLER):  # changed by every switch (another port each time)
        key = f"mid/f{i:04d}"
        port = 80 + (i + variant) % 7
        rule = Rule(_o(i, ing, f"f{i}"), _to("10.30.0.0/24"), (PortMatch("tcp", port, port),), key=f"f{i}-{variant}")
        eps[key] = EndpointProgram(key, (ipaddress.ip_address(f"10.31.{i // 250}.{i % 250 + 1}"),),
                                   ingress=DirectionProgram(True, (rule,)))
    eps["app/b"] = EndpointProgram("app/b", (ipaddress.ip_address(B),),
                                   ingress=c_web_in if after else open_, egress=only_c_out if after else open_)
    eps["app/c"] = EndpointProgram("app/c", (ipaddress.ip_address(C),))
    return Program("file", eps)


def build(lab: Lab) -> None:
    for key, ip in (("app/a", A), ("app/b", B), ("app/c", C)):
        lab.add_pod(key, [ip], ports=(80, 81))


def verdicts(lab: Lab) -> dict[tuple[str, str], bool]:
    specs = {"app/a": [f"tcp:{B}:80", f"udp:{B}:80", f"tcp:{C}:80"],
             "app/b": [f"tcp:{A}:80", f"udp:{A}:80", f"tcp:{C}:80"],
             "app/c": [f"tcp:{A}:80", f"tcp:{B}:80", f"tcp:{B}:81"]}
    return {(src, spec): ok for src, res in lab.probe_many(specs, timeout=0.5).items() for spec, ok in res.items()}


def test_cross_endpoint_swap_is_atomic(lab: Lab, pin_root: str) -> None:
    """Continuous fresh connections a <-> b (denied by both policies) while the swap is
    applied back and forth: not one passes; a <-> c and b <-> c (allowed by both) never fail."""
    build(lab)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(program(False, 0))
        flips, took = 12, []
        t0 = time.monotonic()
        dp.apply(program(True, 1))
        dp.apply(program(False, 2))
        duration = (time.monotonic() - t0) / 2 * flips + 2.0
        hammers = {
            src: subprocess.Popen(
                ["ip", "netns", "exec", lab.pods[src].netns, sys.executable, "-c", HAMMER, str(duration),
                 f"tcp:{peer}:80", f"udp:{peer}:80", f"tcp:{C}:80"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for src, peer in (("app/a", B), ("app/b", A))
        }
        time.sleep(0.5)
        for i in range(flips):
            t = time.monotonic()
            dp.apply(program(i % 2 == 0, 3 + i))
            took.append(time.monotonic() - t)
        seen = {}
        for src, proc in hammers.items():
            out, err = proc.communicate(timeout=duration + 30)
            assert proc.returncode == 0, err
            seen[src] = json.loads(out)
        leaks = {(src, spec): n for src, res in seen.items() for spec, (_, n) in res.items() if C not in spec and n}
        failed = {(src, spec): tries - n for src, res in seen.items() for spec, (tries, n) in res.items()
                  if C in spec and n != tries}
        tries = sum(t for res in seen.values() for spec, (t, _) in res.items() if C not in spec)
        assert tries > 200, (tries, took)  # the probes did cover the switches
        assert not leaks, f"mixtures passed: {leaks} (of {tries} attempts, applies took {took})"
        assert not failed, f"allowed by both, blocked: {failed}"
    finally:
        dp.cleanup()


def test_flip_switches_everything_at_once(lab: Lab, pin_root: str) -> None:
    """Right before the flip (the new policy written whole into the inactive slot) every
    verdict is the old policy's; right after it (the previous slot not yet caught up),
    every verdict is the new one's. A kill anywhere in an apply leaves one or the other."""
    build(lab)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(program(False, 0))
        old = verdicts(lab)
        assert not old[("app/a", f"tcp:{B}:80")] and old[("app/c", f"tcp:{B}:81")]
        dp.apply(program(True, 1))
        new = verdicts(lab)
        assert not new[("app/a", f"tcp:{B}:80")] and new[("app/c", f"tcp:{B}:80")]
        assert {k for k in old if old[k] != new[k]} == {("app/c", f"tcp:{B}:81")}
        dp.apply(program(False, 2))
        assert verdicts(lab) == old
        seen: dict[str, object] = {}
        flip = dp._flip

        def probed_flip(slot: int) -> None:
            seen["before"] = verdicts(lab)
            flip(slot)
            seen["after"] = verdicts(lab)

        dp._flip = probed_flip  # type: ignore[method-assign]
        dp.apply(program(True, 3))
        assert seen == {"before": old, "after": new}
        dp.apply(program(False, 4))
        assert seen == {"before": new, "after": old}
    finally:
        dp.cleanup()


def test_destination_is_judged_at_the_source_hook(lab: Lab, pin_root: str) -> None:
    """A packet between two local endpoints is judged for both at the source's hook, under
    one slot: with b's own filters gone, a -> b is still denied by b's ingress (counted as
    b's drop), and an allowed a -> c flow is remembered at c's ingress as well."""
    build(lab)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(program(True, 0))  # b accepts only c; a is open
        for hook in ("ingress", "egress"):
            lab.node_sh("tc", "filter", "del", "dev", lab.pods["app/b"].host_if, hook)
        drops = dp.counters().drops[("app/b", Direction.INGRESS)].packets
        assert not lab.reachable("app/a", B, 80) and lab.reachable("app/c", B, 80)
        assert dp.counters().drops[("app/b", Direction.INGRESS)].packets > drops
        assert lab.probe_from_node(f"tcp:{B}:80")  # node traffic: nothing judges it any more
        assert lab.reachable("app/a", C, 81)
        assert dp.eps is not None
        c_id = dp.eps["app/c"].ep_id
        at_c = [k for k in dp.maps["flows"].all_keys()
                if struct.unpack("<IB", k[:5]) == (c_id, 0) and k[12:16] == ipaddress.ip_address(A).packed
                and struct.unpack(">H", k[10:12])[0] == 81]
        assert at_c
    finally:
        dp.cleanup()
