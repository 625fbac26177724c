"""NetBird semantics: API shapes -> IR for the local peer, checked through the simulator."""

from __future__ import annotations

import copy
import ipaddress
import itertools
from typing import Any

import pytest

from agent.admission.netbird import partial_view
from agent.inventory import ObjectRef, RawPolicy
from agent.ir import Direction, Origin, Program, Verdict
from agent.policy import netbird as nb
from agent.policy.errors import Invalid
from agent.simulate import evaluate
from tests.kit.netbird_model import IP, IP6, gref, group, peer, policy, rule

# ---------------------------------------------------------------- fixtures


PEERS = [peer("L"), peer("A"), peer("B"), peer("C")]
GROUPS = [
    group("all", ["L", "A", "B", "C"], name="All"),
    group("devs", ["L", "A"]),
    group("servers", ["B"]),
    group("others", ["C"]),
    group("empty", None),
]


def account(policies: list[dict[str, Any]], peers: list[dict[str, Any]] | None = None,
            groups: list[dict[str, Any]] | None = None,
            checks: list[dict[str, Any]] | None = None) -> nb.Account:
    # read_policy: what the source admits when no last good version exists (invalid parts
    # resolved fail-closed); for valid policies the same as parse_policy.
    pols = tuple(
        nb.read_policy(RawPolicy(ObjectRef("Policy", "", p["id"], "netbird"), p)) for p in policies
    )
    ps = [nb.parse_peer(p) for p in (PEERS if peers is None else peers)]
    gs = [nb.parse_group(g) for g in (GROUPS if groups is None else groups)]
    cs = [nb.parse_posture_check(c) for c in checks or []]
    return nb.Account(pols, {g.id: g for g in gs}, {p.id: p for p in ps}, {c.id: c for c in cs})


def compile_(policies: list[dict[str, Any]], local: str = "L", **kw: Any) -> nb.Compiled:
    acct_kw = {k: kw.pop(k) for k in ("peers", "groups", "checks") if k in kw}
    return nb.compile_account(account(policies, **acct_kw), local, **kw)


def prog(policies: list[dict[str, Any]], **kw: Any) -> Program:
    return compile_(policies, **kw).program


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(IP.get(text, text))


def v(program: Program, src: str, dst: str, proto: str = "tcp", port: int | None = 80) -> str:
    """'allow' or 'deny' for the first packet src -> dst (peer letters or IPs)."""
    fv = evaluate(program, ip(src), ip(dst), proto, None if proto == "icmp" else port)
    return "allow" if fv.verdict is Verdict.ACCEPT else "deny"


def flows(program: Program, *pairs: tuple[str, str], proto: str = "tcp", port: int | None = 80) -> list[str]:
    return [v(program, s, d, proto, port) for s, d in pairs]


# ---------------------------------------------------------------- direction


@pytest.mark.parametrize(
    ("bidirectional", "src", "dst", "expect"),
    [
        # L in sources: OUT to destinations; IN only when bidirectional.
        (False, ["devs"], ["servers"], {("L", "B"): "allow", ("B", "L"): "deny"}),
        (True, ["devs"], ["servers"], {("L", "B"): "allow", ("B", "L"): "allow"}),
        # L in destinations: IN from sources; OUT only when bidirectional.
        (False, ["servers"], ["devs"], {("B", "L"): "allow", ("L", "B"): "deny"}),
        (True, ["servers"], ["devs"], {("B", "L"): "allow", ("L", "B"): "allow"}),
        # L in neither: nothing for L; A (the other dev) is never involved either way.
        (True, ["servers"], ["others"], {("B", "L"): "deny", ("L", "B"): "deny", ("L", "C"): "deny"}),
    ],
)
def test_direction_and_bidirectional(bidirectional, src, dst, expect):
    p = prog([policy("p", rule(src, dst, bidirectional=bidirectional))])
    for (s, d), want in expect.items():
        assert v(p, s, d) == want, (s, d)
    # Other peers are never reachable through this rule.
    assert v(p, "C", "L") == "deny"
    assert v(p, "A", "L") == "deny"


def test_one_way_rule_between_members_of_both_groups_is_two_way():
    # devs -> devs, one-way: L is in both sides, so it gets OUT to A and IN from A.
    p = prog([policy("p", rule(["devs"], ["devs"]))])
    assert flows(p, ("L", "A"), ("A", "L"), ("B", "L"), ("L", "B")) == ["allow", "allow", "deny", "deny"]


def test_peer_in_both_groups_of_a_rule():
    # L is in devs (source) and in All (destination): OUT to All, IN from devs.
    p = prog([policy("p", rule(["devs"], ["all"]))])
    assert flows(p, ("L", "B"), ("L", "C"), ("A", "L"), ("B", "L")) == ["allow", "allow", "allow", "deny"]


def test_never_a_rule_about_itself():
    p = prog([policy("p", rule(["all"], ["all"], bidirectional=True))])
    ep = p.endpoints["peer-l"]
    own = {ipaddress.ip_address(IP["L"]), ipaddress.ip_address(IP6["L"])}
    for r in (*ep.ingress.rules, *ep.egress.rules):
        if r.origin.policy == "pol-p":
            assert not any(r.peers.contains(a) for a in own)
    assert ep.ips == (ipaddress.ip_address(IP["L"]), ipaddress.ip_address(IP6["L"]))
    assert ep.interface == "wt0"


def test_all_group_means_every_peer_even_if_its_list_is_stale():
    groups = [g for g in GROUPS if g["name"] != "All"] + [group("all", ["L"], name="All")]
    p = prog([policy("p", rule(["all"], ["devs"]))], groups=groups)
    assert flows(p, ("A", "L"), ("B", "L"), ("C", "L")) == ["allow"] * 3


def test_offline_and_login_expired_peers_still_produce_rules():
    peers = [peer("L"), peer("A", connected=False, login_expired=True), peer("B"), peer("C")]
    assert v(prog([policy("p", rule(["devs"], ["devs"]))], peers=peers), "A", "L") == "allow"


def test_empty_and_unknown_groups_produce_nothing():
    p = prog([policy("p", rule(["empty", "nope"], ["devs"], bidirectional=True))])
    assert flows(p, ("A", "L"), ("B", "L"), ("L", "C")) == ["deny"] * 3


def test_source_resource_of_type_peer():
    r = rule(None, ["devs"], sourceResource={"id": "B", "type": "peer"})
    p = prog([policy("p", r)])
    assert flows(p, ("B", "L"), ("C", "L")) == ["allow", "deny"]
    r = rule(["devs"], None, destinationResource={"id": "C", "type": "peer"})
    p = prog([policy("p", r)])
    assert flows(p, ("L", "C"), ("L", "B"), ("C", "L")) == ["allow", "deny", "deny"]


def test_ipv6_addresses_of_peers():
    p = prog([policy("p", rule(["devs"], ["devs"]))])
    assert v(p, IP6["A"], IP6["L"]) == "allow"
    assert v(p, IP6["L"], IP6["A"]) == "allow"


# ---------------------------------------------------------------- ports and protocols


@pytest.mark.parametrize(
    ("rule_kw", "probes"),
    [
        ({"protocol": "tcp", "ports": ["80", "443"]},
         {("tcp", 80): "allow", ("tcp", 443): "allow", ("tcp", 81): "deny", ("udp", 80): "deny"}),
        ({"protocol": "udp", "port_ranges": [{"start": 8000, "end": 8100}]},
         {("udp", 8000): "allow", ("udp", 8100): "allow", ("udp", 8101): "deny", ("tcp", 8050): "deny"}),
        # The seed's shape: both given; ports win and ranges are ignored.
        ({"protocol": "tcp", "ports": ["80"], "port_ranges": [{"start": 80, "end": 320}]},
         {("tcp", 80): "allow", ("tcp", 81): "deny", ("tcp", 320): "deny"}),
        ({"protocol": "tcp"}, {("tcp", 1): "allow", ("tcp", 65535): "allow", ("udp", 53): "deny",
                               ("icmp", None): "deny"}),
        ({"protocol": "udp", "ports": []}, {("udp", 53): "allow", ("tcp", 53): "deny"}),
        ({"protocol": "all"}, {("tcp", 22): "allow", ("udp", 53): "allow", ("icmp", None): "allow",
                               ("sctp", 9): "allow"}),
        ({"protocol": "icmp"}, {("icmp", None): "allow", ("tcp", 80): "deny", ("udp", 80): "deny"}),
        ({"protocol": "netbird-ssh", "ports": ["22"]},
         {("tcp", 22): "allow", ("udp", 22): "deny", ("tcp", 23): "deny"}),
        ({"protocol": "TCP", "ports": [8080]}, {("tcp", 8080): "allow", ("tcp", 80): "deny"}),
    ],
)
def test_ports_and_protocols(rule_kw, probes):
    p = prog([policy("p", rule(["servers"], ["devs"], **rule_kw))])
    for (proto, port), want in probes.items():
        assert v(p, "B", "L", proto, port) == want, (proto, port)
        # Ports are the destination port in both directions; one-way rule: never L -> B.
        assert v(p, "L", "B", proto, port) == "deny"


def test_icmp_applies_to_v6_too():
    p = prog([policy("p", rule(["devs"], ["devs"], protocol="icmp"))])
    assert v(p, IP6["A"], IP6["L"], "icmp") == "allow"


def test_seed_shape_warns_about_ignored_ranges():
    r = rule(["servers"], ["devs"], protocol="tcp", ports=["80"], port_ranges=[{"start": 80, "end": 320}])
    c = compile_([policy("p", r)])
    assert any(w.field == "rules[0].port_ranges" for w in c.warnings)


# ---------------------------------------------------------------- enabled, drop over accept


@pytest.mark.parametrize("where", ["rule", "policy"])
def test_disabled_rule_or_policy_is_skipped_entirely(where):
    drop = rule(["all"], ["devs"], action="drop", enabled=where != "rule")
    accept = policy("a", rule(["all"], ["devs"]))
    p = prog([accept, policy("d", drop, enabled=where != "policy")])
    assert flows(p, ("A", "L"), ("B", "L")) == ["allow", "allow"]  # no implicit drops
    p = prog([policy("d", drop, enabled=where != "policy")])
    assert flows(p, ("A", "L"), ("B", "L")) == ["deny", "deny"]  # and no implicit accepts


@pytest.mark.parametrize("drop_first", [True, False])
def test_any_matching_drop_beats_any_matching_accept(drop_first):
    accept = policy("a", rule(["all"], ["devs"], bidirectional=True))
    drop = policy("d", rule(["servers"], ["devs"], action="drop", protocol="tcp", ports=["22"],
                            bidirectional=True))
    p = prog([drop, accept] if drop_first else [accept, drop])
    assert v(p, "B", "L", "tcp", 22) == "deny"
    assert v(p, "L", "B", "tcp", 22) == "deny"
    assert v(p, "B", "L", "tcp", 80) == "allow"
    assert v(p, "C", "L", "tcp", 22) == "allow"
    ep = p.endpoints["peer-l"]
    for d in (ep.ingress, ep.egress):
        verdicts = [r.verdict for r in d.rules]
        assert verdicts == sorted(verdicts, key=lambda x: x is not Verdict.DROP)


# ---------------------------------------------------------------- posture checks


def version_check(cid: str, minimum: str) -> dict[str, Any]:
    return {"id": cid, "name": cid, "description": "", "checks": {"nb_version_check": {"min_version": minimum}}}


def geo_check(cid: str, action: str, *locations: tuple[str, str | None]) -> dict[str, Any]:
    locs = [{"country_code": c, **({"city_name": city} if city else {})} for c, city in locations]
    return {"id": cid, "name": cid, "checks": {"geo_location_check": {"locations": locs, "action": action}}}


ACCEPT_FROM_ALL = rule(["all"], ["devs"])


@pytest.mark.parametrize(
    ("peer_kw", "check", "expect"),
    [
        ({"version": "0.77.1"}, version_check("pc", "0.70.0"), "allow"),
        ({"version": "0.70.0"}, version_check("pc", "0.70.0"), "allow"),
        ({"version": "0.77.1-rc.1"}, version_check("pc", "0.77.1"), "allow"),  # cut at '-'
        ({"version": "0.60.9"}, version_check("pc", "0.70.0"), "deny"),
        ({"version": "development"}, version_check("pc", "0.1.0"), "deny"),
        ({"version": ""}, version_check("pc", "0.1.0"), "deny"),
        ({}, geo_check("pc", "allow", ("DE", None)), "allow"),
        ({}, geo_check("pc", "allow", ("DE", "Munich")), "deny"),
        ({}, geo_check("pc", "allow", ("DE", "Berlin")), "allow"),
        ({}, geo_check("pc", "allow", ("FR", None)), "deny"),
        ({}, geo_check("pc", "deny", ("DE", None)), "deny"),
        ({}, geo_check("pc", "deny", ("FR", None)), "allow"),
        ({"country_code": "", "city_name": ""}, geo_check("pc", "deny", ("FR", None)), "deny"),
        # Checks the REST data cannot evaluate count as failing for accept rules.
        ({}, {"id": "pc", "name": "os", "checks": {"os_version_check": {"linux": {"min_kernel_version": "5"}}}},
         "deny"),
        ({}, {"id": "pc", "name": "proc", "checks": {"process_check": {"processes": []}}}, "deny"),
        ({}, {"id": "pc", "name": "net", "checks": {"peer_network_range_check": {"ranges": ["10.0.0.0/8"],
                                                                                  "action": "allow"}}}, "deny"),
        # All members must pass.
        ({}, {"id": "pc", "name": "both", "checks": {"nb_version_check": {"min_version": "0.1.0"},
                                                      "geo_location_check": {"locations": [{"country_code": "FR"}],
                                                                             "action": "allow"}}}, "deny"),
        ({}, {"id": "pc", "name": "none", "checks": {}}, "allow"),
    ],
)
def test_posture_checks_filter_source_peers(peer_kw, check, expect):
    peers = [peer("L"), peer("A"), peer("B", **peer_kw), peer("C")]
    pol = policy("p", ACCEPT_FROM_ALL, source_posture_checks=["pc"])
    p = prog([pol], peers=peers, checks=[check])
    assert v(p, "B", "L") == expect
    if peer_kw:  # only B differs: the other sources are unaffected
        assert v(p, "C", "L") == "allow"


def test_posture_checks_do_not_filter_destinations():
    peers = [peer("L"), peer("A"), peer("B", version="0.1.0"), peer("C")]
    pol = policy("p", rule(["devs"], ["servers"]), source_posture_checks=["pc"])
    p = prog([pol], peers=peers, checks=[version_check("pc", "0.70.0")])
    assert v(p, "L", "B") == "allow"


def test_local_peer_failing_posture_is_not_in_sources():
    peers = [peer("L", version="0.1.0"), peer("A"), peer("B"), peer("C")]
    pol = policy("p", rule(["devs"], ["servers"], bidirectional=True), source_posture_checks=["pc"])
    p = prog([pol], peers=peers, checks=[version_check("pc", "0.70.0")])
    assert flows(p, ("L", "B"), ("B", "L")) == ["deny", "deny"]


def test_unevaluable_check_keeps_peers_in_drop_rules():
    os_check = {"id": "pc", "name": "os", "checks": {"os_version_check": {"linux": {"min_kernel_version": "5"}}}}
    drop = policy("d", rule(["servers"], ["devs"], action="drop"), source_posture_checks=["pc"])
    accept = policy("a", rule(["all"], ["devs"]))
    p = prog([drop, accept], checks=[os_check])
    assert flows(p, ("B", "L"), ("C", "L")) == ["deny", "allow"]


def test_unknown_posture_check_id_is_skipped():
    pol = policy("p", ACCEPT_FROM_ALL, source_posture_checks=["does-not-exist"])
    p = prog([pol])
    assert flows(p, ("A", "L"), ("B", "L")) == ["allow", "allow"]


def test_invalid_posture_check_without_last_good_never_widens():
    acct = account([policy("p", ACCEPT_FROM_ALL, source_posture_checks=["bad"])])
    acct = nb.Account(acct.policies, acct.groups, acct.peers, {}, unknown_posture_checks=frozenset({"bad"}))
    p = nb.compile_account(acct, "L").program
    assert v(p, "B", "L") == "deny"


def test_invalid_group_without_last_good_never_widens():
    acct = account([policy("a", ACCEPT_FROM_ALL),
                    policy("d", rule(["broken"], ["devs"], action="drop"))])
    acct = nb.Account(acct.policies, acct.groups, acct.peers, {}, unknown_groups=frozenset({"broken"}))
    c = nb.compile_account(acct, "L")
    assert flows(c.program, ("A", "L"), ("B", "L")) == ["deny", "deny"]
    assert any("broken" in w.message for w in c.warnings)


# ---------------------------------------------------------------- awkward shapes


def test_null_lists_everywhere():
    peers = [peer("L"), peer("A"), peer("B"), peer("C")]
    groups = [*GROUPS, group("nullpeers", None)]
    r = rule(["servers", "nullpeers"], ["devs"], ports=None, port_ranges=None, protocol="tcp")
    pol = policy("p", r, source_posture_checks=None)
    c = compile_([pol], peers=peers, groups=groups)
    assert v(c.program, "B", "L", "tcp", 5000) == "allow"
    # A policy with rules: null has nothing to say.
    assert v(prog([{**policy("q"), "rules": None}]), "B", "L") == "deny"


def test_multi_rule_policy_whose_later_rule_has_null_sources():
    # NetBird issue #3583: rule ids equal the policy id; later rules lose their sources.
    r0 = rule(["servers"], ["devs"], id="p", name="web", protocol="tcp", ports=["443"])
    r1 = rule(None, ["devs"], id="p", name="ssh", protocol="tcp", ports=["22"])
    c = compile_([policy("p", r0, r1)])
    assert v(c.program, "B", "L", "tcp", 443) == "allow"
    for s in ("A", "B", "C", "8.8.8.8"):
        assert v(c.program, s, "L", "tcp", 22) == "deny"  # never "any"
    assert [(w.ref.name, w.field) for w in c.warnings] == [("p", "rules[1].sources")]
    # Distinct keys per rule index even though the rule ids collide.
    keys = [r.key for r in c.program.endpoints["peer-l"].ingress.rules]
    assert len(keys) == len(set(keys))


def test_request_shape_group_ids_as_strings():
    r = rule(None, None)
    r["sources"], r["destinations"] = ["servers"], ["devs"]
    assert v(prog([policy("p", r)]), "B", "L") == "allow"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda p: p["rules"][0].update(protocol="gre"), "rules[0].protocol"),
        (lambda p: p["rules"][0].update(action="reject"), "rules[0].action"),
        (lambda p: p["rules"][0].update(protocol="tcp", ports=["http"]), "rules[0].ports[0]"),
        (lambda p: p["rules"][0].update(protocol="tcp", ports=["70000"]), "rules[0].ports[0]"),
        (lambda p: p["rules"][0].update(protocol="tcp", port_ranges=[{"start": 9, "end": 1}]),
         "rules[0].port_ranges[0]"),
        (lambda p: p["rules"][0].update(protocol="icmp", ports=["8"]), "rules[0].ports"),
        (lambda p: p["rules"][0].update(protocol="all", port_ranges=[{"start": 1, "end": 2}]),
         "rules[0].ports"),
        (lambda p: p["rules"][0].update(enabled="yes"), "rules[0].enabled"),
        (lambda p: p["rules"][0].update(sources="devs"), "rules[0].sources"),
        (lambda p: p.update(enabled=None), "enabled"),
        (lambda p: p.update(rules={"a": 1}), "rules"),
        (lambda p: p.update(source_posture_checks=[3]), "source_posture_checks[0]"),
    ],
)
def test_invalid_policies_name_the_field(mutate, field):
    body = policy("p", rule(["servers"], ["devs"]))
    mutate(body)
    with pytest.raises(Invalid) as e:
        nb.parse_policy(RawPolicy(ObjectRef("Policy", "", "p", "netbird"), body))
    assert e.value.field == field


def test_invalid_peer_group_and_posture_check():
    with pytest.raises(Invalid, match="ip"):
        nb.parse_peer(peer("A", ip="100.64.0.300"))
    with pytest.raises(Invalid, match="peers"):
        nb.parse_group({"id": "g", "name": "g", "peers": "A"})
    with pytest.raises(Invalid, match="min_version"):
        nb.parse_posture_check(version_check("pc", "latest"))
    with pytest.raises(Invalid, match="action"):
        nb.parse_posture_check(geo_check("pc", "maybe", ("DE", None)))


# ---------------------------------------------------------------- egress, origins, keys


def test_egress_enforced_inside_the_netbird_range_only():
    p = prog([policy("p", rule(["devs"], ["servers"]))])
    assert v(p, "L", "B") == "allow"
    assert v(p, "L", "C") == "deny"  # a peer
    assert v(p, "L", "100.64.9.9") == "deny"  # inside the range, not a peer
    assert v(p, "L", "8.8.8.8", "udp", 53) == "allow"  # outside the range
    assert v(p, "L", "2001:db8::1") == "allow"
    assert v(p, "L", "fd00:4e42::9") == "deny"  # the network of the peers' IPv6 addresses


def test_egress_range_is_a_parameter():
    ranges = (ipaddress.ip_network("100.64.0.0/24"), ipaddress.ip_network("fd00:4e42::/64"))
    p = prog([], ranges=ranges)
    assert v(p, "L", "100.64.1.1") == "allow"
    assert v(p, "L", "100.64.0.200") == "deny"
    assert v(p, "L", "fd00:4e42::99") == "deny"


def test_inbound_only_leaves_egress_alone():
    p = prog([policy("p", rule(["servers"], ["devs"]))], inbound_only=True)
    assert flows(p, ("L", "C"), ("L", "B"), ("B", "L"), ("C", "L")) == ["allow", "allow", "allow", "deny"]
    assert not p.endpoints["peer-l"].egress.enforced


def test_egress_drops_come_before_the_outside_accept():
    p = prog([policy("d", rule(["devs"], ["servers"], action="drop"))])
    rules = p.endpoints["peer-l"].egress.rules
    assert rules[-1].key == "netbird:outside-network"
    assert rules[0].verdict is Verdict.DROP


def test_no_policies_means_default_deny_inbound():
    p = prog([])
    ep = p.endpoints["peer-l"]
    assert ep.ingress.isolated and not ep.ingress.rules
    assert flows(p, ("A", "L"), ("8.8.8.8", "L")) == ["deny", "deny"]


def test_origin_names_policy_and_rule():
    r = rule(["servers"], ["devs"], name="web")
    p = prog([policy("p", rule(["others"], ["devs"], name="first"), r)])
    fv = evaluate(p, ip("B"), ip("L"), "tcp", 80)
    assert fv.ingress is not None and fv.ingress.rule is not None
    assert fv.ingress.rule.origin == Origin("netbird", "", "pol-p", Direction.INGRESS, 1, "web")


def test_rule_keys_are_stable_across_ip_changes_and_unique_per_peer_set():
    pols = [policy("p", rule(["devs"], ["servers"], bidirectional=True)),
            policy("q", rule(["all"], ["devs"]))]
    before = prog(pols)
    peers = [peer("L"), peer("A"), peer("B", ip="100.64.7.7"), peer("C")]
    after = prog(pols, peers=peers)

    def keyed(p: Program) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for ep in p.endpoints.values():
            for r in (*ep.ingress.rules, *ep.egress.rules):
                assert out.setdefault(r.key, r.peers) == r.peers  # same key => same peers
        return out

    kb, ka = keyed(before), keyed(after)
    assert set(kb) == set(ka)
    assert kb['netbird:"p"/0/dst'] != ka['netbird:"p"/0/dst']


def test_compile_is_deterministic_and_does_not_mutate_input():
    pols = [policy("p", rule(["devs"], ["servers"], bidirectional=True))]
    snapshot = copy.deepcopy(pols)
    assert prog(pols) == prog(pols)
    assert pols == snapshot


def test_bootstrap_program_denies_inbound_on_the_interface():
    p = nb.bootstrap_program("wt0")
    (ep,) = p.endpoints.values()
    assert ep.interface == "wt0" and ep.ips == ()
    assert ep.ingress.isolated and not ep.ingress.rules
    assert not ep.egress.enforced


# ---------------------------------------------------------------- partial view


@pytest.mark.parametrize(
    ("groups", "peers", "partial"),
    [
        (GROUPS, PEERS, False),
        (GROUPS, PEERS[:2], True),  # the All group names peers we cannot see
        ([group("all", None, name="All") | {"peers_count": 4}], PEERS[:2], True),  # counts them
        ([g for g in GROUPS if g["name"] != "All"], PEERS, True),  # All not visible at all
        ("garbage", PEERS, True),
    ],
)
def test_partial_view(groups, peers, partial):
    assert (partial_view(groups, peers) is not None) == partial


# ---------------------------------------------------------------- fail closed (issue 16)


@pytest.mark.parametrize(
    "ranges",
    [
        [{"start": 8000, "end": 8010}, {"start": 9000, "end": 9005}],  # disjoint
        [{"start": 8000, "end": 8010}, {"start": 8005, "end": 9005}],  # overlapping
        [{"start": 8000, "end": 8010}, {"start": 8011, "end": 9005}, {"start": 9000, "end": 9000}],  # adjacent
        [{"start": 9000, "end": 9005}, {"start": 8000, "end": 8010}, {"start": 9000, "end": 9005}],  # unsorted, dup
    ],
)
@pytest.mark.parametrize("action", ["accept", "drop"])
def test_several_port_ranges(ranges, action):
    # Two or more ranges used to raise TypeError (PortMatch has no order) and fail the account.
    covered = {p for r in ranges for p in range(r["start"], r["end"] + 1)}
    r = rule(["servers"], ["devs"], action=action, protocol="tcp", port_ranges=ranges)
    pols = [policy("r", r)] + ([policy("a", rule(["all"], ["devs"]))] if action == "drop" else [])
    p = prog(pols)
    inside = "allow" if action == "accept" else "deny"
    outside = "deny" if action == "accept" else "allow"
    for port in (7999, 8000, 8010, 8011, 8999, 9000, 9005, 9006):
        assert v(p, "B", "L", "tcp", port) == (inside if port in covered else outside), port
    assert v(p, "B", "L", "udp", 8000) == outside
    (ir_rule,) = [x for x in p.endpoints["peer-l"].ingress.rules if x.origin.policy == "pol-r"]
    spans = [(m.first, m.last) for m in ir_rule.ports]
    assert spans == sorted(spans) and all(a[1] + 1 < b[0] for a, b in itertools.pairwise(spans))


ACCEPT_ALL_TO_DEVS = policy("a", rule(["all"], ["devs"], bidirectional=True))

# (invalid part, what a drop rule then covers that a valid reading might not: probes that
# must be denied), all through an accept that would allow them.
BAD_DROPS = [
    ({"protocol": "gre"}, [("B", "L", "tcp", 80), ("B", "L", "udp", 53), ("B", "L", "icmp", None)]),
    ({"protocol": None}, [("B", "L", "tcp", 80), ("B", "L", "icmp", None)]),
    ({"protocol": 6}, [("B", "L", "udp", 9)]),
    ({"protocol": "tcp", "ports": ["0"]}, [("B", "L", "tcp", 1), ("B", "L", "tcp", 65535)]),
    ({"protocol": "tcp", "ports": ["22", "http"]}, [("B", "L", "tcp", 22), ("B", "L", "tcp", 80)]),
    ({"protocol": "tcp", "ports": ["²"]}, [("B", "L", "tcp", 2)]),  # a unicode digit int() refuses
    ({"protocol": "tcp", "ports": "22"}, [("B", "L", "tcp", 80)]),
    ({"protocol": "udp", "port_ranges": [{"start": 9, "end": 1}]}, [("B", "L", "udp", 5), ("B", "L", "udp", 500)]),
    ({"protocol": "udp", "port_ranges": [{"start": "x", "end": 2}, {"start": 5, "end": 6}]},
     [("B", "L", "udp", 5), ("B", "L", "udp", 7)]),
    ({"protocol": "icmp", "ports": ["8"]}, [("B", "L", "icmp", None), ("B", "L", "tcp", 8)]),
    ({"bidirectional": None}, [("B", "L", "tcp", 22), ("L", "B", "tcp", 22)]),
    ({"bidirectional": "yes"}, [("L", "B", "tcp", 22)]),
    ({"enabled": None}, [("B", "L", "tcp", 22)]),
    ({"enabled": "false"}, [("B", "L", "tcp", 22)]),
    ({"sources": "servers"}, [("B", "L", "tcp", 22), ("C", "L", "tcp", 22), ("A", "L", "tcp", 22)]),
    ({"sources": [gref("servers"), 17]}, [("C", "L", "tcp", 22)]),
    ({"sourceResource": {"id": 3, "type": "peer"}}, [("C", "L", "tcp", 22)]),
    ({"action": "reject"}, [("B", "L", "tcp", 22)]),  # unknown action: counts as drop
    ({"action": None}, [("B", "L", "tcp", 22)]),
]


@pytest.mark.parametrize(("bad", "denied"), BAD_DROPS)
def test_invalid_drop_rule_never_lets_the_accept_win(bad, denied):
    drop = rule(["servers"], ["devs"], action="drop", protocol="tcp", ports=["22"])
    drop.update(bad)
    c = compile_([ACCEPT_ALL_TO_DEVS, policy("d", drop)])
    for s, d, proto, port in denied:
        assert v(c.program, s, d, proto, port) == "deny", (s, d, proto, port)
    # The accept still works where the bad drop cannot reach: the drop's destination side
    # (devs) is valid, so L -> C stays allowed.
    assert v(c.program, "L", "C", "tcp", 22) == "allow"


def test_drop_rule_with_enabled_missing_counts_as_enabled():
    drop = rule(["servers"], ["devs"], action="drop")
    del drop["enabled"]
    del drop["bidirectional"]  # required by the API: missing is invalid, so both ways
    p = prog([ACCEPT_ALL_TO_DEVS, policy("d", drop)])
    assert flows(p, ("B", "L"), ("L", "B"), ("C", "L")) == ["deny", "deny", "allow"]


GRID = [(s, d, proto, port) for s, d in (("B", "L"), ("L", "B"), ("C", "L"), ("A", "L"), ("L", "A"))
        for proto, port in (("tcp", 22), ("tcp", 80), ("tcp", 2), ("udp", 5), ("icmp", None))]


@pytest.mark.parametrize(("bad", "denied"), BAD_DROPS)
def test_the_same_invalid_part_in_an_accept_matches_nothing(bad, denied):
    if "action" in bad:
        return  # an unknown action is never an accept
    base = rule(["servers"], ["devs"], protocol="tcp", ports=["22"])
    broken = {**base, **bad}
    valid, p = prog([policy("a", base)]), prog([policy("a", broken)])
    # Never more than the valid rule allowed: the invalid part itself opens nothing.
    widened = [f for f in GRID if v(p, *f) == "allow" and v(valid, *f) == "deny"]
    assert not widened
    for f in denied:
        if v(valid, *f) == "deny":
            assert v(p, *f) == "deny", f


def test_valid_ports_of_a_partly_invalid_accept_still_apply_and_nothing_else():
    p = prog([policy("a", rule(["servers"], ["devs"], protocol="tcp", ports=["22", "http", "0"]))])
    assert [v(p, "B", "L", "tcp", port) for port in (22, 80, 0, 23)] == ["allow", "deny", "deny", "deny"]
    # nothing valid left must not mean "every port"
    p = prog([policy("a", rule(["servers"], ["devs"], protocol="tcp", ports=["http"]))])
    assert [v(p, "B", "L", "tcp", port) for port in (22, 80, 1)] == ["deny"] * 3
    p = prog([policy("a", rule(["servers"], ["devs"], protocol="tcp", port_ranges=[{"start": 5, "end": 1}]))])
    assert v(p, "B", "L", "tcp", 3) == "deny"


def test_invalid_policy_enabled_keeps_its_drops_and_disables_its_accepts():
    pol = policy("x", rule(["servers"], ["devs"], action="drop", protocol="tcp", ports=["22"]),
                 rule(["others"], ["devs"]), enabled=None)
    c = compile_([ACCEPT_ALL_TO_DEVS, pol])
    assert v(c.program, "B", "L", "tcp", 22) == "deny"  # the drop stays
    assert v(c.program, "B", "L", "tcp", 80) == "allow"  # through the valid accept policy
    c = compile_([pol])
    assert v(c.program, "C", "L") == "deny"  # the accept of the invalid policy is off


def test_invalid_posture_check_reference_is_failing_for_accepts_and_passing_for_drops():
    acc = policy("a", rule(["all"], ["devs"]), source_posture_checks=[7])
    drop = policy("d", rule(["servers"], ["devs"], action="drop"), source_posture_checks=[{"no": "id"}])
    p = prog([acc, drop, policy("ok", rule(["others"], ["devs"]))])
    assert flows(p, ("A", "L"), ("B", "L"), ("C", "L")) == ["deny", "deny", "allow"]
    p = prog([ACCEPT_ALL_TO_DEVS, drop])
    assert flows(p, ("B", "L"), ("C", "L")) == ["deny", "allow"]


@pytest.mark.parametrize("rules_value", ["accept everything", None, 7, []])
def test_unreadable_rule_is_a_drop_of_everything(rules_value):
    pol = policy("x")
    pol["rules"] = [rules_value] if rules_value != [] else {"a": 1}
    c = compile_([ACCEPT_ALL_TO_DEVS, pol])
    assert flows(c.program, ("A", "L"), ("L", "A"), ("B", "L")) == ["deny"] * 3
    assert v(c.program, "L", "8.8.8.8") == "allow"  # outside the NetBird network: untouched


def test_drop_that_lost_its_sources_applies_to_every_peer():
    # NetBird issue #3583 shape (sources: null) on a drop: never "nobody".
    c = compile_([ACCEPT_ALL_TO_DEVS, policy("d", rule(None, ["devs"], action="drop", protocol="tcp",
                                                         ports=["22"]))])
    assert [v(c.program, s, "L", "tcp", 22) for s in ("A", "B", "C")] == ["deny"] * 3
    assert v(c.program, "B", "L", "tcp", 80) == "allow"
    assert any(w.field == "rules[0].sources" and "every peer" in w.message for w in c.warnings)


def test_errors_name_the_policy_the_rule_and_the_field():
    r0 = rule(["servers"], ["devs"], id="r-ok", name="fine")
    r1 = rule(["servers"], ["devs"], id="r-bad", name="ssh-block", action="drop", protocol="gre",
              ports=["0"], bidirectional=None)
    pol = nb.read_policy(RawPolicy(ObjectRef("Policy", "", "p", "netbird"), policy("p", r0, r1)))
    fields = [e.field for e in pol.problems]
    assert fields == ["rules[1].bidirectional", "rules[1].protocol", "rules[1].ports[0]"]
    for e in pol.problems:
        assert "'pol-p'" in e.message and "'ssh-block'" in e.message and "'r-bad'" in e.message
    assert "every protocol" in pol.problems[1].message
    with pytest.raises(Invalid) as exc:
        nb.parse_policy(RawPolicy(ObjectRef("Policy", "", "p", "netbird"), policy("p", r0, r1)))
    assert exc.value.field == "rules[1].bidirectional"


def test_rule_keys_cannot_collide_through_hostile_ids():
    # Without quoting, id 'p~invalid' or 'p/0' could spell another rule's key: one key,
    # two peer sets, and the dataplane refuses the whole program.
    pols = [policy("p", rule(["servers"], ["devs"])), policy("p/0", rule(["others"], ["devs"])),
            policy('p"/0', rule(["all"], ["devs"]))]
    acct = account(pols)
    extra = acct.policies[0].drops_only("~invalid")
    acct = nb.Account((*acct.policies, extra), acct.groups, acct.peers)
    p = nb.compile_account(acct, "L").program
    keys = [r.key for ep in p.endpoints.values() for r in ep.ingress.rules]
    assert len(keys) == len(set(keys))
