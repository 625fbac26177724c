"""The raw rule-counter dump (agent/dataplane/nftcounters.py): its decoder on messages built
by hand, the retry on an interrupted dump, and (in a throwaway namespace) the kernel's
answer against what `nft -j list table` says of the same rules."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.dataplane import netlink, nftcounters
from agent.dataplane.nfnetlink import NLA_F_NESTED, attr
from tests.kit.netns import inside
from tests.kit.nftns import nft_file, nft_json, throwaway_netns

N = NLA_F_NESTED


def _expr(name: str, data: bytes) -> bytes:
    return attr(nftcounters.NFTA_LIST_ELEM | N, attr(nftcounters.NFTA_EXPR_NAME, name.encode() + b"\0")
                + attr(nftcounters.NFTA_EXPR_DATA | N, data))


def _counter(packets: int, nbytes: int) -> bytes:
    return _expr("counter", attr(nftcounters.NFTA_COUNTER_BYTES, struct.pack(">Q", nbytes))
                 + attr(nftcounters.NFTA_COUNTER_PACKETS, struct.pack(">Q", packets)) + attr(3, b""))


def _udata(*tlvs: tuple[int, bytes]) -> bytes:
    return b"".join(bytes([t, len(v)]) + v for t, v in tlvs)


def _rule(chain: str, exprs: list[bytes], udata: bytes | None = None, table: str = "stockade") -> bytes:
    """A NFT_MSG_NEWRULE payload as the kernel dumps it: nfgenmsg, table, chain, handle,
    expressions, user data."""
    body = struct.pack("=BBH", 1, 0, 0) + attr(nftcounters.NFTA_RULE_TABLE, table.encode() + b"\0")
    body += attr(nftcounters.NFTA_RULE_CHAIN, chain.encode() + b"\0") + attr(3, struct.pack(">Q", 42))
    body += attr(nftcounters.NFTA_RULE_EXPRESSIONS | N, b"".join(exprs))
    if udata is not None:
        body += attr(nftcounters.NFTA_RULE_USERDATA, udata)
    return body


PAYLOAD = _expr("payload", attr(1, struct.pack(">I", 1)) + attr(2, struct.pack(">I", 12)))
CMP = _expr("cmp", attr(1, struct.pack(">I", 1)) + attr(3, attr(1, b"\x0a\x00\x00\x01")))
VERDICT = _expr("immediate", attr(1, struct.pack(">I", 0)) + attr(2, attr(2, attr(1, struct.pack(">i", -5)))))


def _decode(body: bytes, wanted: frozenset[str] = frozenset({"in_a"})) -> nftcounters.Rule | None:
    return nftcounters.rule(body, 0, len(body), wanted.__contains__)


def test_a_rule_gives_its_chain_first_counter_and_comment() -> None:
    body = _rule("in_a", [PAYLOAD, CMP, _counter(5, 300), _counter(9, 9), VERDICT],
                 _udata((1, b"\x01\x02"), (0, b"r:abc\0")))
    assert _decode(body) == ("in_a", 5, 300, "r:abc")


def test_rules_without_counter_or_of_other_chains_are_passed_over() -> None:
    assert _decode(_rule("in_a", [PAYLOAD, CMP, VERDICT], _udata((0, b"r:x\0")))) is None
    assert _decode(_rule("forward", [_counter(1, 1)], _udata((0, b"r:x\0")))) is None
    assert _decode(_rule("in_a", [_counter(2**64 - 1, 0)])) == ("in_a", 2**64 - 1, 0, "")


@given(chain=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=64),
       comment=st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_categories=("Cs",)), max_size=40),
       packets=st.integers(0, 2**64 - 1), nbytes=st.integers(0, 2**64 - 1),
       before=st.lists(st.sampled_from([PAYLOAD, CMP]), max_size=4), other=st.binary(max_size=20))
def test_any_rule_round_trips(chain: str, comment: str, packets: int, nbytes: int, before: list[bytes],
                              other: bytes) -> None:
    udata = _udata((7, other), (0, comment.encode()[:120] + b"\0"))
    body = _rule(chain, [*before, _counter(packets, nbytes), VERDICT], udata)
    want = comment.encode()[:120].decode("utf-8", "replace")
    assert _decode(body, frozenset({chain})) == (chain, packets, nbytes, want)


def test_an_interrupted_dump_is_read_again_from_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    dumps = iter([[("in_a", 1, 1, "r:a"), None], [("in_a", 2, 2, "r:a"), ("in_a", 3, 3, "r:b")]])

    def rules(family: str, table: str, wanted: object):  # type: ignore[no-untyped-def]
        for r in next(dumps):
            if r is None:
                raise netlink.DumpInterrupted(4, "changed while dumped")
            yield r

    monkeypatch.setattr(nftcounters, "rules", rules)
    got = nftcounters.read("inet", "stockade", lambda c: True, list, list.append)
    assert got == [("in_a", 2, 2, "r:a"), ("in_a", 3, 3, "r:b")]


def test_a_message_marked_interrupted_raises_only_when_asked() -> None:
    msg = netlink.HDR.pack(netlink.HDR.size + 4, 0x0A06, netlink.NLM_F_DUMP_INTR | 2, 1, 0) + b"\0" * 4
    assert [m[0] for m in netlink.messages(msg, "x")] == [0x0A06]
    with pytest.raises(netlink.DumpInterrupted):
        list(netlink.messages(msg, "x", consistent=True))


TABLE = """table inet stockade {
  set s { type ipv4_addr; elements = { 10.0.0.1, 10.0.0.2 }; }
  chain in_a {
    ip saddr @s tcp dport 80 counter packets 5 bytes 300 return comment "r:abc"
    ip6 saddr ::1 counter packets 6 bytes 600 return comment "r:abc"
    meta l4proto udp log prefix "x" counter packets 2 bytes 20 comment "r:été"
    counter packets 7 bytes 420 drop comment "default-deny"
  }
  chain out_a {
    tcp dport 53 accept
    counter packets 18446744073709551615 bytes 1 return
  }
  chain other { counter packets 1 bytes 2 comment "r:zz"; }
}
table ip stockade { chain in_a { counter packets 3 bytes 3 comment "r:ip"; }; }
"""


def test_the_kernel_dump_says_what_nft_lists() -> None:
    with throwaway_netns("ctr") as ns:
        more = "".join(f'add rule inet stockade out_a ip daddr 10.1.{i // 250}.{i % 250} counter '
                       f'packets {i} bytes {i * 7} return comment "r:n{i}"\n' for i in range(300))
        nft_file(ns, TABLE + more)  # 300 more rules: more than one dump datagram
        want = []
        for obj in nft_json(ns, "table", "inet", "stockade"):
            r = obj.get("rule")
            if r and r["chain"] != "other":
                c = next((e["counter"] for e in r["expr"] if "counter" in e), None)
                if c is not None:
                    # nft's JSON prints a u64 above 2**63 signed (-1): the dump reads it unsigned
                    want.append((r["chain"], c["packets"] % 2**64, c["bytes"], r.get("comment", "")))
        with inside(ns):
            got = list(nftcounters.rules("inet", "stockade", lambda c: c != "other"))
            assert list(nftcounters.rules("inet", "absent", lambda c: True)) == []
        assert len(want) == 305 and got == want
