"""The simulator: evaluate the IR for one flow. `explain` and `matrix` use it.

It reads the same Program the dataplanes program, so what it says is what the
kernel does: the tiered first match of `ir.first_match`; no match drops when isolated.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.inventory import IPAddress
from agent.ir import Direction, DirectionProgram, EndpointProgram, Program, Rule, Tier, Verdict, first_match


@dataclass(frozen=True)
class Decision:
    """One side's judgement of a flow."""

    endpoint: str
    direction: Direction
    verdict: Verdict
    rule: Rule | None  # the rule that decided; None: not isolated, or default deny
    isolated_by: tuple[str, ...]
    passed: tuple[Rule, ...] = ()  # ADMIN Pass rules that sent the packet on to NetworkPolicy

    @property
    def reason(self) -> str:
        head = "".join(f"pass by {r.origin} → " for r in self.passed)
        if self.rule is not None:
            if self.rule.origin.kind or self.rule.tier is not Tier.POLICY:
                # The API's words: Accept / Deny / Pass.
                what = "pass (nothing further applies): accept" if self.rule.verdict is Verdict.PASS \
                    else "deny" if self.verdict is Verdict.DROP else "accept"
                return f"{head}{what} by {self.rule.origin}"
            return f"{head}{self.verdict.value} by rule {self.rule.origin}"
        if self.verdict is Verdict.DROP:
            return head + "default deny of " + ", ".join(self.isolated_by or ("(isolation)",))
        return head + "not isolated"


@dataclass(frozen=True)
class FlowVerdict:
    verdict: Verdict
    egress: Decision | None  # the source's egress (None: source not an endpoint here)
    ingress: Decision | None  # the destination's ingress


def decide(
    ep: str, d: Direction, prog: DirectionProgram, peer: IPAddress, protocol: str, port: int | None
) -> Decision:
    rules = prog.rules
    who, passed = first_match(rules, prog.isolated, lambda i: rules[i].matches(peer, protocol, port))
    through = tuple(rules[i] for i in passed)
    if who is not None:
        return Decision(ep, d, rules[who].effect, rules[who], prog.isolated_by, through)
    verdict = Verdict.DROP if prog.isolated else Verdict.ACCEPT
    return Decision(ep, d, verdict, None, prog.isolated_by, through)


def index_by_ip(program: Program) -> dict[IPAddress, EndpointProgram]:
    return {ip: ep for ep in program.endpoints.values() for ip in ep.ips}


def evaluate(
    program: Program,
    src: IPAddress,
    dst: IPAddress,
    protocol: str,
    port: int | None,
    by_ip: dict[IPAddress, EndpointProgram] | None = None,
) -> FlowVerdict:
    """Verdict for the first packet of a flow src -> dst (protocol lower-case)."""
    by_ip = by_ip if by_ip is not None else index_by_ip(program)
    eg = ing = None
    if src == dst:  # a pod talking to itself never leaves its namespace
        return FlowVerdict(Verdict.ACCEPT, None, None)
    if (s := by_ip.get(src)) is not None:
        eg = decide(s.key, Direction.EGRESS, s.egress, dst, protocol, port)
    if (d := by_ip.get(dst)) is not None:
        ing = decide(d.key, Direction.INGRESS, d.ingress, src, protocol, port)
    ok = all(x is None or x.verdict is Verdict.ACCEPT for x in (eg, ing))
    return FlowVerdict(Verdict.ACCEPT if ok else Verdict.DROP, eg, ing)
