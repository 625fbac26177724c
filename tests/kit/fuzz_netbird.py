"""Fuzz (hypothesis): generated NetBird API answers — several port ranges, nulls, odd types,
unknown protocols and actions, hostile strings, missing fields, duplicate and missing ids —
polled twice through the real NetBird source (fetch, partial-view check, admission with
last good versions, semantics, state file). Asserted for the second poll, against
`Reference`, an independent per-flow reading of the fail-closed rules:

- the poll never fails and never crashes; every invalid object is reported;
- no flow is allowed that the reference denies (never more permissive), and no flow is
  denied that it allows (so the reference cannot be vacuous);
- an agent restarted from the state file, with the API down, enforces the same program.

`check(max_examples)` is also run at scale by `python -m bench.reliability`.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.ir import Verdict
from agent.pipeline import NetbirdPipeline
from agent.simulate import evaluate, index_by_ip
from agent.sources.netbird import FetchError, NetbirdSource
from tests.kit.netbird_model import IP, group, peer

PEER_IDS = ["L", "A", "B", "C"]
GROUP_IDS = ["all", "devs", "servers", "others", "ghost"]  # "ghost" is never defined
# Few ids: the two polls share some (last good versions) and duplicates happen; the second
# poll also has ids of its own (invalid policies without a last good version).
POLICY_IDS = ["p0", "p1", "p2"]
NEW_IDS = ["q0", "q1", "q2"]
OUTSIDE = "8.8.8.8"
FLOWS = [("tcp", 22), ("tcp", 80), ("tcp", 8080), ("udp", 53), ("icmp", None)]
MISSING: Any = object()  # a key left out of the body

HOSTILE = ['x"; flush ruleset; "', "a\nb", "\u202eevil", "{}", "$(reboot)", "' or '1'='1", "nul\x00", "\\", "ü"]


def corrupt(valid: st.SearchStrategy[dict[str, Any]], bad: dict[str, list[Any]],
            max_bad: int = 2) -> st.SearchStrategy[dict[str, Any]]:
    """A valid object with up to `max_bad` of its fields replaced by a bad value (MISSING:
    the key left out): one invalid part at a time, so what each one does shows."""
    def apply(obj: dict[str, Any], changes: list[tuple[str, int]]) -> dict[str, Any]:
        for key, i in changes:
            value = bad[key][i % len(bad[key])]
            if value is MISSING:
                obj.pop(key, None)
            else:
                obj[key] = copy.deepcopy(value)
        return obj

    change = st.tuples(st.sampled_from(sorted(bad)), st.integers(0, 99))
    # One change most of the time (several hide each other; none tests the valid path).
    count = st.sampled_from([0, *[1] * 4, *range(2, max_bad + 1)])
    return st.builds(apply, valid, count.flatmap(lambda n: st.lists(change, min_size=n, max_size=n)))


group_ref = st.sampled_from(["all", "all", "devs", "devs", "servers", "others", "ghost"]).map(
    lambda g: {"id": g, "name": g, "peers_count": 1})
port_text = st.sampled_from(["22", "80", "53", "8080", 22, 80])
port_range = st.sampled_from([
    {"start": 20, "end": 25}, {"start": 22, "end": 22}, {"start": 50, "end": 80}, {"start": 60, "end": 100},
    {"start": 81, "end": 8080}, {"start": 8080, "end": 9000}, {"start": 1, "end": 65535}])


@st.composite
def valid_rule(draw: st.DrawFn) -> dict[str, Any]:
    proto = draw(st.sampled_from(["all", "tcp", "tcp", "udp", "icmp", "netbird-ssh"]))
    ports, ranges = None, None
    if proto not in ("all", "icmp"):
        kind = draw(st.sampled_from(["none", "ports", "ranges", "ranges"]))
        ports = draw(st.lists(port_text, min_size=1, max_size=3)) if kind == "ports" else draw(
            st.sampled_from([None, []]))
        ranges = draw(st.lists(port_range, min_size=1, max_size=4)) if kind == "ranges" else None
    return {
        # Names and ids are never matched on: hostile or odd ones must only be carried.
        "id": draw(st.sampled_from(["r", "r", *HOSTILE, None, 3])),
        "name": draw(st.sampled_from(["rule", "rule", *HOSTILE, None, 3])), "description": "",
        "enabled": draw(st.sampled_from([True, True, True, False])),
        "action": draw(st.sampled_from(["accept", "accept", "drop"])),
        "bidirectional": draw(st.booleans()), "protocol": proto, "ports": ports, "port_ranges": ranges,
        "sources": draw(st.lists(group_ref, min_size=1, max_size=2)),
        "destinations": draw(st.lists(group_ref, min_size=1, max_size=2)),
    }


BAD_SIDES = ["devs", 5, {}, [17], [{"name": "devs"}], [{"id": "devs"}, ""], None, [], MISSING]
BAD_RESOURCE = [{"id": 3, "type": "peer"}, "B", {"id": "B"}, {"id": "B", "type": "peer"}, {"id": "C", "type": "host"},
                {}, None]
BAD_RULE = {
    "action": ["reject", "ACCEPT", None, 1, MISSING],
    "enabled": [None, "yes", 1, MISSING],
    "bidirectional": [None, "true", 0, MISSING],
    "protocol": ["gre", None, 6, "", MISSING, "TCP"],
    "ports": [["0"], ["22", "http"], ["\u00b2"], "80", {}, 5, ["9" * 40], [True], [22.0], [" 53", "-1"], ["80"]],
    "port_ranges": [[{"start": 9, "end": 1}], [{"start": "x", "end": 2}, {"start": 20, "end": 25}], "x", [7],
                    [{"start": 0, "end": 22}], [{"start": 22, "end": 70000}], [{"start": "22", "end": None}]],
    "sources": BAD_SIDES, "destinations": BAD_SIDES,
    "sourceResource": BAD_RESOURCE, "destinationResource": BAD_RESOURCE,
}
# Now and then a rule nothing can be read from (a drop of everything: rare, or it hides the rest).
rules = st.integers(0, 39).flatmap(
    lambda n: st.sampled_from([None, 7, "accept everything"]) if n == 0 else corrupt(valid_rule(), BAD_RULE))


def valid_policy(ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda pid, rs: {"id": pid, "name": f"pol-{pid}", "description": "", "enabled": True,
                         "source_posture_checks": None, "rules": rs},
        st.sampled_from(ids), st.lists(rules, min_size=1, max_size=3))


BAD_POLICY = {
    "id": [*HOSTILE, MISSING, None, 3, ""],
    "name": [*HOSTILE, None, 3],
    "enabled": [None, "yes", 1, MISSING, False],
    "source_posture_checks": [[3], "x", ["no-such-check"], [{"id": "no-such"}], [None]],
    "rules": ["x", None, None, None],
}


def policies(ids: list[str]) -> st.SearchStrategy[Any]:
    return st.integers(0, 11).flatmap(
        lambda n: st.sampled_from([None, 7, "x", []]) if n == 0 else corrupt(valid_policy(ids), BAD_POLICY, max_bad=1))


# Each mutation makes an object certainly invalid.
GROUP_MUTATIONS: list[Callable[[dict[str, Any]], None]] = [
    lambda g: g.update(peers="A"),
    lambda g: g.update(peers=[17]),
    lambda g: g.update(id=""),  # no id: reported, and references to it find nothing
]
PEER_MUTATIONS: list[Callable[[dict[str, Any]], None]] = [  # never applied to the local peer
    lambda p: p.update(ip="100.64.0.300"),
    lambda p: p.update(ipv6="fd00::zz"),
    lambda p: p.update(name=None),
]

# Accepts to override: without them a drop that failed to apply could not be seen.
BASELINE = {"id": "baseline", "name": "baseline", "enabled": True, "source_posture_checks": None, "rules": [
    {"id": "b", "name": "b", "enabled": True, "action": "accept", "bidirectional": True, "protocol": "all",
     "ports": None, "port_ranges": None, "sources": [{"id": "all"}], "destinations": [{"id": "all"}]}]}


def answers(ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "baseline": st.booleans(),
        "policies": st.lists(policies(ids), min_size=1, max_size=5),
        "groups": st.tuples(*[st.tuples(st.lists(st.sampled_from(PEER_IDS), unique=True, max_size=3),
                                        st.none() | st.none() | st.integers(0, len(GROUP_MUTATIONS) - 1))
                              for _ in GROUP_IDS[1:4]]),
        "peers": st.tuples(*[st.none() | st.none() | st.integers(0, len(PEER_MUTATIONS) - 1)
                             for _ in PEER_IDS[1:]]),
    })


def build(drawn: dict[str, Any]) -> dict[str, list[Any]]:
    """The API's answers (the `All` group lists every peer, else the view is partial)."""
    peers = [peer("L")]
    for pid, m in zip(PEER_IDS[1:], drawn["peers"], strict=True):
        body = peer(pid)
        if m is not None:
            PEER_MUTATIONS[m](body)
        peers.append(body)
    groups = [group("all", PEER_IDS, name="All")]
    for gid, (members, m) in zip(GROUP_IDS[1:4], drawn["groups"], strict=True):
        body = group(gid, members)
        if m is not None:
            GROUP_MUTATIONS[m](body)
        groups.append(body)
    pols = copy.deepcopy(drawn["policies"])
    return {"policies": [copy.deepcopy(BASELINE), *pols] if drawn["baseline"] else pols,
            "groups": groups, "peers": peers}


# ---------------------------------------------------------------- the reference

_DIGITS = re.compile(r"\s*[0-9]{1,5}\s*", re.ASCII)


def _int(v: Any) -> int | None:
    """A port number (1-65535) as the API may send it, or None."""
    if isinstance(v, str) and _DIGITS.fullmatch(v):
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535:
        return v
    return None


def _id(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


@dataclass
class RefRule:
    """One rule as the reference reads it: sets of peers and a port predicate."""

    drop: bool
    bidi: bool
    sources: set[str]
    destinations: set[str]
    match: Callable[[str, int | None], bool]


class Reference:
    """Which flows the fail-closed rules allow for the last of a sequence of answers."""

    def __init__(self, polls: list[dict[str, list[Any]]]) -> None:
        self.invalid: set[str] = set()  # names problems must mention (last poll)
        groups_good: dict[str, set[str]] = {}
        peers_good: set[str] = set()
        policies_good: dict[str, Any] = {}
        for n, ans in enumerate(polls):
            last = n == len(polls) - 1
            peers_now = {p["id"] for p in ans["peers"] if self._peer_ok(p)}
            if last:
                self.invalid |= {p["id"] for p in ans["peers"]} - peers_now
            seen_peer_ids = {p["id"] for p in ans["peers"]}
            # Last good versions: an invalid object that was good before stays as it was.
            peers_good = peers_now | {p for p in peers_good if p in seen_peer_ids}
            self.peers = peers_good
            gnow: dict[str, set[str]] = {}
            self.unknown_groups: set[str] = set()
            seen_groups: set[str] = set()
            for g in ans["groups"]:
                gid = _id(g.get("id"))
                if gid is None:
                    if last:
                        self.invalid.add("[?]")
                    continue
                seen_groups.add(gid)
                members = g.get("peers")
                if members is None or (isinstance(members, list) and all(
                        isinstance(m, dict) and _id(m.get("id")) for m in members)):
                    gnow[gid] = {m["id"] for m in members or []}
                elif gid in groups_good:
                    gnow[gid] = groups_good[gid]
                    if last:
                        self.invalid.add(gid)
                else:
                    self.unknown_groups.add(gid)
                    if last:
                        self.invalid.add(gid)
            groups_good = gnow
            self.groups = gnow
            self.rules: list[RefRule] = []
            counts = Counter(_id(p.get("id")) for p in ans["policies"] if isinstance(p, dict))
            now: dict[str, Any] = {}
            first_copy: set[str] = set()
            for body in ans["policies"]:
                if not isinstance(body, dict):
                    if last:
                        self.invalid.add("[?]")
                    continue
                pid = _id(body.get("id"))
                if pid is None or counts[pid] > 1:  # no identity to trust: its drops only
                    if last:
                        self.invalid.add("[?]" if pid is None else pid)
                    self.rules += self._policy(body, drops_only=True)
                    if pid is not None and pid not in now and pid not in first_copy:
                        first_copy.add(pid)  # the first copy still has a last good version
                        if self._policy_ok(body):
                            now[pid] = body
                        elif pid in policies_good:
                            now[pid] = policies_good[pid]
                            self.rules += self._policy(policies_good[pid], drops_only=True)
                    continue
                if self._policy_ok(body):
                    now[pid] = body
                    self.rules += self._policy(body)
                    continue
                if last:
                    self.invalid.add(pid)
                if pid in policies_good:  # its last good version, plus its own drops
                    now[pid] = policies_good[pid]
                    self.rules += self._policy(policies_good[pid])
                    self.rules += self._policy(body, drops_only=True)
                else:
                    self.rules += self._policy(body)
            policies_good = now

    @staticmethod
    def _peer_ok(p: dict[str, Any]) -> bool:
        try:
            ipaddress.ip_address(p["ip"])
            if p.get("ipv6") not in (None, ""):
                ipaddress.ip_address(p["ipv6"])
        except (ValueError, TypeError):
            return False
        return _id(p.get("name")) is not None

    # -- validity, field by field (what the API's schema says)

    def _policy_ok(self, body: dict[str, Any]) -> bool:
        checks = body.get("source_posture_checks")
        rules = body.get("rules")
        return (isinstance(body.get("enabled"), bool) and self._checks_ok(checks)
                and (rules is None or (isinstance(rules, list) and all(self._rule_ok(r) for r in rules))))

    @staticmethod
    def _checks_ok(checks: Any) -> bool:
        return checks is None or (isinstance(checks, list) and all(
            _id(c.get("id") if isinstance(c, dict) else c) for c in checks))

    def _rule_ok(self, r: Any) -> bool:
        if not isinstance(r, dict):
            return False
        proto = r.get("protocol")
        return (r.get("action") in ("accept", "drop") and isinstance(r.get("enabled"), bool)
                and isinstance(r.get("bidirectional"), bool)
                and isinstance(proto, str) and proto.lower() in ("all", "tcp", "udp", "icmp", "netbird-ssh")
                and self._ports(r)[2] and not (proto.lower() in ("all", "icmp") and self._ports(r)[3])
                and all(self._side(r, k, True)[1] for k in ("sources", "destinations")))

    @staticmethod
    def _ports(r: dict[str, Any]) -> tuple[list[int], list[tuple[int, int]], bool, bool]:
        """(valid ports, valid ranges, all valid, any given)."""
        ports: list[int] = []
        ranges: list[tuple[int, int]] = []
        ok, given = True, False
        raw_p, raw_r = r.get("ports"), r.get("port_ranges")
        for raw in (raw_p, raw_r):
            if raw is not None and not isinstance(raw, list):
                ok, given = False, True  # not a list: invalid (a drop then matches every port)
            elif raw:
                given = True
        for v in raw_p if isinstance(raw_p, list) else []:
            n = _int(v)
            ok = ok and n is not None
            ports += [n] if n is not None else []
        for v in raw_r if isinstance(raw_r, list) else []:
            a = _int(v.get("start")) if isinstance(v, dict) else None
            b = _int(v.get("end")) if isinstance(v, dict) else None
            if a is None or b is None or a > b:
                ok = False
            else:
                ranges.append((a, b))
        return ports, ranges, ok, given

    def _side(self, r: dict[str, Any], key: str, drop: bool) -> tuple[set[str], bool]:
        """(the peers of one side as a drop or an accept reads it, whether it is valid)."""
        res = r.get("sourceResource" if key == "sources" else "destinationResource")
        none = res is None or (isinstance(res, dict) and res.get("id") in (None, "") and res.get("type") in (None, ""))
        res_ok = none or (isinstance(res, dict) and isinstance(res.get("id"), str) and isinstance(res.get("type"), str))
        raw = r.get(key)
        readable = raw is None or isinstance(raw, list)
        entries = [_id(g.get("id") if isinstance(g, dict) else g) for g in raw] if isinstance(raw, list) else []
        valid = res_ok and readable and None not in entries
        if drop and not valid:
            return set(self.peers), False  # a drop's unreadable side: every peer
        if not res_ok or not readable:
            return set(), False  # an accept's: nobody
        if not none and res.get("type") == "peer" and _id(res.get("id")):
            return {res["id"]} & self.peers, valid
        if not entries and drop:
            return set(self.peers), valid  # neither groups nor a peer: a drop applies to all
        out: set[str] = set()
        for gid in entries:
            if gid == "all":
                out |= self.peers
            elif gid in self.unknown_groups:
                out |= self.peers if drop else set()
            elif gid is not None:
                out |= self.groups.get(gid, set()) & self.peers
        return out, valid

    # -- fail-closed reading

    def _policy(self, body: dict[str, Any], drops_only: bool = False) -> list[RefRule]:
        enabled = body.get("enabled")
        if enabled is False:
            return []
        accepts_on = enabled is True and not drops_only
        posture_bad = not self._checks_ok(body.get("source_posture_checks"))
        raw = body.get("rules")
        items = raw if isinstance(raw, list) else [] if raw is None else [None]  # unreadable: one unknown rule
        out = []
        for r in items:
            if not isinstance(r, dict):  # nothing readable: a drop of everything
                out.append(RefRule(True, True, set(self.peers), set(self.peers), lambda proto, port: True))
                continue
            drop = r.get("action") != "accept"
            en = r.get("enabled")
            if not (en if isinstance(en, bool) else drop) or (not drop and not accepts_on):
                continue
            bidi = r.get("bidirectional")
            sides = [self._side(r, key, drop)[0] for key in ("sources", "destinations")]
            if posture_bad and not drop:
                sides[0] = set()  # an unreadable posture reference fails every source
            out.append(RefRule(drop, bidi if isinstance(bidi, bool) else drop, sides[0], sides[1],
                               self._matcher(r, drop)))
        return out

    def _matcher(self, r: dict[str, Any], drop: bool) -> Callable[[str, int | None], bool]:
        proto = r.get("protocol")
        proto = proto.lower() if isinstance(proto, str) else None
        ports, ranges, ok, given = self._ports(r)
        if proto not in ("all", "tcp", "udp", "icmp", "netbird-ssh") or (proto in ("all", "icmp") and given):
            return lambda p, port: drop  # unknown protocol: every one in a drop, none in an accept
        if proto == "all":
            return lambda p, port: True
        if proto == "icmp":
            return lambda p, port: p == "icmp"
        want = "tcp" if proto == "netbird-ssh" else proto
        if not ok and drop:
            return lambda p, port: p == want  # bad ports in a drop: every port
        use_ports = bool(r.get("ports")) if not ok else bool(ports)
        if use_ports:
            return lambda p, port: p == want and port in ports
        if ranges or (not ok and given):
            return lambda p, port: p == want and port is not None and any(a <= port <= b for a, b in ranges)
        return lambda p, port: p == want

    def allows(self, src: str, dst: str, proto: str, port: int | None) -> bool:
        """src -> dst (peer ids or OUTSIDE), one of them the local peer L."""
        other = dst if src == "L" else src
        if other == OUTSIDE:
            return src == "L"  # outbound beyond the NetBird network is not enforced
        if other not in self.peers:
            return False  # not a known peer: default deny both ways inside the network

        def hit(r: RefRule) -> bool:
            if not r.match(proto, port):
                return False
            return (src in r.sources and dst in r.destinations) or (
                r.bidi and src in r.destinations and dst in r.sources)

        return not any(r.drop and hit(r) for r in self.rules) and any(not r.drop and hit(r) for r in self.rules)


# ---------------------------------------------------------------- the run


class FakeClient:
    """The API's answers, as NetbirdSource reads them (no HTTP); `down` fails every GET."""

    def __init__(self, answers: dict[str, list[Any]]) -> None:
        self.answers = answers
        self.down = False

    def get(self, path: str) -> Any:
        if self.down:
            raise FetchError("server", "down")
        return copy.deepcopy(self.answers.get(path, []))

    def location(self, path: str) -> str:
        return f"fake:/api/{path}"


ADDR = {**{p: IP[p] for p in PEER_IDS}, OUTSIDE: OUTSIDE}


def verdicts(pipe: NetbirdPipeline) -> dict[tuple[str, str, str, int | None], bool]:
    program = pipe.program
    by_ip = index_by_ip(program)
    out = {}
    for other in [*PEER_IDS[1:], OUTSIDE]:
        for s, d in (("L", other), (other, "L")):
            for proto, port in FLOWS:
                fv = evaluate(program, ipaddress.ip_address(ADDR[s]), ipaddress.ip_address(ADDR[d]), proto, port,
                              by_ip)
                out[(s, d, proto, port)] = fv.verdict is Verdict.ACCEPT
    return out


def check(max_examples: int, counter: list[int] | None = None) -> None:
    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(answers(POLICY_IDS), answers(POLICY_IDS + NEW_IDS))
    def body(first: dict[str, Any], second: dict[str, Any]) -> None:
        if counter is not None:
            counter[0] += 1
        polls = [build(first), build(second)]
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp) / "netbird.json"
            client = FakeClient(polls[0])
            pipe = NetbirdPipeline(NetbirdSource(client), peer_id="L", interval=3600,  # type: ignore[arg-type]
                                   state_file=state)
            for answer in polls:
                client.answers = answer
                pipe.refresh()
                assert pipe.last_error is None, pipe.last_error  # bad objects never fail the poll
            seen = verdicts(pipe)
            problems = pipe.snapshot().problems
            # Restarted with the API down: the saved admitted state, the same program.
            client.down = True
            again = NetbirdPipeline(NetbirdSource(client), peer_id="L", interval=3600,  # type: ignore[arg-type]
                                    state_file=state)
            assert again.ready.is_set() and again.program == pipe.program
        ref = Reference(polls)
        reported = {p.ref.name for p in problems}
        missing = {n for n in ref.invalid if n != "[?]"} - reported
        assert not missing, (missing, problems)
        if "[?]" in ref.invalid:
            assert any(n.startswith("[") for n in reported), problems
        expected = {k: ref.allows(*k) for k in seen}
        widened = [k for k, ok in seen.items() if ok and not expected[k]]
        assert not widened, ("more permissive than the fail-closed reference", widened)
        narrowed = [k for k, ok in seen.items() if not ok and expected[k]]
        assert not narrowed, ("denies what the reference allows", narrowed)

    body()
