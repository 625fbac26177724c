"""The eBPF dataplane on real packets: verdicts agree with the simulator, replies pass,
IPv6, port ranges, node traffic, counters, atomic updates, cleanup.

Privileged: fails (not skips) without root, bpffs, bcc or kernel headers. Uses the
shared namespace lab; programs are written as IR directly so drop-before-accept
rules, wide and small port ranges and peers=None are all covered.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys

import pytest

from agent.dataplane.ebpf import EbpfDataplane
from agent.ir import (
    Direction,
    DirectionProgram,
    EndpointProgram,
    PortMatch,
    Program,
    Rule,
    Verdict,
)
from agent.simulate import evaluate
from tests.kit import NETPROBE, Lab, sh
from tests.kit.ebpf_lab import A6, B6, B_PORTS, A, B, C, build, net, origin, program


def ping(lab: Lab, src: str, *addrs: str) -> dict[str, bool]:
    seen = lab.probe_many({src: [f"icmp:{a}" for a in addrs]}, timeout=1)[src]
    return {spec.removeprefix("icmp:"): ok for spec, ok in seen.items()}


def expect(prog: Program, src: str, dst: str, proto: str, port: int | None) -> bool:
    v = evaluate(prog, ipaddress.ip_address(src), ipaddress.ip_address(dst), proto, port)
    return v.verdict is Verdict.ACCEPT


def test_verdicts_replies_ranges_counters(lab: Lab, pin_root: str) -> None:
    build(lab)
    prog = program()
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(prog)
        assert not dp.unattached
        specs = {
            "app/a": [f"{p}:{B}:{n}" for p in ("tcp", "udp") for n in B_PORTS]
            + [f"tcp:{B6}:{n}" for n in (80, 81, 1024, 65535)] + [f"udp:{B6}:8003", f"tcp:{C}:80"],
            "app/c": [f"{p}:{B}:{n}" for p in ("tcp", "udp") for n in B_PORTS] + [f"tcp:{A}:80"],
            "app/b": [f"tcp:{A}:80", f"udp:{A}:80", f"tcp:{C}:80"],
        }
        seen = lab.probe_many(specs, timeout=0.8)
        srcs = {"app/a": (A, A6), "app/b": (B, B6), "app/c": (C, C)}
        wrong = []
        for src, results in seen.items():
            for spec, ok in results.items():
                proto, rest = spec.split(":", 1)
                addr, port = rest.rsplit(":", 1)
                s = srcs[src][1] if ":" in addr else srcs[src][0]
                if ok != expect(prog, s, addr, proto, int(port)):
                    wrong.append((src, spec, ok))
        assert not wrong, wrong
        # the wide range and the small one, both families, were exercised both ways
        assert seen["app/a"][f"tcp:{B}:65535"] and seen["app/a"][f"tcp:{B6}:1024"]
        assert not seen["app/a"][f"tcp:{B}:1023"] and not seen["app/a"][f"udp:{B}:8004"]
        assert seen["app/a"][f"udp:{B}:8003"] and not seen["app/c"][f"tcp:{B}:80"]
        # ICMP echo (rule with peers=None), replies through isolated directions
        assert ping(lab, "app/a", B, B6) == {B: True, B6: True}
        assert ping(lab, "app/c", B, A) == {B: True, A: False}
        # node-originated traffic into an isolated pod always passes, whatever the rules
        assert lab.probe_from_node(f"tcp:{B}:81") and lab.probe_from_node(f"tcp:{A}:80")
        c = dp.counters()
        assert c.rules[("app/b", prog.endpoints["app/b"].ingress.rules[1].id, Direction.INGRESS)].packets > 0
        c_drop = prog.endpoints["app/b"].ingress.rules[0].id
        assert c.rules[("app/b", c_drop, Direction.INGRESS)].packets > 0  # the drop rule
        assert c.drops[("app/b", Direction.INGRESS)].packets > 0
        assert c.drops[("app/a", Direction.INGRESS)].packets > 0  # c -> a
        fill = dp.fill()
        assert fill["flows"][0] > 0 and fill["epstate"][0] == 3
    finally:
        dp.cleanup()
    for pod in ("v0", "v1", "v2"):
        for hook in ("ingress", "egress"):
            assert "stockade" not in lab.node_sh("tc", "filter", "show", "dev", pod, hook).stdout
    assert not os.path.exists(pin_root)


def test_resets_and_icmp_errors_of_allowed_flows_pass(lab: Lab, pin_root: str) -> None:
    """b's egress is isolated with no rules: its RST and ICMP port-unreachable answers to
    allowed flows get out only as replies/related packets of those flows."""
    build(lab)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(program())
        specs = [f"tcp:{B}:50000", f"udp:{B}:8001", f"tcp:{B6}:50000", f"udp:{B6}:8002"]
        out = json.loads(sh(sys.executable, str(NETPROBE), "refused", "1", *specs, ns=lab.pods["app/a"].netns).stdout)
        assert out == dict.fromkeys(specs, "refused")
        # from c, udp/8001 is denied at b's ingress: no error comes back either
        out = json.loads(sh(sys.executable, str(NETPROBE), "refused", "1", f"udp:{B}:8001",
                            ns=lab.pods["app/c"].netns).stdout)
        assert out == {f"udp:{B}:8001": "timeout"}
    finally:
        dp.cleanup()


def test_fragments_follow_their_first_fragment(lab: Lab, pin_root: str) -> None:
    """4000-byte UDP datagrams: allowed ones pass in both directions (later fragments have
    no port; they pass because their first fragment did), denied ones never do."""
    build(lab)
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(program())
        big = lambda src, *specs: json.loads(sh(  # noqa: E731
            sys.executable, str(NETPROBE), "big", "1", "4000", *specs, ns=lab.pods[src].netns).stdout)
        assert big("app/a", f"udp:{B}:8000", f"udp:{B6}:8003") == {f"udp:{B}:8000": True, f"udp:{B6}:8003": True}
        assert big("app/c", f"udp:{B}:8000") == {f"udp:{B}:8000": False}
        assert dp.fill()["frags"][0] > 0
    finally:
        dp.cleanup()


def test_update_is_atomic_and_incremental(lab: Lab, pin_root: str) -> None:
    build(lab)
    prog = program()
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(prog)
        before = dp.fill()
        assert lab.reachable("app/a", B, 81) is False
        # allow a -> b:81 by changing only b's ingress
        b = prog.endpoints["app/b"]
        extra = Rule(origin(4), net(A), (PortMatch("tcp", 81, 81),), key="a-81")
        b2 = EndpointProgram(b.key, b.ips, DirectionProgram(True, (*b.ingress.rules, extra)), b.egress)
        prog2 = Program("file", {**prog.endpoints, "app/b": b2})
        stats = dp.apply(prog2)
        assert stats.chains_written == 1  # only b's tables were rewritten
        assert lab.reachable("app/a", B, 81) is True
        after = dp.fill()
        # the old generation's entries are gone: one more port entry, same peers
        assert after["peers"][0] == before["peers"][0]
        assert after["ports"][0] > before["ports"][0]
        assert dp.apply(prog2).chains_written == 0
        # an endpoint going away: its addresses are no longer judged, maps shrink
        prog3 = Program("file", {k: v for k, v in prog2.endpoints.items() if k != "app/b"})
        dp.apply(prog3)
        assert lab.reachable("app/c", B, 80) is True
        assert dp.fill()["epstate"][0] == 2
    finally:
        dp.cleanup()


def test_full_map_is_a_loud_error(lab: Lab, pin_root: str) -> None:
    from agent.dataplane.base import DataplaneError
    from agent.dataplane.ebpf import Sizes

    build(lab)
    dp = EbpfDataplane(Sizes(peers=2), pin_root=pin_root, netns=lab.node, limit=Sizes(peers=2))  # may not grow
    try:
        with pytest.raises(DataplaneError, match="peers"):
            dp.apply(program())
    finally:
        dp.cleanup()
