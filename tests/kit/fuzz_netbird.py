"""The NetBird fuzz check: generated management-API answers, valid and hostile, through the
NetBird pipeline and the simulator; shared by the unit fuzz test and the reliability soak."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.ir import Verdict
from agent.policy.evaluate import evaluate, index_by_ip
from agent.sources.netbird import NetbirdPipeline, NetbirdSource
from tests.kit.netbird_model import IP, group, peer, policy, rule

PEER_IDS = ["L", "A", "B", "C"]
GROUP_IDS = ["all", "devs", "servers", "others", "ghost"]  # "ghost" is never defined
OUTSIDE = "8.8.8.8"
FLOWS = [("tcp", 22), ("tcp", 80), ("udp", 53), ("icmp", None)]
group_refs = st.one_of(st.none(), st.lists(st.sampled_from(GROUP_IDS), max_size=2))
ports = st.one_of(st.none(), st.lists(st.sampled_from(["22", "80", "53", 80]), max_size=2))

port_ranges = st.one_of(st.none(), st.lists(st.sampled_from([{"start": 1, "end": 100}, {"start": 53, "end": 53}]),
                                            max_size=1))

rules = st.builds(
    lambda src, dst, action, proto, p, pr, bidi, enabled: rule(
        src, dst, action=action, protocol=proto, bidirectional=bidi, enabled=enabled,
        ports=p if proto in ("tcp", "udp", "netbird-ssh") else None,
        port_ranges=pr if proto in ("tcp", "udp") else None),
    group_refs, group_refs, st.sampled_from(["accept", "drop"]),
    st.sampled_from(["all", "tcp", "udp", "icmp", "netbird-ssh"]), ports, port_ranges, st.booleans(),
    st.booleans() | st.just(True),
)

policy_bodies = st.builds(lambda rs, enabled: (rs, enabled), st.lists(rules, min_size=1, max_size=2),
                          st.booleans() | st.just(True))

members = st.lists(st.sampled_from(PEER_IDS), unique=True, max_size=3)

# Each mutation makes an object certainly invalid.
POLICY_MUTATIONS = [
    lambda p: p["rules"][0].update(protocol="gre"),
    lambda p: p["rules"][0].update(action="reject"),
    lambda p: p["rules"][0].update(protocol="tcp", ports=["http"]),
    lambda p: p["rules"][0].update(protocol="tcp", port_ranges=[{"start": 9, "end": 1}]),
    lambda p: p["rules"][0].update(protocol="all", ports=["80"]),
    lambda p: p["rules"][0].update(enabled="yes"),
    lambda p: p["rules"][0].update(sources="devs"),
    lambda p: p.update(enabled=None),
    lambda p: p.update(rules={"a": 1}),
    lambda p: p.update(source_posture_checks=[3]),
    lambda p: p["rules"].append("accept everything"),
]

GROUP_MUTATIONS = [
    lambda g: g.update(peers="A"),
    lambda g: g.update(peers=[17]),
    lambda g: g.update(id=""),  # reported as an object without an id
]

PEER_MUTATIONS = [  # never applied to the local peer
    lambda p: p.update(ip="100.64.0.300"),
    lambda p: p.update(ipv6="fd00::zz"),
    lambda p: p.update(name=None),
]

account_answers = st.fixed_dictionaries({
    "policies": st.lists(st.tuples(policy_bodies, st.none() | st.integers(0, len(POLICY_MUTATIONS) - 1)),
                         max_size=4),
    "groups": st.tuples(*[st.tuples(members, st.none() | st.integers(0, len(GROUP_MUTATIONS) - 1))
                          for _ in GROUP_IDS[1:4]]),
    "peers": st.tuples(*[st.none() | st.integers(0, len(PEER_MUTATIONS) - 1) for _ in PEER_IDS[1:]]),
    "garbage": st.lists(st.sampled_from([None, 7, "x", [], {"name": "no id"}]), max_size=2),
})


class FakeClient:
    """The API's answers, as NetbirdSource reads them (no HTTP)."""

    def __init__(self, answers: dict[str, list[Any]]) -> None:
        self.answers = answers

    def get(self, path: str) -> Any:
        return copy.deepcopy(self.answers.get(path, []))

    def location(self, path: str) -> str:
        return f"fake:/api/{path}"


def build(drawn: dict[str, Any]) -> tuple[dict[str, list], dict[str, list], set[str]]:
    """(answers with the invalid objects, the same without them, names that must be reported)."""
    peers_all, peers_ok, bad = [peer("L")], [peer("L")], set()
    for pid, m in zip(PEER_IDS[1:], drawn["peers"], strict=True):
        body = peer(pid)
        if m is None:
            peers_ok.append(body)
        else:
            PEER_MUTATIONS[m](body)
            bad.add(pid)
        peers_all.append(body)
    # `All` lists every peer the answer holds (else the source refuses a partial view)
    groups_all = [group("all", PEER_IDS, name="All")]
    groups_ok = [group("all", [p["id"] for p in peers_ok], name="All")]
    for gid, (mem, m) in zip(GROUP_IDS[1:4], drawn["groups"], strict=True):
        body = group(gid, mem)
        if m is None:
            groups_ok.append(body)
        else:
            GROUP_MUTATIONS[m](body)
            bad.add(gid if body["id"] else f"[{len(groups_all)}]")
        groups_all.append(body)
    pols_all, pols_ok = [], []
    for i, ((rs, enabled), m) in enumerate(drawn["policies"]):
        body = policy(f"p{i}", *copy.deepcopy(rs), enabled=enabled)
        if m is None:
            pols_ok.append(body)
        else:
            POLICY_MUTATIONS[m](body)
            bad.add(f"p{i}")
        pols_all.append(body)
    for g in drawn["garbage"]:
        bad.add(f"[{len(pols_all)}]")
        pols_all.append(g)
    return ({"policies": pols_all, "groups": groups_all, "peers": peers_all},
            {"policies": pols_ok, "groups": groups_ok, "peers": peers_ok}, bad)


def run(answers: dict[str, list]) -> tuple[dict, list]:
    pipe = NetbirdPipeline(NetbirdSource(FakeClient(answers)), peer_id="L", interval=3600)
    assert pipe.refresh() is True, pipe.last_error  # the poll itself never fails on bad objects
    snap = pipe.snapshot()
    program = snap.program
    by_ip = index_by_ip(program)
    out = {}
    addrs = [*IP.values(), OUTSIDE]
    for s in addrs:
        for d in addrs:
            if s == d or IP["L"] not in (s, d):
                continue
            for proto, port in FLOWS:
                fv = evaluate(program, ipaddress.ip_address(s), ipaddress.ip_address(d), proto, port, by_ip)
                out[(s, d, proto, port)] = fv.verdict is Verdict.ACCEPT
    return out, snap.problems


def check(max_examples: int, counter: list[int] | None = None) -> None:
    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(account_answers)
    def body(drawn: dict[str, Any]) -> None:
        if counter is not None:
            counter[0] += 1
        with_bad, without_bad, bad = build(drawn)
        seen, problems = run(with_bad)
        ref, clean = run(without_bad)
        assert not clean, clean
        assert bad <= {p.ref.name for p in problems}, (bad, problems)
        widened = [k for k, ok in seen.items() if ok and not ref[k]]
        assert not widened, widened

    body()
