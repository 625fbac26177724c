"""Element-only diffs as raw nfnetlink batches (nftables.diff / NftablesDataplane.apply):
a diff that only adds and deletes elements of hash sets both models hold goes to the
kernel as ONE nfnetlink batch, anything else as libnftables text, and the two leave the
same table. Checked as data (which diffs qualify) and in throwaway network namespaces
(the same random event sequences applied by the dataplane and by `nft -f` of the text;
a refused batch; a batch too big for one send; libnftables after raw changes)."""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.dataplane import nfnetlink
from agent.dataplane.base import DataplaneError
from agent.dataplane.nftables import (
    FAMILY,
    HOSTS,
    TABLE,
    Model,
    NftablesDataplane,
    build_model,
    diff,
    render_diff,
    render_full,
)
from agent.ir import Program
from tests.kit.builders import ns, pod, policy, snapshot_of
from tests.kit.netns import inside
from tests.kit.nftns import nft_file, nft_json, table_objects, throwaway_netns

# Node n1 holds web1 and web2; clients live on n2 (remote: only their addresses matter
# here, in the peer sets of the policies selecting them).
WEB1 = pod("a/web1", "10.1.0.1", {"app": "web1"}, nodeName="n1")
WEB2 = pod("a/web2", "10.1.0.2", {"app": "web2"}, nodeName="n1")
LABELS = ({"role": "client"}, {"tier": "front"}, {"role": "client", "tier": "front"}, {"app": "other"})


def _policy(name: str, app: str, peers: list[dict]) -> dict:
    return policy(f"a/{name}", {"podSelector": {"matchLabels": {"app": app}}, "ingress": [{
        "from": peers, "ports": [{"port": 80}]}]})


POLICIES = [
    _policy("p1", "web1", [{"podSelector": {"matchLabels": {"role": "client"}}}]),
    _policy("p2", "web2", [{"podSelector": {"matchLabels": {"tier": "front"}}}]),
    # pods and a wider prefix: the rule has an interval set too (never sent raw)
    _policy("p3", "web2", [{"podSelector": {"matchLabels": {"role": "client"}}},
                           {"ipBlock": {"cidr": "192.0.2.0/28"}}]),
]


def _ip(i: int) -> str:
    """Client i's address: apart from the others (peer sets merge adjacent addresses into a
    prefix, which goes to an interval set), but for c11 and c12, which are adjacent."""
    return f"10.1.1.{2 * i if i < 12 else 2 * i - 1}"


def _client(i: int, labels: dict[str, str]) -> dict:
    ips = [_ip(i), f"fd00::1:{i:x}"] if i % 3 == 0 else _ip(i)
    return pod(f"a/c{i}", ips, labels, nodeName="n2")


def _program(clients: dict[int, int], locals_: int = 0, wide: bool = False) -> Program:
    pods = [_client(i, LABELS[lab]) for i, lab in sorted(clients.items())]
    pods += [pod(f"a/l{i}", f"10.1.2.{i}", {"app": "web1"}, nodeName="n1") for i in range(locals_)]
    pols = POLICIES if not wide else [*POLICIES[:2], _policy("p3", "web2", [
        {"podSelector": {"matchLabels": {"role": "client"}}}, {"ipBlock": {"cidr": "192.0.2.0/27"}}])]
    return snapshot_of([ns("a"), WEB1, WEB2, *pods, *pols], node="n1").program


ELEMENT_LINE = re.compile(r"^(add|delete) element inet stockade (\S+) \{ ")


def _element_only(text: str, old: Model, new: Model) -> bool:
    """The reference: every command of the text adds or deletes elements of a hash set
    both models hold."""
    for line in text.splitlines():
        m = ELEMENT_LINE.match(line)
        if m is None:
            return False
        name = m[2]
        if name not in old.sets or name not in new.sets or new.sets[name][0] not in HOSTS.values():
            return False
    return True


# One event: (kind, client index, label index).
EVENT = st.tuples(st.sampled_from(("relabel", "relabel", "add", "remove", "local", "wide")),
                  st.integers(1, 12), st.integers(0, len(LABELS) - 1))


class Scene:
    def __init__(self) -> None:
        self.clients = {1: 0, 2: 1, 3: 2, 4: 3}
        self.locals, self.wide = 0, False

    def event(self, kind: str, i: int, lab: int) -> None:
        if kind in ("relabel", "add"):
            self.clients[i] = lab
        elif kind == "remove":
            self.clients.pop(i, None)
        elif kind == "local":  # a local pod: chains and map entries, i.e. libnftables text
            self.locals = (self.locals + 1) % 3
        else:  # a wider prefix: interval-set elements, i.e. libnftables text
            self.wide = not self.wide

    def program(self) -> Program:
        return _program(self.clients, self.locals, self.wide)


@settings(max_examples=60, deadline=None)
@given(st.lists(EVENT, min_size=1, max_size=8))
def test_a_diff_is_sent_raw_exactly_when_it_only_changes_held_hash_set_elements(evs: list) -> None:
    scene = Scene()
    old = build_model(scene.program())
    for ev in evs:
        scene.event(*ev)
        new = build_model(scene.program(), prev=old)
        d = diff(old, new)
        assert (d.text, d.stats) == render_diff(old, new)
        assert (d.elements is not None) == _element_only(d.text, old, new), d.text
        if d.elements is not None:
            for name, fam, gone, fresh in d.elements:
                assert new.sets[name][0] == HOSTS[fam]
                assert gone == old.sets[name][1] - new.sets[name][1] and gone | fresh
                assert fresh == new.sets[name][1] - old.sets[name][1]
            changed = {n for n in new.sets if new.sets[n][1] != old.sets[n][1]}
            assert changed == {n for n, *_ in d.elements}
        old = new


def test_a_remote_pods_label_change_is_element_only_and_a_local_pod_is_not() -> None:
    old = build_model(_program({1: 0, 2: 1}))
    d = diff(old, build_model(_program({1: 1, 2: 1}), prev=old))  # c1 role=client -> tier=front
    assert d.elements and d.text and d.stats.elements_added and d.stats.elements_removed
    assert diff(old, build_model(_program({1: 0, 2: 1}, locals_=1), prev=old)).elements is None
    assert diff(old, build_model(_program({1: 0, 2: 1}, wide=True), prev=old)).elements is None
    same = diff(old, build_model(_program({1: 0, 2: 1}), prev=old))
    assert same.text == "" and same.elements == ()


@pytest.fixture(scope="module")
def two() -> Iterator[tuple[str, str]]:
    with throwaway_netns("rawA") as a, throwaway_netns("rawB") as b:
        yield a, b


def _reset(*names: str) -> None:
    for n in names:
        nft_file(n, f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")


class Spy:
    """Counts the raw batches a dataplane sends."""

    def __init__(self, dp: NftablesDataplane) -> None:
        self.batches = 0
        send = dp._elements.transaction

        def counted(ops: list) -> None:
            send(ops)
            self.batches += 1

        dp._elements.transaction = counted  # type: ignore[method-assign]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(EVENT, min_size=1, max_size=10))
def test_raw_batches_and_libnftables_text_leave_the_same_table(two: tuple[str, str], evs: list) -> None:
    """The dataplane (raw batches where the diff allows, text otherwise, on one libnftables
    context) in one namespace, `nft -f` of every diff's text in the other: after every
    event the two tables are the same, and the same as a fresh load of the model."""
    raw, text = two
    _reset(raw, text)
    scene = Scene()
    with inside(raw):
        dp = NftablesDataplane()
        spy = Spy(dp)
        dp.apply(scene.program())
    assert dp._model is not None
    nft_file(text, render_full(dp._model))
    expected_raw = 0
    for ev in evs:
        scene.event(*ev)
        prev = dp._model
        with inside(raw):
            dp.apply(scene.program())
        d = diff(prev, dp._model)
        expected_raw += bool(d.elements)
        if d.text:
            nft_file(text, d.text)
        assert table_objects(raw, FAMILY, TABLE) == table_objects(text, FAMILY, TABLE), ev
    assert spy.batches == expected_raw
    with throwaway_netns("rawF") as fresh:
        nft_file(fresh, render_full(dp._model))
        assert table_objects(raw, FAMILY, TABLE) == table_objects(fresh, FAMILY, TABLE)


def _elements(netns: str, name: str) -> set[str]:
    return {e for o in nft_json(netns, "set", FAMILY, TABLE, name) for e in o.get("set", {}).get("elem", [])}


def _set_of(m: Model, address: str) -> str:
    return next(n for n, (_, elems) in sorted(m.sets.items()) if address in elems and n.startswith("p_"))


def test_libnftables_after_raw_changes_sees_the_kernel_not_a_stale_cache(two: tuple[str, str]) -> None:
    """An element added raw, then deleted by libnftables text on the context that loaded
    the table (a stale cache would not know it), and the other way round."""
    ns_, _ = two
    _reset(ns_)
    with inside(ns_):
        dp = NftablesDataplane()
        spy = Spy(dp)
        dp.apply(_program({1: 0}))
        dp.apply(_program({1: 0, 5: 0}))  # c5 joins role=client: raw
        assert spy.batches == 1
        s = _set_of(dp._model, _ip(5))
        assert _ip(5) in _elements(ns_, s)
        dp.apply(_program({1: 0}, locals_=1))  # c5 goes with a local pod: text deletes it
        assert spy.batches == 1 and _ip(5) not in _elements(ns_, s)
        dp.apply(_program({1: 0, 6: 0}, locals_=2))  # text adds c6
        dp.apply(_program({1: 0}, locals_=2))  # raw deletes it
        assert spy.batches == 2 and _ip(6) not in _elements(ns_, s)
        dp.apply(_program({1: 0}))  # text again, after raw
        with throwaway_netns("rawG") as fresh:
            nft_file(fresh, render_full(dp._model))
            assert table_objects(ns_, FAMILY, TABLE) == table_objects(fresh, FAMILY, TABLE)


def test_a_refused_batch_raises_commits_nothing_and_keeps_the_model(two: tuple[str, str]) -> None:
    """The diff deletes an element the kernel no longer holds (removed behind the agent's
    back) and adds another: the kernel refuses the whole batch, the dataplane raises
    DataplaneError naming the set, nothing changed, and the model is the previous one."""
    ns_, _ = two
    _reset(ns_)
    with inside(ns_):
        dp = NftablesDataplane()
        dp.apply(_program({1: 0, 2: 0}))
        before = dp._model
        assert before is not None
        s = _set_of(before, _ip(2))
        nft_file(ns_, f"delete element {FAMILY} {TABLE} {s} {{ {_ip(2)} }}\n")
        kept = table_objects(ns_, FAMILY, TABLE)
        with pytest.raises(DataplaneError, match=s):
            dp.apply(_program({1: 0, 3: 0}))  # c2 goes (absent: refused), c3 comes
        assert dp._model is before
        assert table_objects(ns_, FAMILY, TABLE) == kept and _ip(3) not in _elements(ns_, s)
        nft_file(ns_, f"add element {FAMILY} {TABLE} {s} {{ {_ip(2)} }}\n")
        dp.apply(_program({1: 0, 3: 0}))  # the kernel agrees with the model again
        assert _elements(ns_, s) == {_ip(1), _ip(3)}


def test_a_batch_too_big_for_one_send_goes_as_text(two: tuple[str, str]) -> None:
    ns_, _ = two
    _reset(ns_)
    with inside(ns_):
        dp = NftablesDataplane()
        spy = Spy(dp)
        dp.apply(_program({1: 0}))
        dp.apply(_program({1: 0, 2: 0}))  # raw: opens the socket
        assert spy.batches == 1
        dp._elements._room = 64  # as if the send buffer were tiny
        with pytest.raises(nfnetlink.TooLarge):
            dp._elements.transaction([(nfnetlink.NFT_MSG_NEWSETELEM, "x", nfnetlink.element(bytes(4)))])
        dp.apply(_program({1: 0, 2: 0, 3: 0}))
        s = _set_of(dp._model, _ip(3))
        assert _elements(ns_, s) == {_ip(1), _ip(2), _ip(3)}


def test_an_unchanged_model_sends_nothing(two: tuple[str, str]) -> None:
    ns_, _ = two
    _reset(ns_)
    with inside(ns_):
        dp = NftablesDataplane()
        spy = Spy(dp)
        dp.apply(_program({1: 0}))
        stats = dp.apply(_program({1: 0}))
        assert spy.batches == 0 and stats.commands == 0


def test_message_split_keeps_attribute_lengths_in_16_bits() -> None:
    """Thousands of elements of one set: several messages, none with an attribute over
    64 KiB (an attribute's length is 16 bits)."""
    sets = nfnetlink.SetElements(FAMILY, TABLE)
    sent: list[bytes] = []

    class Sock:
        def send(self, data: bytes) -> None:
            sent.append(data)

    sets._sock, sets._room = Sock(), 1 << 30  # type: ignore[assignment]
    sets._wait = lambda sock, acks: None  # type: ignore[method-assign,assignment]
    ops = [(nfnetlink.NFT_MSG_NEWSETELEM, "p_x_6", nfnetlink.element(bytes(16))) for _ in range(20_000)]
    sets.transaction(ops)
    (data,) = sent
    off, sizes = 0, []
    while off < len(data):
        n = struct.unpack_from("=I", data, off)[0]
        sizes.append(n)
        off += n
    assert len(sizes) > 3 and max(sizes) < 1 << 16 and sum(sizes) == len(data)


def test_equal_set_contents_in_other_objects_diff_to_nothing() -> None:
    m = build_model(_program({1: 0, 2: 1}))
    copy = dataclasses.replace(m, sets={n: (t, frozenset(set(e))) for n, (t, e) in m.sets.items()})
    d = diff(m, copy)
    assert d.text == "" and d.elements == ()
