"""The pure compiler: one endpoint direction of the IR -> the contents of its `peers` and
`ports` maps (peer classes, first-match port prefixes), independent of endpoint ids,
generations and counters; `entries`, those contents as map items for one endpoint id
and generation; and `render`, the text form `stockade compile` prints. No
kernel, no I/O. The construction is described in docs/ebpf.md."""

from __future__ import annotations

import ipaddress
import itertools
import struct
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat
from operator import and_, rshift

from agent.dataplane.ebpf.layout import (
    DIR_EGRESS,
    DIR_INGRESS,
    F_ENFORCED,
    F_ISOLATED,
    F_LEARNED,
    LEARN_STAGES,
    P_ICMP,
    P_OTHER,
    P_SCTP,
    P_TCP,
    P_UDP,
    V_ACCEPT,
    V_DROP,
    k_port,
    v_port,
)
from agent.dataplane.escape import display
from agent.ir import PORTED, Direction, DirectionProgram, IPAddress, PeerSet, Program, Rule, Verdict, first_match

DIR_CODE = {Direction.INGRESS: DIR_INGRESS, Direction.EGRESS: DIR_EGRESS}
V_CODE = {Verdict.ACCEPT: V_ACCEPT, Verdict.DROP: V_DROP}
V_NAME = {V_ACCEPT: "accept", V_DROP: "drop"}
PROTO = {"tcp": P_TCP, "udp": P_UDP, "sctp": P_SCTP, "icmp": P_ICMP}  # the IR's protocols -> codes in port keys
PROTO_NAME = {v: k for k, v in PROTO.items()} | {P_OTHER: "other"}
ALL_PROTOS = (*PROTO.values(), P_OTHER)


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """[first, last] as aligned (port, prefix length) blocks, at most 30 of them."""
    out = []
    a = first
    while a <= last:
        size = a & -a if a else 1 << 16
        while a + size - 1 > last:
            size >>= 1
        out.append((a, 16 - size.bit_length() + 1))
        a += size
    return out


def _rule_matches(rule: Rule, proto: int, port: int | None) -> bool:
    if not rule.ports:
        return True
    if proto == P_OTHER:
        return False
    return any(pm.matches(PROTO_NAME[proto], port) for pm in rule.ports)


PortEntries = dict[tuple[int, int, int, int], tuple[int, int]]
"""(proto, has_port, port, port prefix length) -> (verdict code, rule index)."""


def _class_ports(rules: tuple[Rule, ...], members: tuple[int, ...], isolated: bool) -> PortEntries:
    """The deciding rule per protocol and port interval for peers in one class: the tiered
    first match of `ir.first_match` over the rules holding those peers. No entry: the
    default (drop when isolated), which the program reads from the endpoint's flags."""
    out: PortEntries = {}

    def who(proto: int, port: int | None) -> int | None:
        return first_match(rules, isolated, lambda i: _rule_matches(rules[i], proto, port), members)[0]

    for proto in ALL_PROTOS:
        # no port known: first rule matching every port of the protocol
        if (i := who(proto, None)) is not None:
            out[(proto, 0, 0, 16)] = (V_CODE[rules[i].effect], i)
        if proto not in (PROTO[p] for p in PORTED):
            continue
        cuts = {0, 65536}
        for i in members:
            for pm in rules[i].ports:
                if pm.protocol == PROTO_NAME[proto] and pm.first is not None and pm.last is not None:
                    cuts |= {pm.first, pm.last + 1}
        edges = sorted(cuts)
        segs: list[tuple[int, int, int | None]] = []
        for a, b in itertools.pairwise(edges):
            decider = who(proto, a)
            if segs and segs[-1][2] == decider:
                segs[-1] = (segs[-1][0], b, decider)
            else:
                segs.append((a, b, decider))
        for a, b, decider in segs:
            if decider is None:
                continue
            for port, plen in port_prefixes(a, b - 1):
                out[(proto, 1, port, plen)] = (V_CODE[rules[decider].effect], decider)
    return out


# A peer prefix as `DirTables` keeps it: the fields of its `peers` key that do not depend
# on the endpoint (prefixlen as the key counts it, address, big-endian as the key holds
# it) and its class. Packed, as the map holds them: at 10k pods the local endpoints'
# tables hold ~200k prefixes, ~70 bytes each as Python tuples of ints, 12 (IPv4) or 24
# (IPv6) here. `_PEER_KEY` and `_U32` make the bytes `layout.k_peer` and `layout.u32`
# make (tests/unit/test_ebpf_tables.py checks).
_PEER4 = struct.Struct("<I4sI")
_PEER6 = struct.Struct("<I16sI")
_PEER_KEY = struct.Struct("<IIIBB16s")
_U32 = struct.Struct("=I")
PEER_KEY_BITS = 80  # the key bits before the address (layout.PeerKey)
_BITS: int = PEER_KEY_BITS
_BITS0 = struct.pack("<I", PEER_KEY_BITS)  # a record's prefixlen field when the prefix is /0


def pack_peers(peers: Iterable[tuple[int, int, int, int]]) -> tuple[bytes, bytes]:
    """(family, address int, prefixlen, class) items -> (IPv4 records, IPv6 records)."""
    v4, v6 = bytearray(), bytearray()
    for fam, addr, plen, cls in peers:
        if fam == 4:
            v4 += _PEER4.pack(PEER_KEY_BITS + plen, addr.to_bytes(4, "big"), cls)
        else:
            v6 += _PEER6.pack(PEER_KEY_BITS + plen, addr.to_bytes(16, "big"), cls)
    return bytes(v4), bytes(v6)


@dataclass(frozen=True, eq=False)
class DirTables:
    """One endpoint direction's map contents, independent of endpoint ids, halves,
    generations and rule counters. Equal tables are usually one object: the reconciler
    compiles each distinct direction program once per apply."""

    flags: int
    peers4: bytes = b""  # _PEER4 records, in ascending (address, prefixlen)
    peers6: bytes = b""  # _PEER6 records, likewise
    ports: tuple[tuple[int, PortEntries], ...] = ()  # (class, entries)
    rule_ids: tuple[str, ...] = ()
    members: tuple[tuple[int, ...], ...] = ()  # class n's rule indices at [n - 1] (learned classes reuse them)

    def __hash__(self) -> int:
        return hash((self.flags, self.peers4, self.peers6, self.rule_ids))

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return isinstance(other, DirTables) and (
            self.flags, self.peers4, self.peers6, self.ports, self.rule_ids, self.members
        ) == (other.flags, other.peers4, other.peers6, other.ports, other.rule_ids, other.members)

    @property
    def peers(self) -> tuple[tuple[int, int, int, int], ...]:
        """The `peers` contents as (family, address int, prefixlen, class), IPv4 first."""
        return tuple((fam, int.from_bytes(addr, "big"), pfx - PEER_KEY_BITS, cls)
                     for fam, st, blob in ((4, _PEER4, self.peers4), (6, _PEER6, self.peers6))
                     for pfx, addr, cls in st.iter_unpack(blob))

    @property
    def entries(self) -> tuple[int, int]:
        return (len(self.peers4) // _PEER4.size + len(self.peers6) // _PEER6.size,
                sum(len(e) for _, e in self.ports))

    def peer_items(self, ep_id: int, gen: int, dc: int) -> list[tuple[bytes, bytes]]:
        """The `peers` items of this direction (code `dc`) of endpoint `ep_id` at `gen`."""
        keys, values = self.peer_blob(ep_id, gen, dc)
        ks = _PEER_KEY.size
        return [(keys[i * ks:(i + 1) * ks], values[i * 4:(i + 1) * 4]) for i in range(len(values) // 4)]

    def peer_keys(self, ep_id: int, gen: int, dc: int) -> list[bytes]:
        keys, ks = self.peer_blob(ep_id, gen, dc)[0], _PEER_KEY.size
        return [keys[i:i + ks] for i in range(0, len(keys), ks)]

    def peer_blob(self, ep_id: int, gen: int, dc: int, trie: bool = False) -> tuple[bytes, bytes]:
        """`peer_items` as (keys, values) laid end to end, as a batch update takes them: made
        by strided copies from the packed records, with no object per entry. `trie`: in the
        order the kernel's LPM trie lists them where that is cheap to know (a prefix after
        those inside it: the /0 of a rule matching anyone moved last in its family)."""
        keys, values = bytearray(), bytearray()
        for fam, st, blob in ((4, _PEER4, self.peers4), (6, _PEER6, self.peers6)):
            n, rs, alen = len(blob) // st.size, st.size, st.size - 8
            if not n:
                continue
            if trie and n > 1 and blob[:4] == _BITS0:
                blob = blob[rs:] + blob[:rs]
            k = bytearray(_PEER_KEY.pack(0, ep_id, gen, dc, fam, b"") * n)
            ks = _PEER_KEY.size
            for j in range(4):  # prefixlen, then the address (both as the records hold them)
                k[j::ks] = blob[j::rs]
            for j in range(alen):
                k[14 + j::ks] = blob[4 + j::rs]
            v = bytearray(4 * n)
            for j in range(4):  # the class: `<I` in the record, native in the value
                v[j::4] = blob[rs - 4 + (j if sys.byteorder == "little" else 3 - j)::rs]
            keys += k
            values += v
        return bytes(keys), bytes(values)


# A prefix as one int, `address << 8 | prefixlen`: ints sort as (address, prefixlen) do,
# and whole peer sets of them intersect in C (`_split`) rather than a prefix at a time.
PeerKeys = dict[int, frozenset[int]]  # family -> the prefixes of one PeerSet as such ints
KeyCache = dict[int, tuple[PeerSet, PeerKeys, dict[int, frozenset[int]]]]
"""id(PeerSet) -> (that PeerSet, its prefixes as ints per family, its prefix lengths per
family). The PeerSet is held so its id is not reused while cached."""


def _peer_keys(ps: PeerSet, cache: KeyCache) -> tuple[PeerKeys, dict[int, frozenset[int]]]:
    hit = cache.get(id(ps))
    if hit is None or hit[0] is not ps:
        keys: dict[int, list[int]] = {4: [], 6: []}
        for n in ps.nets:
            keys[n.version].append(int(n.network_address) << 8 | n.prefixlen)
        hit = cache[id(ps)] = (ps, {f: frozenset(k) for f, k in keys.items()},
                               {f: frozenset(k & 255 for k in ks) for f, ks in keys.items()})
    return hit[1], hit[2]


def _split(held: list[tuple[int, frozenset[int]]], anyone: tuple[int, ...]) -> list[tuple[tuple[int, ...], set[int]]]:
    """The prefixes of one family where no held prefix lies inside another (one prefix
    length), partitioned by their class members: the rules holding them (`held`: (rule
    index, its prefixes) in rule order) plus `anyone`, and with `anyone` the prefix /0.
    Each rule splits the parts it meets; the cost is the rules' prefixes, in C."""
    every: set[int] = set().union(*(k for _, k in held))
    if anyone:
        every.add(0)
    parts: list[tuple[tuple[int, ...], set[int]]] = [((), every)] if every else []
    for i, keys in held:
        grown = []
        for members, part in parts:
            inside = part & keys
            if inside:
                part -= inside  # iterates `inside`, not `part`
                grown.append(((*members, i), inside))
        parts = [p for p in parts if p[1]] + grown
    return [(tuple(sorted({*members, *anyone})), part) for members, part in parts]


def _pack_sorted(fam: int, cls_of: dict[int, int]) -> bytes:
    """`pack_peers` records of prefixes as ints (-> class), in ascending (address, prefixlen):
    u32 columns interleaved, so no Python object per record (a cold start at 50k pods
    packs ~950k of them)."""
    keys = sorted(cls_of)
    if array("I").itemsize != 4:  # (every Linux ABI has a 4-byte int; kept honest anyway)
        return pack_peers((fam, k >> 8, k & 255, cls_of[k]) for k in keys)[fam == 6]
    n = len(keys)
    plens = array("I", map(_BITS.__add__, map(and_, keys, repeat(255))))
    cls = array("I", map(cls_of.__getitem__, keys))
    # the address's u32 words, most significant first, each stored big-endian
    words = [array("I", map(and_, map(rshift, keys, repeat(8 + shift)), repeat(0xFFFFFFFF)))
             for shift in ((0,) if fam == 4 else (96, 64, 32, 0))]
    for w in words if sys.byteorder == "little" else (plens, cls):
        w.byteswap()
    step = 2 + len(words)
    out = array("I", bytes(4 * step * n))
    out[0::step], out[step - 1::step] = plens, cls
    for j, w in enumerate(words, start=1):
        out[j::step] = w
    return out.tobytes()


def compile_direction(dp: DirectionProgram, cache: KeyCache | None = None) -> DirTables:
    """`cache`: peer sets' prefixes as ints, shared by the directions of one compile."""
    flags = (F_ENFORCED if dp.enforced else 0) | (F_ISOLATED if dp.isolated else 0)
    rules = dp.rules
    if dp.enforced and any(r.learned for r in rules):
        flags |= F_LEARNED  # the program consults `learned` (egress; nothing else pays for it)
    if not dp.enforced or not rules:
        return DirTables(flags, rule_ids=tuple(r.id for r in rules))
    cache = {} if cache is None else cache
    # a domainNames rule's peers are its learned destinations, in `learned` (its `peers`
    # ignored, as `Dataplane.learns_in_kernel` says): no prefix of its own
    anyone = tuple(i for i, r in enumerate(rules) if r.peers is None and not r.learned)
    held = [(i, _peer_keys(r.peers, cache)) for i, r in enumerate(rules) if r.peers is not None and not r.learned]
    classes: dict[tuple[int, ...], int] = {}
    packed = []
    for fam, width in ((4, 32), (6, 128)):
        lens = set().union(*(ln[fam] for _, (_, ln) in held))
        if len(lens) <= 1:  # no prefix inside another (but /0 for `anyone`): by whole sets
            cls_of: dict[int, int] = {}
            parts = _split([(i, k[fam]) for i, (k, _) in held if k[fam]], anyone)
            for members, part in sorted(parts, key=lambda p: min(p[1])):  # classes numbered in prefix order
                cls_of.update(dict.fromkeys(part, classes.setdefault(members, len(classes) + 1)))
            packed.append(_pack_sorted(fam, cls_of))
            continue
        holders: dict[int, set[int]] = {}
        for i, (k, _) in held:
            for key in k[fam]:
                holders.setdefault(key, set()).add(i)
        prefixes = set(holders)
        if anyone:
            prefixes.add(0)
        # only the prefix lengths some rule holds can be ancestors (usually one or two, not 33)
        masks = [(ln, (((1 << ln) - 1) << (width - ln) if ln else 0) << 8) for ln in sorted(lens)]
        peers = []
        for key in sorted(prefixes):
            plen = key & 255
            members = set(anyone)
            for ln, mask in masks:  # every ancestor (or the prefix itself) that a rule holds
                if ln > plen:
                    break
                if (hit := holders.get(key & mask | ln)) is not None:
                    members |= hit
            cls = classes.setdefault(tuple(sorted(members)), len(classes) + 1)
            peers.append((fam, key >> 8, plen, cls))
        packed.append(pack_peers(peers)[fam == 6])
    ports = tuple((cls, _class_ports(rules, members, dp.isolated)) for members, cls in classes.items())
    return DirTables(flags, packed[0], packed[1], ports, tuple(r.id for r in rules), tuple(classes))


# ------------------------------------------------------------------ learned destinations
# A destination an endpoint learned from DNS answers belongs to the class of its rule
# membership (the rules whose peers hold it, as the `peers` LPM finds it) plus the learned
# rules it was learned under; its verdict is `_class_ports` of that membership, i.e.
# `ir.first_match` with the address among those rules' peers (agent/dataplane/ebpf/learning.py).


def membership(rules: tuple[Rule, ...], address: IPAddress) -> frozenset[int]:
    """Indices of the rules (but domainNames ones) whose `peers` hold `address`: the
    members of the class the `peers` LPM gives it (the longest prefix holding it lies
    inside every rule prefix that does), empty where it gives none."""
    return frozenset(i for i, r in enumerate(rules)
                     if not r.learned and (r.peers is None or r.peers.contains(address)))


def learned_stages(rules: tuple[Rule, ...], address: IPAddress, held: dict[tuple[int, ...], float],
                   now: float) -> list[tuple[float, tuple[int, ...]]]:
    """The `learned` value of one destination as (expiry, class members) per stage, in
    ascending expiry: stage i holds the learned rules expiring at or after its expiry, so
    the first stage not expired at any instant holds exactly the rules still learned then.
    `held`: rule indices (the IR rules of one learned rule key) -> expiry. More than
    LEARN_STAGES distinct expiries: the earliest and the latest ones are stages, and a rule
    expiring between counts until the stage before its expiry (earlier, never later)."""
    live = {idx: t for idx, t in held.items() if t > now}
    times = sorted(set(live.values()))
    if len(times) > LEARN_STAGES:
        times = times[:1] + times[-(LEARN_STAGES - 1):]
    base = membership(rules, address)
    out = []
    for t in times:
        members = set(base)
        for idx, e in live.items():
            if e >= t:
                members.update(idx)
        out.append((t, tuple(sorted(members))))
    return out


def learned_class_ports(rules: tuple[Rule, ...], members: tuple[int, ...], isolated: bool) -> PortEntries:
    """The `ports` contents of a class no prefix gives (a learned membership)."""
    return _class_ports(rules, members, isolated)



Entry = tuple[str, bytes]  # (map name, key)


def entries(ep_id: int, counters: dict[tuple[int, str], int], tables: dict[Direction, DirTables],
            gen: int) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """(`peers` items, `ports` items) of one generation of an endpoint's tables, given its
    rule counters ((direction code, rule id) -> rule_stats index)."""
    peers = []
    for d, t in tables.items():
        peers += t.peer_items(ep_id, gen, DIR_CODE[d])
    return peers, port_items(ep_id, counters, tables, gen)


def port_items(ep_id: int, counters: dict[tuple[int, str], int], tables: dict[Direction, DirTables],
               gen: int) -> list[tuple[bytes, bytes]]:
    """The `ports` items of `entries`."""
    ports = []
    for d, t in tables.items():
        dc = DIR_CODE[d]
        for cls, items in t.ports:
            for (proto, has_port, port, plen), (verdict, idx) in items.items():
                ports.append((k_port(ep_id, gen, cls, dc, proto, has_port, port, plen),
                              v_port(counters[(dc, t.rule_ids[idx])], verdict)))
    return ports


def entry_keys(ep_id: int, tables: dict[Direction, DirTables], gen: int) -> list[Entry]:
    """The keys of `entries` (they do not depend on the rule counters)."""
    peers: list[Entry] = []
    ports: list[Entry] = []
    for d, t in tables.items():
        dc = DIR_CODE[d]
        peers += [("peers", k) for k in t.peer_keys(ep_id, gen, dc)]
        ports += [("ports", k_port(ep_id, gen, cls, dc, proto, has_port, port, plen))
                  for cls, items in t.ports for (proto, has_port, port, plen) in items]
    return peers + ports


def render(program: Program, header: list[str]) -> str:
    """The maps `program` compiles to, as text: endpoints numbered from 1 in key order,
    generation 1, rule counters numbered from 0 (a running agent's ids differ)."""
    out = list(header)
    counters: dict[tuple[str, int, str], int] = {}
    for n, (key, ep) in enumerate(sorted(program.endpoints.items()), start=1):
        tables = {d: compile_direction(ep.direction(d)) for d in Direction}
        for d, t in tables.items():
            for rid in t.rule_ids:
                counters.setdefault((key, DIR_CODE[d], rid), len(counters))
        fl = {d.value: f"{'enforced' if t.flags & F_ENFORCED else 'open'}{',isolated' if t.flags & F_ISOLATED else ''}"
              for d, t in tables.items()}
        # names escaped: one endpoint per line whatever its name holds
        iface = f" interface={display(ep.interface)}" if ep.interface else ""
        out.append(f"endpoint {n} {display(key)}{iface} ingress={fl['ingress']} egress={fl['egress']}")
        if ep.interface:
            out.append(f"  ifcfg {display(ep.interface)} -> {n} (node addresses on it)")
        for ip in ep.ips:
            out.append(f"  addrs {ip} -> {n}")
        for d, t in tables.items():
            for fam, addr, plen, cls in t.peers:
                net = ipaddress.IPv4Network((addr, plen)) if fam == 4 else ipaddress.IPv6Network((addr, plen))
                out.append(f"  peers {d.value} {net} -> class {cls}")
            for cls, entries in t.ports:
                for (proto, has_port, port, plen), (verdict, idx) in sorted(entries.items()):
                    where = f"{port}/{plen}" if has_port else "no-port"
                    out.append(f"  ports {d.value} class {cls} {PROTO_NAME[proto]} {where} -> "
                               f"{V_NAME[verdict]} rule {t.rule_ids[idx]} counter "
                               f"{counters[(key, DIR_CODE[d], t.rule_ids[idx])]}")
    return "\n".join(out) + "\n"
