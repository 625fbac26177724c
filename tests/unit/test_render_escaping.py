"""Names never reach kernel text unescaped (issue 16, injection slice).

Arbitrary Unicode (quotes, backslashes, newlines, `;`, `}`, `#`, NUL, lone surrogates,
bidi controls, very long and multi-byte text) as pod, namespace, policy and NetBird
peer/group/policy/rule names goes through the real semantics and the nftables
renderers, bypassing admission (the renderers must be safe on their own). The rendered
table and diffs must have exactly the structure the same objects with benign names give,
and real `nft -c -f` must accept them, in a throwaway network namespace.
"""

from __future__ import annotations

import codecs
import dataclasses
import ipaddress
import re
from collections.abc import Iterator
from itertools import count

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from agent.dataplane.base import Count, Counters, Dataplane, DataplaneError
from agent.dataplane.ebpf import EPKEY_SIZE, EbpfDataplane, EpState, epkey_name, epkey_value
from agent.dataplane.escape import ELLIPSIS, display
from agent.dataplane.nftables import COMMENT_MAX, build_model, render_diff, render_full
from agent.inventory import Endpoint, Inventory, Namespace, ObjectRef, RawPolicy
from agent.ir import Direction, DirectionProgram, EndpointProgram, Origin, PeerSet, Program, Rule, Verdict
from agent.metrics import KernelCollector
from agent.policy import netbird as nb
from agent.policy.kubernetes import compile_inventory, parse_policy
from tests.kit.nftns import nft_file, throwaway_netns

NASTY = [
    'x"\n}\ndelete table inet stockade\n#',
    '"; flush ruleset; add rule inet stockade forward accept comment "',
    "\\", "\\\"", "}", "{", "#", ";", "\0", "\n", "\r\n", "\t", "$x", "@egress4",
    "é" * 200, "\U0001f600" * 100, "\ud800", "a\udfffb", "\u202egnp.exe", "\u0000" * 3,
    "a" * 2000, "r:deadbeef0000", "default-deny", "  ", "'",
]
name = st.one_of(
    st.sampled_from(NASTY),
    st.text(st.characters(exclude_categories=()), min_size=1, max_size=300),  # surrogates included
)
_ns_counter = count()


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A throwaway network namespace: `nft -c` checks a batch against a real kernel."""
    with throwaway_netns("esc") as ns:
        yield ns


def nft_check(ns: str, text: str) -> None:
    nft_file(ns, text, check=True)


_IDS = [(re.compile(r"\b(in|out)_[0-9a-f]{32}\b"), r"\1_H"), (re.compile(r"\bp_[0-9a-f]{32}_"), "p_H_"),
        (re.compile(r"\br:[0-9a-f]{12}\b"), "r:H")]
_COMMENT = re.compile(r'comment "([^"]*)"')


def shape(text: str) -> list[str]:
    """The text's lines with comments emptied and hash identifiers generalised, sorted:
    what must not depend on names (ordering by hash does)."""
    out = []
    for line in text.splitlines():
        line = _COMMENT.sub('comment ""', line)
        for rx, sub in _IDS:
            line = rx.sub(sub, line)
        out.append(line)
    return sorted(out)


def assert_safe_comments(text: str) -> None:
    for c in _COMMENT.findall(text):
        assert len(c.encode()) <= COMMENT_MAX and c.isprintable(), c


# ------------------------------------------------------------------ Kubernetes


def k8s_program(names: list[str], variant: int = 0) -> Program:
    """Two namespaces, three pods, three policies, named by `names` (7 of them)."""
    ns_a, ns_b, p1, p2, p3, pol1, pol2 = names
    ip = ipaddress.ip_address
    inv = Inventory(namespaces={ns_a: Namespace(ns_a), ns_b: Namespace(ns_b)})
    for ns, pod, app, addr in ((ns_a, p1, "web", "10.0.0.1"), (ns_a, p2, "db", "10.0.0.2"),
                               (ns_b, p3, "client", "10.0.1.3")):
        ep = Endpoint(ns, pod, (ip(addr), ip("fd00::" + addr.replace(".", ":"))), {"app": app}, node="n1")
        inv.endpoints[ep.key] = ep
    port = 80 + variant

    def add(ns: str, pname: str, spec: dict) -> None:
        # Admission would replace an invalid name by a stand-in: parse under a valid one,
        # then give the parsed policy the hostile names, so that they reach the renderer.
        valid = RawPolicy(ObjectRef("NetworkPolicy", "ns", "pol"), {"spec": spec})
        parsed = dataclasses.replace(parse_policy(valid), namespace=ns, name=pname)
        ref = ObjectRef("NetworkPolicy", ns, pname)
        inv.policies[ref.key] = RawPolicy(ref, {"metadata": {"namespace": ns, "name": pname}, "spec": spec}, parsed)

    add(ns_a, pol1, {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": "db"}}},
                  {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "client"}}}],
         "ports": [{"port": port}, {"port": 8000, "endPort": 8080}]}]})
    add(ns_a, pol2, {"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
         "ports": [{"protocol": "UDP", "port": 53}]}]})
    add(ns_b, pol1, {"podSelector": {}, "ingress": [{}]})
    return compile_inventory(inv, node="n1")


def benign(n: int, tag: str = "n") -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


def distinct_keys(names: list[str]) -> bool:
    """Distinct names may still make equal "ns/name" keys ("a/b"+"c", "a"+"b/c"): such
    inputs are not comparable with benign names (keys that collide merge in the IR)."""
    ns_a, ns_b, p1, p2, p3, pol1, pol2 = names
    pods = {f"{ns_a}/{p1}", f"{ns_a}/{p2}", f"{ns_b}/{p3}"}
    pols = {f"{ns_a}/{pol1}", f"{ns_a}/{pol2}", f"{ns_b}/{pol1}"}
    return len(pods) == 3 and len(pols) == 3 and ns_a != ns_b


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(name, min_size=7, max_size=7, unique=True))
def test_kubernetes_names_render_full_with_benign_structure(netns: str, names: list[str]) -> None:
    assume(distinct_keys(names))
    hostile = render_full(build_model(k8s_program(names)))
    assert shape(hostile) == shape(render_full(build_model(k8s_program(benign(7)))))
    assert_safe_comments(hostile)
    nft_check(netns, hostile)


@SETTINGS
@given(st.lists(name, min_size=7, max_size=7, unique=True))
def test_kubernetes_names_render_diff_with_benign_structure(netns: str, names: list[str]) -> None:
    assume(distinct_keys(names))
    ref_old, ref_new = build_model(k8s_program(benign(7))), build_model(k8s_program(benign(7), 1))
    cases = [
        # same names, a port changes: chains are flushed and rewritten
        ((build_model(k8s_program(names)), build_model(k8s_program(names, 1))), (ref_old, ref_new)),
        # benign names renamed to hostile ones: chains are added with their comments
        ((ref_old, build_model(k8s_program(names, 1))),
         (ref_old, build_model(k8s_program(benign(7, "m"), 1)))),
    ]
    for (old, new), (b_old, b_new) in cases:
        text, _ = render_diff(old, new)
        want, _ = render_diff(b_old, b_new)
        assert shape(text) == shape(want)
        assert_safe_comments(text)
        nft_check(netns, render_full(old) + text)


# ------------------------------------------------------------------ NetBird


def nb_program(names: list[str], variant: int = 0) -> Program:
    """The local peer and two others, a group, two policies, named by `names` (12 of them)."""
    l_id, l_name, a_id, a_name, b_id, b_name, g_id, g_name, p_id, p_name, r_id, r_name = names
    ip = ipaddress.ip_address
    peers = {pid: nb.Peer(pid, pname, ip(f"100.64.0.{i}"), ip(f"fd00:4e42::{i}"))
             for i, (pid, pname) in enumerate(((l_id, l_name), (a_id, a_name), (b_id, b_name)), start=1)}
    everyone = nb.Group("gAll", nb.ALL_GROUP, tuple(peers))
    clients = nb.Group(g_id, g_name, (a_id,))
    local = nb.Group(f"{g_id}-local", f"{g_name}-local", (l_id,))

    def rule(index: int, verdict: Verdict, proto: str, ports: tuple[int, ...], src: str, dst: str) -> nb.NbRule:
        return nb.NbRule(index, f"{r_id}{index}", f"{r_name}{index}", True, verdict, index == 1, proto, ports, (),
                         (src,), (dst,))

    policies = (
        nb.Policy(ObjectRef("policy", "", p_name, "netbird"), p_id, p_name, True, (), (
            rule(0, Verdict.ACCEPT, "tcp", (80 + variant,), g_id, local.id),
            rule(1, Verdict.ACCEPT, "udp", (53,), local.id, g_id))),
        nb.Policy(ObjectRef("policy", "", f"{p_name}-drop", "netbird"), f"{p_id}-drop", f"{p_name}-drop", True, (),
                  (rule(2, Verdict.DROP, "all", (), "gAll", local.id),)),
    )
    account = nb.Account(policies, {g.id: g for g in (everyone, clients, local)}, peers)
    return nb.compile_account(account, l_id).program


@SETTINGS
@given(st.lists(name, min_size=12, max_size=12, unique=True))
def test_netbird_names_render_with_benign_structure(netns: str, names: list[str]) -> None:
    # Ids are concatenated with fixed suffixes above; those must stay distinct too.
    assume(len({n for n in names} | {f"{names[6]}-local", f"{names[8]}-drop", "gAll"}) == 15)
    ref = benign(12)
    hostile = render_full(build_model(nb_program(names)))
    assert shape(hostile) == shape(render_full(build_model(nb_program(ref))))
    assert_safe_comments(hostile)
    nft_check(netns, hostile)
    cases = [
        # same names, a port changes: the chain is flushed and rewritten
        ((nb_program(names), nb_program(names, 1)), (nb_program(ref), nb_program(ref, 1))),
        # the local peer renamed from a benign to a hostile name: a new chain with its comment
        ((nb_program(ref), nb_program(names, 1)), (nb_program(ref), nb_program(benign(12, "m"), 1))),
    ]
    for (old, new), (b_old, b_new) in cases:
        text, _ = render_diff(build_model(old), build_model(new))
        want, _ = render_diff(build_model(b_old), build_model(b_new))
        assert shape(text) == shape(want)
        assert_safe_comments(text)
        nft_check(netns, render_full(build_model(old)) + text)


# ------------------------------------------------------------------ the display form


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_categories=())), st.integers(min_value=len(ELLIPSIS) + 1, max_value=300))
def test_display_is_printable_quote_free_byte_capped_and_exact_when_uncut(text: str, limit: int) -> None:
    full = display(text)
    assert full.isprintable() and '"' not in full
    # uncut, it is an exact (reversible) spelling of the name
    assert codecs.decode(full.encode("latin-1", "backslashreplace"), "unicode_escape") == text
    cut = display(text, limit)
    size = len(cut.encode())  # encodable at all: no lone surrogate left
    assert size <= limit
    if cut != full:  # cut on a character (and escape) boundary, and marked
        assert cut.endswith(ELLIPSIS) and full.startswith(cut[: -len(ELLIPSIS)])
        assert not re.search(r"\\(x[0-9a-f]?|u[0-9a-f]{0,3}|U[0-9a-f]{0,7})$", cut[: -len(ELLIPSIS)])


def test_display_counts_bytes_not_characters() -> None:
    cut = display("é" * 100, 128)  # 200 bytes: cut to 62 characters + "..."
    assert cut == "é" * 62 + ELLIPSIS and len(cut.encode()) == 127


# ------------------------------------------------------------------ eBPF endpoint names


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(name, st.text(st.characters(exclude_categories=()), min_size=250, max_size=400)),
                min_size=2, max_size=2, unique=True))
def test_epkeys_values_are_exact_or_digests_and_never_alike(keys: list[str]) -> None:
    a, b = (epkey_value(k) for k in keys)
    assert len(a) == len(b) == EPKEY_SIZE and a != b
    for k, v in zip(keys, (a, b), strict=True):
        # read back: the key itself, or (too long, NUL, lone surrogate) a placeholder that
        # apply resolves; a placeholder holds a NUL, which no plainly stored key does
        assert epkey_name(v) == k or (v[:1] == b"\xff" and re.fullmatch("\0[0-9a-f]{32}", epkey_name(v)))


def test_long_keys_sharing_255_bytes_stay_apart() -> None:
    a, b = "ns/" + "x" * 300 + "a", "ns/" + "x" * 300 + "b"
    assert epkey_name(epkey_value(a)) != epkey_name(epkey_value(b))
    assert epkey_name(epkey_value("shop/db")) == "shop/db"


def test_adopted_digests_resolve_to_their_keys_and_never_to_a_lookalike() -> None:
    """After a restart, endpoints stored as digests are found again by the program's keys;
    a program key that spells another endpoint's placeholder does not take its state."""
    dp = EbpfDataplane(pin_root="/nonexistent")
    long, other = "ns/" + "x" * 300, "ns/" + "y" * 300
    ph, ph2 = (epkey_name(epkey_value(k)) for k in (long, other))
    dp.eps = {ph: EpState(1, 1, None), ph2: EpState(2, 1, None), "app/plain": EpState(3, 1, None)}
    dp._unresolved = {ph: ph, ph2: ph2}
    dp._resolve_hashed(Program("file", {k: EndpointProgram(k, ()) for k in (long, ph2, "app/plain")}))
    assert dp.eps[long].ep_id == 1 and dp.eps["app/plain"].ep_id == 3
    assert ph2 not in dp.eps  # the lookalike starts afresh; the real one waits, unmatched
    assert dp.hashed_names[epkey_value(long)] == long
    dp._resolve_hashed(Program("file", {k: EndpointProgram(k, ()) for k in (long, other)}))
    assert dp.eps[other].ep_id == 2 and dp.eps[long].ep_id == 1 and not dp._unresolved


def test_ebpf_compile_output_has_one_line_per_endpoint() -> None:
    prog = k8s_program(['x"\n}\nendpoint 9 forged', "b", "p\n1", "p2", "p3", "pol\r\n1", "pol2"])
    text = EbpfDataplane(pin_root="/nonexistent").render(prog)
    assert sum(line.startswith("endpoint ") for line in text.splitlines()) == len(prog.endpoints)
    assert "forged" not in "".join(line for line in text.splitlines() if not line.startswith("endpoint "))


# ------------------------------------------------------------------ metrics


class _Fixed(Dataplane):
    name = "fixed"

    def __init__(self, counters: Counters) -> None:
        self.fixed = counters

    def render(self, program: Program) -> str:
        return ""

    def apply(self, program: Program):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def counters(self, program: Program | None = None) -> Counters:
        return self.fixed

    def cleanup(self) -> None:
        pass


def test_metrics_scrape_survives_any_name() -> None:
    names = ["ns\ud800", 'p"\n1', "p2", "p3", "ns-b", "pol\\1\udfff", "pol2"]
    prog = k8s_program(names)
    c = Counters()
    for key, ep in prog.endpoints.items():
        for d in Direction:
            c.add_drop((key, d), Count(1, 60))
            for r in ep.direction(d).rules:
                c.add_rule((key, r.id, d), Count(2, 120))
    reg = CollectorRegistry()
    reg.register(KernelCollector(_Fixed(c), lambda: prog))
    text = generate_latest(reg).decode()
    assert "stockade_rule_packets_total{" in text and "stockade_drop_packets_total{" in text
    assert "\\ud800" in text  # the surrogate written as an escape, the rest escaped by the client


# ------------------------------------------------------------------ nft identifiers


def _ep(key: str, ip: str, rules: tuple[Rule, ...], interface: str | None = None) -> EndpointProgram:
    return EndpointProgram(key, (ipaddress.ip_address(ip),), ingress=DirectionProgram(True, rules),
                           interface=interface)


def test_one_rule_key_with_two_peer_sets_keeps_both(netns: str) -> None:
    """Names like "a/b"+"c" and "a"+"b/c" can make one rule key for two policies: each
    keeps its own peers, and the sync goes on (it used to fail for every object)."""
    o = Origin("file", "a", "b/c", Direction.INGRESS, 0)
    r1 = Rule(o, PeerSet.of([ipaddress.ip_network("10.1.0.0/24")]), key="file:a/b/c/ingress/0")
    r2 = Rule(o, PeerSet.of([ipaddress.ip_network("10.2.0.0/24")]), key="file:a/b/c/ingress/0")
    m = build_model(Program("file", {"x": _ep("x", "10.0.0.1", (r1,)), "y": _ep("y", "10.0.0.2", (r2,))}))
    assert sorted(e for _, elems in m.sets.values() for e in elems) == ["10.1.0.0/24", "10.2.0.0/24"]
    sets_of = {c: re.findall(r"@(p_\w+_4)", " ".join(rules)) for c, rules in m.chains.items()}
    assert len({s for v in sets_of.values() for s in v}) == 2
    nft_check(netns, render_full(m))


def test_a_device_name_nft_cannot_spell_is_refused_naming_the_field() -> None:
    rule = Rule(Origin("netbird", "", "p", Direction.INGRESS, 0), None, ())
    assert build_model(Program("netbird", {"peer": _ep("peer", "100.64.0.1", (rule,), "wt0")})).maps["ingress_if"]
    for bad in ('wt0" accept', "wt\n0", "wt*", "a" * 16, "", "é"):
        with pytest.raises(DataplaneError, match=r"peer.*field interface"):
            build_model(Program("netbird", {"peer": _ep("peer", "100.64.0.1", (rule,), bad)}))
