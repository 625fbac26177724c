"""The cold path's faster algorithms equal the ones they replaced (property tests).

Each reference below is the previous implementation, kept here verbatim in substance:
the fast versions must give identical results (values and order), not just equivalent
ones, since the incremental compiler and the renderers compare by value.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.admission import kubernetes as admission
from agent.ir import PeerSet, _prefixes, merge_ranges
from agent.policy.errors import Invalid
from agent.sources.files import MAX_DEPTH, _json_too_deep, _text_depth, _too_deep

# ------------------------------------------------------------------ PeerSet.of


def _old_prefixes(version: int, first: int, last: int) -> list[Any]:
    bits = 32 if version == 4 else 128
    make = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    out = []
    while first <= last:
        size = (first & -first).bit_length() - 1 if first else bits
        while first + (1 << size) - 1 > last:
            size -= 1
        out.append(make((first, bits - size)))
        first += 1 << size
    return out


def _old_of(nets: list[Any]) -> tuple[Any, ...]:
    ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for n in nets:
        if isinstance(n, ipaddress.IPv4Address | ipaddress.IPv6Address):
            a = int(n)
            ranges[n.version].append((a, a))
        else:
            net = n if isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network) else ipaddress.ip_network(n)
            a = int(net.network_address)
            ranges[net.version].append((a, a + net.num_addresses - 1))
    spans = [(version, a, b) for version, rs in ranges.items() for a, b in merge_ranges(rs)]
    return tuple(n for v, a, b in spans for n in _old_prefixes(v, a, b))


class _Address(ipaddress.IPv4Address):
    """A subclass: PeerSet.of's fast path takes exact types only."""


BASE4, BASE6 = 0x0A000000, 0xFD00 << 112
# Dense: few distinct values, so duplicates, neighbours and overlaps are common.
offsets = st.integers(0, 40)
v4_hosts = offsets.map(lambda o: ipaddress.IPv4Address(BASE4 + o))
v6_hosts = offsets.map(lambda o: ipaddress.IPv6Address(BASE6 + o))
sub_hosts = offsets.map(lambda o: _Address(BASE4 + o))
v4_nets = st.builds(lambda o, p: ipaddress.IPv4Network((BASE4 + o, p), strict=False), offsets, st.integers(26, 32))
v6_nets = st.builds(lambda o, p: ipaddress.IPv6Network((BASE6 + o, p), strict=False), offsets, st.integers(122, 128))
text_nets = v4_nets.map(str)  # ipBlock text, as ip_network reads it
edges = st.sampled_from([ipaddress.IPv4Address(0), ipaddress.IPv4Address(2**32 - 1),
                         ipaddress.IPv6Address(0), ipaddress.IPv6Address(2**128 - 1),
                         ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0")])
items = st.one_of(v4_hosts, v6_hosts, sub_hosts, v4_nets, v6_nets, text_nets, edges)


@settings(max_examples=400)
@given(st.lists(items, max_size=40))
def test_peer_set_of_equals_the_previous_algorithm(nets: list[Any]) -> None:
    got = PeerSet.of(nets)
    assert got.nets == _old_of(nets)
    assert [type(n) for n in got.nets] == [type(n) for n in _old_of(nets)]
    assert PeerSet.of(list(reversed(nets))) is got  # the same set: the remembered object


@given(st.lists(st.integers(0, 2**32 - 1), max_size=30))
def test_peer_set_of_random_v4_hosts(addrs: list[int]) -> None:
    nets = [ipaddress.IPv4Address(a) for a in addrs]
    assert PeerSet.of(nets).nets == _old_of(nets)


@given(st.sampled_from([4, 6]), st.integers(0, 2**32 - 1), st.integers(0, 2**20))
def test_prefixes_equal_the_previous_loop(version: int, first: int, length: int) -> None:
    first = min(first, 2**32 - 1 - length)  # inside the address space
    if version == 6:
        first <<= 96
    assert _prefixes(version, first, first + length) == _old_prefixes(version, first, first + length)


# ------------------------------------------------------------------ JSON depth

json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.sampled_from('[]{}"\\/ab\n\t\u00e9\U0001f600'), max_size=8),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(alphabet='[]{}"\\ab', max_size=4), inner, max_size=4)),
    max_leaves=40,
)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@settings(max_examples=400)
@given(json_values, st.booleans(), st.sampled_from([None, 0, 2]))
def test_text_depth_is_the_depth_of_the_value(value: Any, ascii_only: bool, indent: int | None) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    assert _text_depth(text) == _depth(value)
    assert _json_too_deep(text, json.loads(text)) == _too_deep(json.loads(text))


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 5 * MAX_DEPTH])
def test_json_too_deep_at_the_bound(depth: int) -> None:
    for text in ("[" * depth + "]" * depth, '{"a": ' * depth + "1" + "}" * depth,
                 '["\\\\", "[[[\\"", ' + "[" * depth + "]" * depth + "]"):
        doc = json.loads(text)
        assert _json_too_deep(text, doc) == _too_deep(doc)


def test_a_deep_value_dropped_by_a_repeated_key_is_not_too_deep() -> None:
    deep = "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5)
    text = f'{{"a": {deep}, "a": 1}}'
    assert _text_depth(text) > MAX_DEPTH
    assert not _json_too_deep(text, json.loads(text))  # as the value walk says


# ------------------------------------------------------------------ addresses


def _reference_ip(text: Any) -> Any:
    try:
        if not isinstance(text, str):
            raise ValueError
        return ipaddress.ip_address(text)
    except ValueError:
        return None


address_texts = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda a: str(ipaddress.IPv4Address(a))),
    st.integers(0, 2**128 - 1).map(lambda a: str(ipaddress.IPv6Address(a))),
    st.text(alphabet="0123456789.:abcdef%/ ", max_size=20),
    st.sampled_from(["01.2.3.4", "1.2.3.4 ", "::ffff:1.2.3.4", "fe80::1%eth0", "", "256.0.0.1"]),
    st.integers(), st.none(),
)


@settings(max_examples=300)
@given(st.lists(address_texts, max_size=5))
def test_cached_address_parse_equals_ipaddress(texts: list[Any]) -> None:
    for text in texts + texts:  # twice: the second read comes from the cache
        want = _reference_ip(text)
        if want is None:
            with pytest.raises(Invalid) as e:
                admission._ip(text, "status.podIP")
            assert e.value.field == "status.podIP"
        else:
            got = admission._ip(text, "status.podIP")
            assert got == want and type(got) is type(want) and str(got) == str(want)


# ------------------------------------------------------------------ object size bound

floats_as_text = st.sampled_from(["1e5", "1E9", "1e15", "-1e15", "9e15", "1e16", "1e-7", "1e400", "-1e400",
                                  "1.0", "0.1", "1.2345678901234567e-300", "5E-324", "1e308"])
raw_texts = st.text(alphabet=st.sampled_from('ab"\\/\n\x7f\u00e9\u4e2d\U0001f600'), max_size=6)


@st.composite
def json_texts(draw: st.DrawFn) -> str:
    """JSON text written the way a hand (not json.dumps) might: short floats, raw
    non-ASCII, no spaces, typed Lists whose items lack a kind."""
    def value(depth: int) -> str:
        choice = draw(st.integers(0, 5 if depth < 3 else 2))
        if choice == 0:
            return draw(floats_as_text)
        if choice == 1:
            return json.dumps(draw(raw_texts), ensure_ascii=False)
        if choice == 2:
            return draw(st.sampled_from(["0", "-0", "1", "true", "null"]))
        if choice == 3:
            return "[" + ",".join(value(depth + 1) for _ in range(draw(st.integers(0, 3)))) + "]"
        if choice == 4:
            items = ",".join("{}" if draw(st.booleans()) else '{"a":' + value(depth + 1) + "}"
                             for _ in range(draw(st.integers(0, 3))))
            return '{"kind":"' + draw(st.sampled_from(["List", "PList", "PodList"])) + '","items":[' + items + "]}"
        keys = draw(st.lists(raw_texts, max_size=3))
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + value(depth + 1) for k in keys) + "}"
    return value(0)


@settings(max_examples=500)
@given(json_texts())
def test_compact_json_grows_at_most_json_growth_times_its_text(text: str) -> None:
    from agent.sources.files import JSON_GROWTH
    from agent.sources.kubeobjects import expand

    doc = json.loads(text)
    for body in [doc, *expand(doc)]:
        assert len(json.dumps(body, separators=(",", ":"))) <= JSON_GROWTH * len(text)


def test_an_oversize_json_object_is_still_refused(tmp_path: Any) -> None:
    from agent.sources.files import DirectorySource

    pod = {"kind": "Pod", "metadata": {"name": "p", "namespace": "n", "labels": {"a": "\U0001f600" * 100}}}
    (tmp_path / "p.json").write_text(json.dumps(pod, ensure_ascii=False))
    objects, problems = DirectorySource(tmp_path, settle=0, max_object_bytes=1000).read()
    assert objects == [] and "over the 1000-byte limit" in problems[0].message
    objects, problems = DirectorySource(tmp_path, settle=0, max_object_bytes=1300).read()
    assert [o.ref.name for o in objects] == ["p"] and problems == []


# ------------------------------------------------------------------ container ports, labels


def _old_container_ports(spec: Any, issues: list[Invalid]) -> tuple[Any, ...]:
    from collections.abc import Mapping

    from agent.inventory import ContainerPort
    from agent.policy.errors import valid_port_name
    from agent.policy.kubernetes import API_PROTOCOLS

    out = []
    containers = spec.get("containers")
    if containers is None:
        containers = []
    if not isinstance(containers, list):
        issues.append(Invalid("spec.containers", "must be a list"))
        return ()
    for i, c in enumerate(containers):
        ports = c.get("ports") if isinstance(c, Mapping) else None
        if ports is None:
            continue
        if not isinstance(ports, list):
            issues.append(Invalid(f"spec.containers[{i}].ports", "must be a list"))
            continue
        for j, p in enumerate(ports):
            field = f"spec.containers[{i}].ports[{j}]"
            if not isinstance(p, Mapping):
                issues.append(Invalid(field, "must be an object"))
                continue
            num = p.get("containerPort")
            if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= 65535:
                issues.append(Invalid(f"{field}.containerPort", f"invalid port {num!r}"))
                continue
            proto = p.get("protocol")
            if proto is None:
                proto = "TCP"
            if not isinstance(proto, str) or proto not in API_PROTOCOLS:
                issues.append(Invalid(f"{field}.protocol", f"must be TCP, UDP or SCTP, got {proto!r}"))
                continue
            name = p.get("name")
            if name is not None and not valid_port_name(name):
                issues.append(Invalid(f"{field}.name", f"invalid port name {name!r}"))
                continue
            out.append(ContainerPort(num, proto, name or None))
    return tuple(out)


ports = st.fixed_dictionaries({}, optional={
    "containerPort": st.sampled_from([80, 8080, 0, 70000, True, "80", None, 80.0]),
    "protocol": st.sampled_from(["TCP", "UDP", "SCTP", "tcp", None, 1]),
    "name": st.sampled_from(["http", "", "Http", "metrics", "-x", None, 5]),
})
containers = st.lists(st.one_of(st.fixed_dictionaries({"ports": st.one_of(st.lists(st.one_of(ports, st.just(1)),
                                                                                      max_size=4), st.just("x"))}),
                                st.just({}), st.just("c")), max_size=3)


@settings(max_examples=300)
@given(st.one_of(containers, st.just("x"), st.none()))
def test_container_ports_equal_the_previous_parse(cs: Any) -> None:
    spec = {} if cs is None else {"containers": cs}
    for _ in range(2):  # the second time from the remembered ports
        want_issues: list[Invalid] = []
        got_issues: list[Invalid] = []
        assert admission._container_ports(spec, got_issues) == _old_container_ports(spec, want_issues)
        assert [(i.field, i.message) for i in got_issues] == [(i.field, i.message) for i in want_issues]


class _Str(str):
    """A str subclass: never taken from the remembered labels."""


label_parts = st.sampled_from(["app", "a/b", "example.com/x", "-bad", "", "v1", "x" * 64, "ok_1", 5, None])


@settings(max_examples=300)
@given(st.dictionaries(st.one_of(label_parts.filter(lambda k: isinstance(k, str)), st.just(_Str("app"))),
                       st.one_of(label_parts, st.just(_Str("v1"))), max_size=4))
def test_labels_equal_validation_each_time(labels: dict[Any, Any]) -> None:
    from agent.policy.selectors import parse_labels, valid_key, valid_value

    want = {k: v for k, v in labels.items() if valid_key(k) and valid_value(v)}
    for _ in range(2):
        issues: list[Invalid] = []
        out, ok = parse_labels(labels, "metadata.labels", issues)
        assert out == want and ok == (len(want) == len(labels)) and len(issues) == len(labels) - len(want)
