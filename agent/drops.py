"""Recent drops: sampled by the kernel, decoded by the dataplane, kept in a ring buffer,
and labelled with the policies that decided ("which policy dropped my packet?")."""

from __future__ import annotations

import ipaddress
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from agent.dataplane.base import DropEvent, DropLog
from agent.ir import Direction, Program, Tier, Verdict

log = logging.getLogger(__name__)


def describe(ev: DropEvent, program: Program | None) -> dict[str, Any]:
    """A drop as JSON, with the deciding policies resolved from the program in force. `tier`
    is the deciding rule's (admin | policy | baseline); a default deny is NetworkPolicy
    isolation ("policy"); None when the rule is gone from the program."""
    decided: list[str] = []
    reason = "default-deny"
    tier: str | None = Tier.POLICY.value
    if ev.rule_id is not None:
        reason, tier = "drop-rule", None
    if program is not None:
        if ev.rule_id is not None:
            rule = program.rules().get(ev.rule_id)
            if rule is not None:
                # e.g. "ClusterNetworkPolicy deny-metadata (Admin, priority 10) egress rule 0 (name)"
                decided, tier = [str(rule.origin)], rule.tier.value
        else:
            prog = program.endpoints.get(ev.endpoint)
            if prog is not None:
                decided = list(prog.direction(ev.direction).isolated_by)
    return {
        "endpoint": ev.endpoint, "direction": ev.direction.value, "protocol": ev.protocol,
        "src": ev.src, "dst": ev.dst, "sport": ev.sport, "dport": ev.dport,
        "reason": reason, "policies": decided, "tier": tier, "audit": ev.audit,
        "not_learned": not_learned(ev, program),
    }


def not_learned(ev: DropEvent, program: Program | None) -> list[str]:
    """The domainNames rules of the dropping pod that would have allowed this egress packet
    had its destination been a learned address (protocol and port match, address not among
    what the pod learned): the drop then came from a later Deny or the default because the
    pod was never answered that address, or its answer expired."""
    prog = program.endpoints.get(ev.endpoint) if program is not None else None
    if prog is None or ev.direction is not Direction.EGRESS:
        return []
    try:
        dst = ipaddress.ip_address(ev.dst)
    except ValueError:
        return []
    proto = ev.protocol.lower()
    # Only the rules the packet reached: a Deny before the domainNames rule decides first
    # (the address may be learned: a dataplane that learns in the kernel has no peers here).
    rules = prog.egress.rules
    if ev.rule_id is None:  # the default deny: BASELINE rules come after it
        reached = [r for r in rules if r.tier is not Tier.BASELINE]
    else:
        end = next((i for i, r in enumerate(rules) if r.id == ev.rule_id), None)
        reached = list(rules if end is None else rules[:end])
    return [str(r.origin) for r in reached
            if r.learned and r.verdict is Verdict.ACCEPT and r.peers is not None
            and not r.peers.contains(dst) and (not r.ports or any(p.matches(proto, ev.dport) for p in r.ports))]


def drop_text(d: Mapping[str, Any]) -> str:
    """One sampled drop (a `describe` answer with its time) as `stockade drops` prints it; a
    tiered rule names itself: "deny by ClusterNetworkPolicy deny-c (Admin, priority 10) ingress rule 0"."""
    when = time.strftime("%H:%M:%S", time.localtime(d["time"]))
    ports = f" {d['sport']} -> {d['dport']}" if d["dport"] is not None else ""
    verb = "would drop (audit)" if d["audit"] else "dropped"
    head = {"default-deny": "default deny of "}.get(d["reason"]) or (
        "deny by " if d.get("tier") in ("admin", "baseline") else "drop rule ")  # no tier: an older agent
    why = head + (", ".join(d["policies"]) or "?")
    why += "".join(f"; not a learned address of domainNames rule {o}" for o in d.get("not_learned", ()))
    return f"{when} {verb} {d['protocol']} {d['src']} -> {d['dst']}{ports}  {d['endpoint']} {d['direction']}: {why}"


class DropRecorder:
    """Reads a DropLog on its own thread into a bounded ring buffer."""

    def __init__(self, drop_log: DropLog, program: Callable[[], Program | None], size: int = 1000) -> None:
        self.drop_log = drop_log
        self.program = program
        self.buffer: deque[dict[str, Any]] = deque(maxlen=size)
        self._seq = itertools.count(1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="drops", daemon=True)

    def start(self) -> DropRecorder:
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                events = self.drop_log.read(timeout=0.5)
            except OSError as e:
                if self._stop.is_set():
                    break  # closed under us on shutdown
                log.warning("drop log read failed: %s", e)
                time.sleep(1)
                continue
            prog = self.program()
            with self._lock:
                for ev in events:
                    self.buffer.append({"seq": next(self._seq), "time": time.time(), **describe(ev, prog)})

    def since(self, seq: int) -> list[dict[str, Any]]:
        with self._lock:
            return [d for d in self.buffer if d["seq"] > seq]

    def stop(self) -> None:
        self._stop.set()
        self.drop_log.close()
