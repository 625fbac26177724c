"""eBPF maps that grow instead of overflowing, seen from packets: a dataplane started with
tiny maps is given more and more endpoints and peers; every time the program no longer
fits, a build with larger maps is compiled, filled with what the kernel holds and
switched to under the tc filters. Fresh connections probe all the while: the denied
ones never pass, the allowed ones never fail. A program beyond the limit is refused
loudly (error, fill ratio above 1) and the previous policy stays in force.

Privileged, as the other eBPF packet tests (root, bpffs, bcc, kernel headers).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

from agent.dataplane.base import DataplaneError
from agent.dataplane.ebpf import EbpfDataplane, Sizes
from agent.ir import Direction, DirectionProgram, EndpointProgram, Origin, PeerSet, PortMatch, Program, Rule
from tests.kit import Lab

A, B, C = "10.30.0.1", "10.30.0.2", "10.30.0.3"
TINY = Sizes(endpoints=8, addrs=16, peers=16, ports=16, counters=16)

# Fresh connections (a new flow each) from threads, one spec per thread, until stdin
# closes; "ready" once every spec was tried; then {spec: [tries, successes]} as JSON.
HAMMER = r"""
import json, socket, sys, threading
stop = threading.Event()
out = {s: [0, 0] for s in sys.argv[1:]}
lock = threading.Lock()
def run(spec):
    proto, addr, port = spec.split(":")
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    while not stop.is_set():
        ok = False
        with socket.socket(socket.AF_INET, kind) as s:
            s.settimeout(0.2 if "deny" in spec else 2.0)
            try:
                s.connect((addr.removeprefix("deny"), int(port)))
                s.send(b"ping")
                ok = s.recv(64).startswith(b"pong")
            except OSError:
                pass
        with lock:
            out[spec][0] += 1
            out[spec][1] += ok
            if all(t for t, _ in out.values()) and not getattr(run, "told", False):
                run.told = True
                print("ready", flush=True)
threads = [threading.Thread(target=run, args=(s,)) for s in sys.argv[1:] for _ in range(2)]
for t in threads:
    t.start()
sys.stdin.read()
stop.set()
for t in threads:
    t.join()
print(json.dumps(out), flush=True)
"""


def _rule(i: int, d: Direction, peers: str, port: int | None = None) -> Rule:
    ports = (PortMatch("tcp", port, port),) if port else ()
    return Rule(Origin("file", "app", f"p{i}", d, 0), PeerSet.of([ipaddress.ip_network(peers)]), ports, key=f"r{i}")


def program(fillers: int) -> Program:
    """a accepts only c (on 80) and sends only to c; b is open; `fillers` more endpoints
    (no device here) with a distinct peer prefix and port each fill the maps."""
    ing, eg = Direction.INGRESS, Direction.EGRESS
    eps = {
        "app/a": EndpointProgram("app/a", (ipaddress.ip_address(A),),
                                 ingress=DirectionProgram(True, (_rule(0, ing, f"{C}/32", 80),)),
                                 egress=DirectionProgram(True, (_rule(1, eg, f"{C}/32"),))),
        "app/b": EndpointProgram("app/b", (ipaddress.ip_address(B),)),
        "app/c": EndpointProgram("app/c", (ipaddress.ip_address(C),)),
    }
    for i in range(fillers):
        key = f"fill/f{i:04d}"
        rules = tuple(_rule(10 + i * 4 + j, ing, f"10.{40 + j}.{i // 250}.{i % 250}/32", 1000 + i) for j in range(3))
        eps[key] = EndpointProgram(key, (ipaddress.ip_address(f"10.31.{i // 250}.{i % 250 + 1}"),),
                                   ingress=DirectionProgram(True, rules))
    return Program("file", eps)


def builds_in(pin_root: str) -> list[str]:
    """The builds pinned under `pin_root`, after checking that only the one set of maps
    they share (flows, frags) is pinned beside them."""
    entries = sorted(os.listdir(pin_root))
    shared = [e for e in entries if e.startswith("shared-")]
    assert len(shared) == 1 and sorted(os.listdir(f"{pin_root}/{shared[0]}")) == ["flows", "frags"], entries
    return [e for e in entries if e not in shared]


def build(lab: Lab) -> None:
    for key, ip in (("app/a", A), ("app/b", B), ("app/c", C)):
        lab.add_pod(key, [ip], ports=(80, 81))


def verdicts(lab: Lab) -> dict[tuple[str, str], bool]:
    specs = {"app/b": [f"tcp:{A}:80", f"udp:{A}:80", f"tcp:{C}:80"],
             "app/c": [f"tcp:{A}:80", f"tcp:{A}:81", f"tcp:{B}:80"],
             "app/a": [f"tcp:{B}:80", f"tcp:{C}:80"]}
    return {(src, spec): ok for src, res in lab.probe_many(specs, timeout=0.5).items() for spec, ok in res.items()}


EXPECTED = {("app/b", f"tcp:{A}:80"): False, ("app/b", f"udp:{A}:80"): False, ("app/b", f"tcp:{C}:80"): True,
            ("app/c", f"tcp:{A}:80"): True, ("app/c", f"tcp:{A}:81"): False, ("app/c", f"tcp:{B}:80"): True,
            ("app/a", f"tcp:{B}:80"): False, ("app/a", f"tcp:{C}:80"): True}


def hammer(lab: Lab, src: str, *specs: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(["ip", "netns", "exec", lab.pods[src].netns, sys.executable, "-c", HAMMER, *specs],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
    return p


def finish(p: subprocess.Popen[str]) -> dict[str, list[int]]:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_maps_grow_with_no_gap(lab: Lab, pin_root: str) -> None:
    build(lab)
    dp = EbpfDataplane(TINY, pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(program(0))
        first = dp.build
        assert verdicts(lab) == EXPECTED
        # b -> a and c -> a:81 denied by a's ingress, a -> b by its egress; c -> a:80 allowed
        probes = {"app/b": hammer(lab, "app/b", f"tcp:deny{A}:80", f"udp:deny{A}:80"),
                  "app/c": hammer(lab, "app/c", f"tcp:{A}:80", f"tcp:deny{A}:81"),
                  "app/a": hammer(lab, "app/a", f"tcp:{C}:80", f"tcp:deny{B}:80")}
        # every device repointed at the grown build, one by one: verdicts probed in between
        attach, between = dp.devices.attach, []

        def probed_attach(idx: int, fds: dict[int, int], ids: dict[int, int]) -> None:
            attach(idx, fds, ids)
            between.append(verdicts(lab))

        dp.devices.attach = probed_attach  # type: ignore[method-assign]
        try:
            for fillers in (4, 40):  # each too big for the maps in use
                before = dp.build
                dp.apply(program(fillers))
                assert dp.build != before, fillers
                fill = dp.fill(walk=False)
                assert all(n <= cap for n, cap in fill.values()), fill
        finally:
            seen = {src: finish(p) for src, p in probes.items()}
        dp.devices.attach = attach  # type: ignore[method-assign]
        assert dp.growths == 2 and dp.build != first
        assert len(between) >= 2 * 3 and all(v == EXPECTED for v in between), between
        assert dp.sizes.peers > TINY.peers and dp.sizes.endpoints > TINY.endpoints
        leaks = {(src, s): n for src, res in seen.items() for s, (_, n) in res.items() if "deny" in s and n}
        failed = {(src, s): t - n for src, res in seen.items() for s, (t, n) in res.items()
                  if "deny" not in s and n != t}
        assert not leaks, f"denied connections passed across the growth: {leaks} ({seen})"
        assert not failed, f"allowed connections failed across the growth: {failed} ({seen})"
        assert verdicts(lab) == EXPECTED
        assert builds_in(pin_root) == [dp.build]  # the small builds are gone
        # the rule counters were copied into the grown maps and count on there
        counted = dp.counters()
        assert sum(c.packets for (key, _, d), c in counted.rules.items() if key == "app/a" and d == Direction.INGRESS)
        assert counted.drops[("app/a", Direction.INGRESS)].packets > 0
        # a restarted agent adopts the grown build (no new compile) and keeps enforcing
        dp2 = EbpfDataplane(TINY, pin_root=pin_root, netns=lab.node)
        dp2.apply(program(40))
        assert dp2.build == dp.build and dp2.growths == 0 and not dp2.last_load
        assert verdicts(lab) == EXPECTED
        dp2.close()
    finally:
        dp.cleanup()


def test_map_that_cannot_grow_is_refused_and_visible(lab: Lab, pin_root: str) -> None:
    build(lab)
    dp = EbpfDataplane(TINY, pin_root=pin_root, netns=lab.node, limit=Sizes(peers=64))
    try:
        dp.apply(program(0))
        with pytest.raises(DataplaneError, match=r"peers would need .* the most it grows to is 64"):
            dp.apply(program(40))
        assert dp.map_fill()["peers"] > 1  # the alert the metric carries
        assert verdicts(lab) == EXPECTED  # the last good state, untouched
        dp.apply(program(2))  # fits after growing within the limit
        assert dp.map_fill()["peers"] <= 1 and not dp.refused
        assert verdicts(lab) == EXPECTED
    finally:
        dp.cleanup()


def test_failed_growth_keeps_the_old_build(lab: Lab, pin_root: str) -> None:
    """A growth that fails half-way (here: repointing the second device's filters) puts
    every device back on the old build, which was never changed, and removes the new
    one; the next apply grows again."""
    build(lab)
    dp = EbpfDataplane(TINY, pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(program(0))
        small = dp.build
        attach, calls = dp.devices.attach, []

        def failing_attach(idx: int, fds: dict[int, int], ids: dict[int, int]) -> None:
            if dp.build != small:
                calls.append(idx)
                if len(calls) == 2:
                    raise DataplaneError("injected: cannot attach")
            attach(idx, fds, ids)

        dp.devices.attach = failing_attach  # type: ignore[method-assign]
        with pytest.raises(DataplaneError, match="injected"):
            dp.apply(program(40))
        dp.devices.attach = attach  # type: ignore[method-assign]
        assert dp.build == small and builds_in(pin_root) == [small]
        index = {name: idx for idx, name in dp.devices.names().items()}
        for pod in ("app/a", "app/b", "app/c"):
            names = dp.devices.filter_names(index[lab.pods[pod].host_if]).values()
            assert len(names) == 2 and all(n.startswith(f"stockade-{small}-") for n in names), names
        assert verdicts(lab) == EXPECTED
        dp.apply(program(40))
        assert dp.build != small and builds_in(pin_root) == [dp.build]
        assert verdicts(lab) == EXPECTED
    finally:
        dp.cleanup()
