"""A dataplane driven over stdin, run inside the lab's node namespace by
test_hostile_names.py: endpoints and policies with hostile names, built as IR directly
(no admission in the way). One JSON command per line, one JSON answer per line:

  {"cmd": "apply", "phase": 0|1}   -> {"ok": true} or {"ok": false, "error": "..."}
  {"cmd": "counters"}              -> {"rules": [[endpoint, rule id, direction, packets]],
                                       "drops": [[endpoint, direction, packets]]}
  {"cmd": "drops", "timeout": s}  -> {"drops": [describe(event)...]} (what arrived, waiting
                                      up to s seconds for the first)

Run as `python -m tests.kit.hostile_agent nftables|ebpf`.
"""

from __future__ import annotations

import ipaddress
import json
import sys

from agent.dataplane.base import DataplaneError, DropLog
from agent.drops import describe
from agent.ir import Direction, DirectionProgram, EndpointProgram, Origin, PeerSet, PortMatch, Program, Rule, Verdict
from agent.query import make_dataplane

A, B, C = "10.40.0.1", "10.40.0.2", "10.40.0.3"
# Everything at once: nft syntax, a forged command, a NUL, a lone surrogate, a bidi
# override, multi-byte text past nft's 128-byte comment cap and past epkeys' 256 bytes.
HOSTILE = 'x"\n}\ndelete table inet stockade\n# ;{\\\0\ud800\u202e' + "é" * 150 + "a" * 100
HOSTILE_C = 'c";\nflush ruleset\n'
POLICY = 'pol"\nadd rule inet stockade forward accept\n'


def _net(*addrs: str) -> PeerSet:
    return PeerSet.of(ipaddress.ip_network(a) for a in addrs)


def _origin(i: int, policy: str = POLICY, ns: str = 'ns"\n') -> Origin:
    return Origin("file", ns, policy, Direction.INGRESS, i, name='rule"\n}')


def program(phase: int) -> Program:
    """Phase 0: HOSTILE (pod A) takes tcp/80 from B and drops tcp/82 from C; app/b takes
    tcp/81 from A; HOSTILE_C (pod C) takes tcp/81 from A. Phase 1 widens the ordinary
    policy (app/b also takes tcp/80 from C) and the hostile one (A also takes tcp/81 from C)."""
    a_rules = [Rule(_origin(0), _net(C), (PortMatch("tcp", 82, 82),), Verdict.DROP, key=f"{HOSTILE}/drop"),
               Rule(_origin(1), _net(B), (PortMatch("tcp", 80, 80),), key=f"{HOSTILE}/web")]
    b_rules = [Rule(Origin("file", "app", "b", Direction.INGRESS, 0), _net(A), (PortMatch("tcp", 81, 81),),
                    key="app/b/0")]
    if phase:
        a_rules.append(Rule(_origin(2), _net(C), (PortMatch("tcp", 81, 81),), key=f"{HOSTILE}/admin"))
        b_rules.append(Rule(Origin("file", "app", "b", Direction.INGRESS, 1), _net(C), (PortMatch("tcp", 80, 80),),
                            key="app/b/1"))
    ip = ipaddress.ip_address
    return Program("file", {
        HOSTILE: EndpointProgram(HOSTILE, (ip(A),), ingress=DirectionProgram(
            True, tuple(a_rules), (f'{POLICY}"default deny',))),
        "app/b": EndpointProgram("app/b", (ip(B),), ingress=DirectionProgram(True, tuple(b_rules), ("app/b",))),
        HOSTILE_C: EndpointProgram(HOSTILE_C, (ip(C),), ingress=DirectionProgram(True, (
            Rule(_origin(0, HOSTILE_C, HOSTILE), _net(A), (PortMatch("tcp", 81, 81),), key=f"{HOSTILE_C}/0"),),
            (HOSTILE_C,))),
    })


def main() -> None:
    dp = make_dataplane(sys.argv[1])
    drops: DropLog | None = None
    prog: Program | None = None
    for line in sys.stdin:
        req = json.loads(line)
        out: dict = {}
        if req["cmd"] == "apply":
            prog = program(req["phase"])
            if drops is None:  # listening before any packet is judged
                drops = dp.drop_log()
            try:
                dp.apply(prog)
                out = {"ok": True}
            except DataplaneError as e:
                out = {"ok": False, "error": str(e)}
        elif req["cmd"] == "counters":
            c = dp.counters(prog)
            out = {"rules": [[ep, rid, d.value, n.packets] for (ep, rid, d), n in c.rules.items()],
                   "drops": [[ep, d.value, n.packets] for (ep, d), n in c.drops.items()]}
        elif req["cmd"] == "drops":
            assert drops is not None
            out = {"drops": [describe(ev, prog) for ev in drops.read(req["timeout"])]}
        print(json.dumps(out), flush=True)  # ensure_ascii: surrogates travel as \\ud800


if __name__ == "__main__":
    main()
