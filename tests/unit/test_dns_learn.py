"""The learner: DNS answers (wire bytes, built with dnspython) -> Learned entries."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dns.learn import MAX_CHAIN, TTL_FLOOR, merge, named_updates, resolved, updates
from agent.policy.cluster import DomainRule, Learned, parse_domain

ip = ipaddress.ip_address
R_EXACT = DomainRule("r/exact", (parse_domain("api.example.test", "f"),))
R_WILD = DomainRule("r/wild", (parse_domain("*.cdn.test", "f"),))
RULES = [R_EXACT, R_WILD]


def answer(qname: str, *records: tuple[str, int, str, str], rdtype: str = "A", rcode: int = dns.rcode.NOERROR,
           id_: int = 7) -> bytes:
    """A response to `qname` with (owner, ttl, type, data) records in the answer section."""
    q = dns.message.make_query(qname, rdtype, id=id_)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for owner, ttl, typ, data in records:
        r.answer.append(dns.rrset.from_text(owner.rstrip(".") + ".", ttl, "IN", typ, data))
    return r.to_wire()


def test_a_and_aaaa_with_ttl_floor() -> None:
    w = answer("api.example.test", ("api.example.test", 300, "A", "192.0.2.1"),
               ("api.example.test", 300, "A", "192.0.2.2"))
    assert updates("p", RULES, w, 1000.0) == [("p", "r/exact", ip("192.0.2.1"), 1300.0),
                                               ("p", "r/exact", ip("192.0.2.2"), 1300.0)]
    w6 = answer("API.Example.TEST.", ("api.example.test", 5, "AAAA", "2001:db8::1"), rdtype="AAAA")
    assert updates("p", RULES, w6, 0.0) == [("p", "r/exact", ip("2001:db8::1"), float(TTL_FLOOR))]
    w0 = answer("api.example.test", ("api.example.test", 0, "A", "192.0.2.1"))
    assert updates("p", RULES, w0, 10.0, floor=30) == [("p", "r/exact", ip("192.0.2.1"), 40.0)]


def test_cname_chain_matches_any_name_on_it_and_takes_the_smallest_ttl() -> None:
    w = answer("api.example.test",
               ("api.example.test", 900, "CNAME", "edge.cdn.test."),
               ("edge.cdn.test", 120, "CNAME", "x9.lb.other."),
               ("x9.lb.other", 3600, "A", "198.51.100.4"))
    [r] = resolved(w)
    assert r.texts == ("api.example.test", "edge.cdn.test", "x9.lb.other") and r.ttl == 120
    got = updates("p", RULES, w, 0.0)
    assert got == [("p", "r/exact", ip("198.51.100.4"), 120.0), ("p", "r/wild", ip("198.51.100.4"), 120.0)]


def test_records_off_the_chain_are_ignored() -> None:
    w = answer("other.test", ("other.test", 300, "A", "192.0.2.9"),
               ("api.example.test", 300, "A", "192.0.2.66"))  # unsolicited: not learned
    assert updates("p", RULES, w, 0.0) == []
    w = answer("api.example.test", ("api.example.test", 300, "CNAME", "a.other."),
               ("b.other", 300, "A", "192.0.2.66"))  # the chain's end has no address
    assert updates("p", RULES, w, 0.0) == []


def test_cname_loops_and_long_chains_end() -> None:
    loop = answer("api.example.test", ("api.example.test", 60, "CNAME", "b.test."),
                  ("b.test", 60, "CNAME", "api.example.test."), ("b.test", 60, "A", "192.0.2.1"))
    assert updates("p", RULES, loop, 0.0) == []
    hops = [(f"h{i}.cdn.test", 60, "CNAME", f"h{i + 1}.cdn.test.") for i in range(MAX_CHAIN + 4)]
    long = answer("h0.cdn.test", *hops, (f"h{MAX_CHAIN + 4}.cdn.test", 60, "A", "192.0.2.1"))
    assert updates("p", RULES, long, 0.0) == []
    hops = hops[:MAX_CHAIN]  # MAX_CHAIN hops are followed
    ok = answer("h0.cdn.test", *hops, (f"h{MAX_CHAIN}.cdn.test", 60, "A", "192.0.2.1"))
    assert len(updates("p", RULES, ok, 0.0)) == 1


def test_not_an_answer_learns_nothing() -> None:
    good = answer("api.example.test", ("api.example.test", 300, "A", "192.0.2.1"))
    assert updates("p", RULES, good, 0.0)
    assert updates("p", RULES, answer("api.example.test", ("api.example.test", 300, "A", "192.0.2.1"),
                                      rcode=dns.rcode.SERVFAIL), 0.0) == []
    q = dns.message.make_query("api.example.test", "A").to_wire()  # a query, not a response
    assert updates("p", RULES, q, 0.0) == []
    assert updates("p", RULES, b"", 0.0) == []
    assert updates("p", RULES, good[:-3], 0.0) == []  # truncated on the wire
    assert updates("p", [], good, 0.0) == []  # no rule for this pod


def test_wildcard_labels_and_label_holding_a_dot() -> None:
    w = answer("a.b.cdn.test", ("a.b.cdn.test", 60, "A", "192.0.2.1"))
    assert [u[1] for u in updates("p", RULES, w, 0.0)] == ["r/wild"]
    assert updates("p", RULES, answer("cdn.test", ("cdn.test", 60, "A", "192.0.2.1")), 0.0) == []
    # one label "api.example" then "test": not the name api.example.test
    w = answer(r"api\.example.test", (r"api\.example.test", 60, "A", "192.0.2.1"))
    assert updates("p", RULES, w, 0.0) == []


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_garbage_never_raises(data: bytes) -> None:
    assert isinstance(updates("p", RULES, data, 0.0), list)


@settings(max_examples=200)
@given(st.integers(min_value=0, max_value=200), st.binary(max_size=4))
def test_damaged_answers_never_raise(cut: int, junk: bytes) -> None:
    good = answer("api.example.test", ("api.example.test", 900, "CNAME", "edge.cdn.test."),
                  ("edge.cdn.test", 120, "A", "198.51.100.4"))
    for w in (good[:cut] + junk, good[:cut] + junk + good[cut + len(junk):]):
        assert isinstance(updates("p", RULES, w, 0.0), list)


def test_merge_keeps_the_later_expiry_and_caps_per_pod() -> None:
    t = merge(Learned(), [("p", "r", ip("192.0.2.1"), 100.0), ("q", "r", ip("192.0.2.1"), 50.0)])
    t = merge(t, [("p", "r", ip("192.0.2.1"), 80.0)])  # an earlier expiry never shortens
    assert t.entries[("p", "r")][ip("192.0.2.1")] == 100.0
    many = [("p", "r2", ip(f"10.0.{i // 256}.{i % 256}"), 200.0 + i) for i in range(10)]
    t = merge(t, many, cap=5)
    mine = sorted(x[2] for x in t.for_endpoint("p"))
    assert mine == [205.0 + i for i in range(5)]  # the soonest-expiring went first
    assert t.addresses("q", "r") == {ip("192.0.2.1")}  # another pod is never evicted
    assert len(t.expire(206.5)) == 3


def reference_merge(table: Learned, new: list, cap: int) -> dict:
    """merge as first written: copy everything, then cap every touched pod (the spec)."""
    entries = {k: dict(v) for k, v in table.entries.items()}
    for e, r, a, t in new:
        d = entries.setdefault((e, r), {})
        d[a] = max(t, d.get(a, t))
    for e in {x[0] for x in new}:
        mine = sorted(((t, r, a) for (ee, r), d in entries.items() if ee == e for a, t in d.items()),
                      key=lambda x: (x[0], x[1], str(x[2])))
        for _, r, a in mine[: max(0, len(mine) - cap)]:
            del entries[(e, r)][a]
    return {k: v for k, v in entries.items() if v}


ENTRY = st.tuples(st.sampled_from("pqr"), st.sampled_from(["r1", "r2"]),
                  st.integers(1, 12).map(lambda i: ip(f"10.0.0.{i}")), st.integers(0, 30).map(float))


@settings(max_examples=300)
@given(st.lists(st.lists(ENTRY, max_size=8), max_size=6), st.integers(1, 10))
def test_merge_touches_only_what_it_must_and_agrees_with_the_reference(batches: list, cap: int) -> None:
    table = Learned()
    for new in batches:
        before = table
        table = merge(before, new, cap)
        assert {k: dict(v) for k, v in table.entries.items()} == reference_merge(before, new, cap)
        touched = {(e, r) for e, r, _, _ in new}
        for k, v in table.entries.items():  # untouched maps are shared, not copied
            if k not in touched and k in before.entries and before.entries[k] == v:
                assert v is before.entries[k] or any(x[0] == k[0] for x in touched)


class CountingV4(ipaddress.IPv4Address):
    """An address counting its hash calls (IPv4Address.__hash__ is Python code)."""

    hashes = 0

    def __hash__(self) -> int:
        CountingV4.hashes += 1
        return super().__hash__()


def test_merge_does_not_hash_again_the_addresses_it_only_copies() -> None:
    # a pod that learned 1,000 addresses, then one answer more: its map is copied, not rehashed
    table = merge(Learned(), [("p", "r", CountingV4(f"10.1.{i // 256}.{i % 256}"), 100.0) for i in range(1000)])
    CountingV4.hashes = 0
    after = merge(table, [("p", "r", CountingV4("10.2.0.1"), 200.0), ("p", "r", CountingV4("10.1.0.0"), 300.0)])
    assert CountingV4.hashes <= 4  # the two new entries only (a lookup and a store each)
    assert len(after) == 1001 and after.entries[("p", "r")][ip("10.1.0.0")] == 300.0
    assert len(table) == 1000 and table.entries[("p", "r")][ip("10.1.0.0")] == 100.0  # the old table unchanged


def test_the_addresses_of_one_answer_share_its_question_string() -> None:
    w = answer("a.cdn.test", *(("a.cdn.test", 300, "A", f"192.0.2.{i}") for i in range(1, 5)))
    named = named_updates("p", RULES, resolved(w), 0.0)
    assert [q for _, q in named] == ["a.cdn.test"] * 4
    assert len({id(q) for _, q in named}) == 1  # one string kept per learned name, not one per address
