"""Hostile names on real packets, both dataplanes (issue 16, injection slice).

Endpoints and policies whose names hold nft syntax, a forged command, NUL, a lone
surrogate and over-long multi-byte text (tests/kit/hostile_agent.py) are applied
next to an ordinary policy, as IR directly (admission would refuse such names; the
dataplanes must be safe without it). Every verdict matches the simulator by packets, a
later update of the ordinary and the hostile policies reaches the kernel as a diff,
counters and sampled drops are attributed to the exact hostile names and policies, and
a restarted dataplane (eBPF: adopting its pinned maps) still enforces and attributes.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from typing import Any

from agent.ir import Direction, Verdict
from agent.simulate import evaluate
from tests.kit import ROOT, Lab, until
from tests.kit.hostile_agent import HOSTILE, HOSTILE_C, A, B, C, program

PODS = {"a": A, "b": B, "c": C}
PORTS = (80, 81, 82)


def start(lab: Lab, dataplane: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.node, sys.executable, "-m", "tests.kit.hostile_agent", dataplane],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    lab.procs.append(proc)  # killed by the lab even if the test fails
    return proc


def ask(proc: subprocess.Popen, **req: Any) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(req) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    assert line, f"the dataplane child died (exit {proc.wait()})"
    return json.loads(line)


def check_verdicts(lab: Lab, phase: int) -> None:
    """Every pod to every other pod on every port, against the simulator."""
    prog = program(phase)
    specs = {src: [f"tcp:{ip}:{p}" for dst, ip in PODS.items() if dst != src for p in PORTS] for src in PODS}
    seen = lab.probe_many(specs, timeout=0.8)
    wrong = []
    for src, results in seen.items():
        for spec, ok in results.items():
            _, addr, port = spec.split(":")
            v = evaluate(prog, ipaddress.ip_address(PODS[src]), ipaddress.ip_address(addr), "tcp", int(port))
            if ok != (v.verdict is Verdict.ACCEPT):
                wrong.append((src, spec, ok))
    assert not wrong, f"phase {phase}: {wrong}"
    # the policies are not vacuous: each phase both allows and denies on every endpoint
    assert seen["b"][f"tcp:{A}:80"] and not seen["c"][f"tcp:{A}:80"]
    assert seen["a"][f"tcp:{B}:81"] and not seen["a"][f"tcp:{B}:80"]
    assert seen["a"][f"tcp:{C}:81"] and not seen["b"][f"tcp:{C}:81"]
    assert seen["c"][f"tcp:{B}:80"] is bool(phase) and seen["c"][f"tcp:{A}:81"] is bool(phase)


def test_hostile_names_are_enforced_updated_and_attributed(lab: Lab, dataplane: str) -> None:
    for key, ip in PODS.items():
        lab.add_pod(key, [ip], ports=PORTS)
    agent = start(lab, dataplane)
    assert ask(agent, cmd="apply", phase=0) == {"ok": True}
    check_verdicts(lab, 0)
    # a later update of both the ordinary and the hostile policy reaches the kernel
    assert ask(agent, cmd="apply", phase=1) == {"ok": True}
    check_verdicts(lab, 1)

    # counters come back under the exact names: the accept rule b -> a:80 matched
    prog = program(1)
    web = prog.endpoints[HOSTILE].ingress.rules[1]
    counters = ask(agent, cmd="counters")
    rules = {(ep, rid, d): n for ep, rid, d, n in counters["rules"]}
    assert rules[(HOSTILE, web.id, Direction.INGRESS.value)] > 0
    assert {(ep, d) for ep, d, _ in counters["drops"]} >= {(HOSTILE, "ingress"), (HOSTILE_C, "ingress")}

    # sampled drops name the hostile endpoint and its policies exactly
    assert not lab.reachable("c", A, 82)  # the drop rule
    assert not lab.reachable("b", C, 80)  # HOSTILE_C's default deny
    drop_rule = prog.endpoints[HOSTILE].ingress.rules[0]
    want = {(HOSTILE, "drop-rule", (str(drop_rule.origin),)), (HOSTILE_C, "default-deny", (HOSTILE_C,))}
    got: set[tuple[str, str, tuple[str, ...]]] = set()

    def sampled() -> bool:  # earlier probes' drops come first: read until ours are there
        for d in ask(agent, cmd="drops", timeout=1)["drops"]:
            got.add((d["endpoint"], d["reason"], tuple(d["policies"])))
        return want <= got

    assert until(sampled, timeout=30), got

    # a restarted dataplane (eBPF: adopting the pinned maps and their stored names)
    # takes the kernel back to phase 0 and still counts under the exact names
    agent.kill()
    agent.wait()
    agent = start(lab, dataplane)
    assert ask(agent, cmd="apply", phase=0) == {"ok": True}
    check_verdicts(lab, 0)
    rules = {(ep, rid) for ep, rid, _, _ in ask(agent, cmd="counters")["rules"]}
    assert (HOSTILE, web.id) in rules and (HOSTILE_C, prog.endpoints[HOSTILE_C].ingress.rules[0].id) in rules
