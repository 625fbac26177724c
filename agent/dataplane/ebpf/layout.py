"""The key and value layout of every BPF map, as ctypes structures: the one Python copy of
the structs in bpf/stockade.c. Every map access packs and unpacks through these (no
literal offsets elsewhere); the loader compares them with the C structs bcc compiled
(`check`) and refuses a build where they differ.

Integers are host order (little-endian on every supported machine) except ports, which
the C side copies from packet headers: those fields hold network order (`htons`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import socket
import struct
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64, sizeof
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from agent.dataplane.base import DataplaneError
from agent.dataplane.escape import display, utf8
from agent.ir import IPAddress

Addr16 = c_uint8 * 16  # an IPv4 address fills the first 4 bytes

# codes shared with bpf/stockade.c
DIR_INGRESS, DIR_EGRESS = 0, 1
F_ENFORCED, F_ISOLATED, F_LEARNED = 1, 2, 4  # ep_state.flags (F_LEARNED: egress only)
V_ACCEPT, V_DROP = 1, 2  # port_val.verdict
P_OTHER, P_ICMP, P_TCP, P_UDP, P_SCTP = 0, 1, 6, 17, 132  # protocol codes in port keys
S_AUDIT, S_PORTS = 1, 2  # sample.flags
NO_COUNTER = 0xFFFFFFFF  # sample.counter of a default-deny drop: no rule decided
EPKEY_SIZE = 256  # struct ep_name
LEARN_STAGES = 4  # struct learn_val


class AddrKey(ctypes.Structure):
    """`addrs` (address -> endpoint id, per half) and `nodeaddrs` (half always 0)."""

    _fields_ = [("family", c_uint8), ("half", c_uint8), ("pad", c_uint8 * 2), ("addr", Addr16)]


class HalfKey(ctypes.Structure):
    """`epstate` (struct ep_key: endpoint id) and `ifcfg` (struct if_key: ifindex), per half."""

    _fields_ = [("id", c_uint32), ("half", c_uint32)]


class EpStateValue(ctypes.Structure):
    """struct ep_state: the endpoint's generation in force and per-direction flags."""

    _fields_ = [("gen", c_uint32), ("flags", c_uint8 * 2), ("pad", c_uint8 * 2), ("dev", c_uint32)]


class IfCfg(ctypes.Structure):
    """struct if_cfg: how a device's hooks judge (see docs/ebpf.md)."""

    _fields_ = [("l3", c_uint8), ("hook_dir", c_uint8 * 2), ("peer", c_uint8), ("ep_id", c_uint32)]


class PeerKey(ctypes.Structure):
    """struct peer_key (LPM; prefixlen counts the 80 bits before the address)."""

    _pack_ = 1
    _fields_ = [("prefixlen", c_uint32), ("ep_id", c_uint32), ("gen", c_uint32), ("dir", c_uint8),
                ("family", c_uint8), ("addr", Addr16)]


class PortKey(ctypes.Structure):
    """struct port_key (LPM; prefixlen counts the 120 bits before the port)."""

    _pack_ = 1
    _fields_ = [("prefixlen", c_uint32), ("ep_id", c_uint32), ("gen", c_uint32), ("cls", c_uint32),
                ("dir", c_uint8), ("proto", c_uint8), ("has_port", c_uint8), ("port", c_uint16)]


class PortValue(ctypes.Structure):
    """struct port_val: the deciding rule's verdict and counter (rule_stats index)."""

    _fields_ = [("counter", c_uint32), ("verdict", c_uint8), ("pad", c_uint8 * 3)]


class LearnKey(ctypes.Structure):
    """struct learn_key: a destination an endpoint learned, under one generation."""

    _fields_ = [("ep_id", c_uint32), ("gen", c_uint32), ("family", c_uint8), ("pad", c_uint8 * 3),
                ("addr", Addr16)]


class LearnStage(ctypes.Structure):
    # rules: bit i = the endpoint's i-th learned rule key (agent bookkeeping, for adoption)
    _fields_ = [("expires", c_uint64), ("cls", c_uint32), ("rules", c_uint32)]


class LearnValue(ctypes.Structure):
    """struct learn_val: the class per stage (ascending expiry; unused stages expire at 0)."""

    _fields_ = [("stage", LearnStage * LEARN_STAGES)]


class FlowKey(ctypes.Structure):
    """struct flow_key: a flow at one endpoint, in the direction of its first packet."""

    _fields_ = [("ep_id", c_uint32), ("dir", c_uint8), ("family", c_uint8), ("proto", c_uint8),
                ("pad", c_uint8), ("sport", c_uint16), ("dport", c_uint16), ("saddr", Addr16),
                ("daddr", Addr16)]


class FlowValue(ctypes.Structure):
    """struct flow_val: last seen, FIN flags, the paired endpoint and the device its hook
    judges on (what a vouching mark is bound to: bpf/stockade.c `vouch`)."""

    _fields_ = [("seen", c_uint64), ("flags", c_uint32), ("peer", c_uint32), ("dev", c_uint32),
                ("pad", c_uint32)]


class FragKey(ctypes.Structure):
    _fields_ = [("ep_id", c_uint32), ("id", c_uint32), ("dir", c_uint8), ("family", c_uint8),
                ("proto", c_uint8), ("pad", c_uint8), ("saddr", Addr16), ("daddr", Addr16)]


class Stat(ctypes.Structure):
    _fields_ = [("packets", c_uint64), ("bytes", c_uint64)]


class Config(ctypes.Structure):
    """struct config: runtime settings (audit mode, drop sampling, the vouching mark bit, delivery)."""

    _fields_ = [("audit", c_uint32), ("sample_burst", c_uint32), ("sample_interval", c_uint64),
                ("mark", c_uint32), ("deliver", c_uint32)]


class L2Addrs(ctypes.Structure):
    """struct l2addrs: the Ethernet addresses of frames from the node to a pod device's pod."""

    _fields_ = [("dst", c_uint8 * 6), ("src", c_uint8 * 6)]


class Sample(ctypes.Structure):
    """struct sample: one sampled drop."""

    _fields_ = [("ep_id", c_uint32), ("counter", c_uint32), ("dir", c_uint8), ("family", c_uint8),
                ("l4", c_uint8), ("flags", c_uint8), ("sport", c_uint16), ("dport", c_uint16),
                ("saddr", Addr16), ("daddr", Addr16)]


class EpName(ctypes.Structure):
    """struct ep_name: an endpoint's key (see `epkey_value`)."""

    _fields_ = [("name", ctypes.c_char * EPKEY_SIZE)]


class CounterInfo(ctypes.Structure):
    """struct counter_info: whose rule a rule_stats index counts."""

    _fields_ = [("ep_id", c_uint32), ("dir", c_uint8), ("rule", c_uint8 * 6), ("pad", c_uint8)]


# map name -> (key type, value type); None: the map has no key (a queue)
MAPS: dict[str, tuple[Any, Any]] = {
    "active": (c_uint32, c_uint32),
    "addrs": (AddrKey, c_uint32),
    "epstate": (HalfKey, EpStateValue),
    "ifcfg": (HalfKey, IfCfg),
    "nodeaddrs": (AddrKey, c_uint8),
    "peers": (PeerKey, c_uint32),
    "ports": (PortKey, PortValue),
    "learned": (LearnKey, LearnValue),
    "flows": (FlowKey, FlowValue),
    "frags": (FragKey, c_uint64),
    "rule_stats": (c_uint32, Stat),
    "drop_stats": (c_uint32, Stat),
    "config": (c_uint32, Config),
    "devmac": (c_uint32, L2Addrs),
    "sample_tat": (c_uint32, c_uint64),
    "samples": (None, Sample),
    "epkeys": (c_uint32, EpName),
    "counterinfo": (c_uint32, CounterInfo),
}
HALVED = ("ifcfg", "epstate", "addrs")  # double-buffered maps: one copy of their entries per half


@dataclass(frozen=True)
class Sizes:
    """Map capacities (max_entries). Changing any of them loads a new build."""

    endpoints: int = 4096
    addrs: int = 16384
    peers: int = 262144
    ports: int = 262144
    flows: int = 65536  # LRU, preallocated: ~110 B each
    frags: int = 16384
    counters: int = 65536  # rule counters (rule_stats)
    ifaces: int = 4096
    node_addrs: int = 1024
    samples: int = 1024  # queue of sampled drops waiting for the agent
    learned: int = 65536  # destinations learned from DNS answers (per endpoint and generation)

    @classmethod
    def parse(cls, text: str) -> Sizes:
        """`peers=1024,ports=1024,...`: these fields set, the others the defaults."""
        fields = {f: int(v) for f, v in (p.strip().split("=", 1) for p in text.split(",") if p.strip())}
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown or any(v < 1 for v in fields.values()):
            raise ValueError(f"eBPF map sizes {text!r}: unknown field or size below 1 ({', '.join(sorted(unknown))})")
        return cls(**fields)

    def capacity(self) -> dict[str, int]:
        """Usable entries of every map whose need grows with the cluster (endpoint id 0 is
        reserved)."""
        return {"peers": self.peers, "ports": self.ports, "addrs": self.addrs, "epstate": self.endpoints - 1,
                "rule_stats": self.counters, "learned": self.learned}

    def over(self, need: dict[str, int]) -> dict[str, tuple[int, int]]:
        """Map -> (need, capacity) of every map the need does not fit."""
        cap = self.capacity()
        return {name: (n, cap[name]) for name, n in need.items() if n > cap[name]}

    def fit(self, need: dict[str, int], limit: Sizes) -> Sizes:
        """These sizes with every map the need does not fit grown to `HEADROOM` times its
        need (a power of two, never shrunk), within `limit`; DataplaneError-free: the
        caller checks `limit.over(need)` first."""
        grown = {}
        for name, (n, _) in self.over(need).items():
            field = SIZE_FIELD[name]
            want = max(getattr(self, field), _pow2(HEADROOM * n + (name == "epstate")))
            grown[field] = min(want, getattr(limit, field))
        return replace(self, **grown)

    def defines(self) -> list[str]:
        return [f"MAX_SAMPLES={self.samples}",
            f"MAX_ENDPOINTS={self.endpoints}", f"MAX_ADDRS={self.addrs}", f"MAX_PEERS={self.peers}",
            f"MAX_PORTS={self.ports}", f"MAX_FLOWS={self.flows}", f"MAX_FRAGS={self.frags}",
            f"MAX_COUNTERS={self.counters}", f"MAX_IFACES={self.ifaces}", f"MAX_NODE_ADDRS={self.node_addrs}",
            f"MAX_LEARNED={self.learned}",
        ]


# Growth: a map the program no longer fits is grown to HEADROOM x its need (docs/ebpf.md,
# "Sizes and growth"); LIMIT is the most it grows to (a program beyond it is refused).
HEADROOM = 2
SIZE_FIELD = {"peers": "peers", "ports": "ports", "addrs": "addrs", "epstate": "endpoints", "rule_stats": "counters",
              "learned": "learned"}
LIMIT = Sizes(endpoints=1 << 16, addrs=1 << 20, peers=1 << 24, ports=1 << 24, counters=1 << 21, learned=1 << 22)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def sizes_of(max_entries: dict[str, int]) -> Sizes:
    """The `Sizes` a build was compiled with, from its maps' max_entries (see the
    BPF_* declarations in bpf/stockade.c: the double-buffered maps hold two halves)."""
    m = max_entries
    return Sizes(endpoints=m["epkeys"], addrs=m["addrs"] // 2, peers=m["peers"], ports=m["ports"], flows=m["flows"],
                 frags=m["frags"], counters=m["counterinfo"], ifaces=m["ifcfg"] // 2, node_addrs=m["nodeaddrs"],
                 samples=m["samples"], learned=m.get("learned", Sizes.learned))


# ------------------------------------------------------------------ checked against bcc


def _shape(t: Any) -> list[tuple[str, int, int]]:
    """(field, offset, size) of a ctypes structure; one unnamed field for a scalar or array."""
    if isinstance(t, type) and issubclass(t, ctypes.Structure):
        return [(f[0], getattr(t, f[0]).offset, getattr(t, f[0]).size) for f in t._fields_]
    return [("", 0, sizeof(t))]


def mismatches(name: str, part: str, ours: Any, theirs: Any) -> list[str]:
    """How two layouts of one map's key or value differ (empty: they agree). Fields are
    compared by position (offset and size); the C names may differ from ours."""
    if ours is None or theirs is None:
        return [] if ours is None and theirs is None else [f"{name} {part}: only one side has one"]
    out = []
    if sizeof(ours) != sizeof(theirs):
        out.append(f"{name} {part}: {sizeof(theirs)} bytes in C, {sizeof(ours)} in layout.py")
    a, b = _shape(ours), _shape(theirs)
    if len(a) != len(b) and len(a) > 1:
        out.append(f"{name} {part}: {len(b)} fields in C, {len(a)} in layout.py")
    elif len(a) > 1:
        for (fa, oa, sa), (fb, ob, sb) in zip(a, b, strict=True):
            if (oa, sa) != (ob, sb):
                out.append(f"{name} {part} field {fa} (C: {fb}): offset {ob} size {sb} in C, "
                           f"offset {oa} size {sa} in layout.py")
    return out


def check(tables: dict[str, tuple[Any, Any]]) -> list[str]:
    """Every difference between `MAPS` and the (key type, value type) of the compiled
    maps (bcc's `Table.Key`/`Table.Leaf`)."""
    out = []
    for name, (key, value) in MAPS.items():
        if name not in tables:
            out.append(f"{name}: no such map in the C source")
            continue
        ckey, cvalue = tables[name]
        out += mismatches(name, "key", key, ckey) + mismatches(name, "value", value, cvalue)
    out += [f"{name}: map not described in layout.py" for name in tables if name not in MAPS]
    return out


# ------------------------------------------------------------------ packing

S = TypeVar("S", bound=ctypes.Structure)


def unpack(t: type[S], raw: bytes) -> S:
    return t.from_buffer_copy(raw[: sizeof(t)])


def u32(n: int) -> bytes:
    """A u32 key or value (array indexes, endpoint ids, counters, classes)."""
    return bytes(c_uint32(n))


def read_u32(raw: bytes) -> int:
    return c_uint32.from_buffer_copy(raw[:4]).value


def addr16(raw: bytes) -> Any:
    return Addr16.from_buffer_copy(raw.ljust(16, b"\0"))


def ip_of(family: int, addr: Any) -> bytes:
    """The address bytes (4 or 16) of an `Addr16` field."""
    return bytes(addr)[: 4 if family == 4 else 16]


def k_addr(ip: IPAddress, half: int = 0) -> bytes:
    """`addrs` key (under a half of the double buffer) or `nodeaddrs` key (half 0)."""
    return bytes(AddrKey(ip.version, half, (c_uint8 * 2)(), addr16(ip.packed)))


def k_half(item: int, half: int) -> bytes:
    """`epstate` key (endpoint id) or `ifcfg` key (ifindex) under a half."""
    return bytes(HalfKey(item, half))


def v_epstate(gen: int, ingress: int, egress: int, dev: int = 0) -> bytes:
    # dev: the endpoint's pod veth (direct delivery of a flow's first packet), 0: none
    return bytes(EpStateValue(gen, (c_uint8 * 2)(ingress, egress), (c_uint8 * 2)(), dev))


def v_ifcfg(l3: bool, host: bool, ep_id: int = 0, peer: bool = False) -> bytes:
    # pod behind a veth: tc ingress = its egress; the node itself: tc ingress = its ingress
    # ep_id: the endpoint bound to the device (0: none, endpoints are found by address only)
    # peer: a veth whose other end is in another network namespace (direct delivery may use it)
    hooks = (DIR_INGRESS, DIR_EGRESS) if host else (DIR_EGRESS, DIR_INGRESS)
    return bytes(IfCfg(int(l3), (c_uint8 * 2)(*hooks), int(peer), ep_id))


# The peers/ports items are packed with struct (the same bytes as PeerKey, PortKey and
# PortValue, tests/unit/test_ebpf_layout.py): an apply packs every entry of each changed
# endpoint's new generation, and ctypes structures cost several times more.
_PEER_KEY = struct.Struct("<IIIBB16s")
_PORT_KEY = struct.Struct("<IIIIBBB2s")
_PORT_VALUE = struct.Struct("<IB3x")


def k_peer(ep: int, gen: int, d: int, family: int, addr: int, plen: int) -> bytes:
    return _PEER_KEY.pack(80 + plen, ep, gen, d, family, addr.to_bytes(4 if family == 4 else 16, "big"))


def k_port(ep: int, gen: int, cls: int, d: int, proto: int, has_port: int, port: int, plen: int) -> bytes:
    prefixlen = 120 + plen if has_port else 136
    return _PORT_KEY.pack(prefixlen, ep, gen, cls, d, proto, has_port, port.to_bytes(2, "big"))


def v_port(counter: int, verdict: int) -> bytes:
    return _PORT_VALUE.pack(counter, verdict)


_LEARN_KEY = struct.Struct("<IIB3x16s")
_LEARN_STAGE = struct.Struct("<QII")


def k_learn(ep: int, gen: int, ip: IPAddress) -> bytes:
    return _LEARN_KEY.pack(ep, gen, ip.version, ip.packed)


def v_learn(stages: list[tuple[int, int, int]]) -> bytes:
    """(expiry ns, class, learned rules bit mask) per stage, at most LEARN_STAGES, ascending expiry."""
    assert len(stages) <= LEARN_STAGES
    padded = list(stages) + [(0, 0, 0)] * (LEARN_STAGES - len(stages))
    return b"".join(_LEARN_STAGE.pack(t, c, m) for t, c, m in padded)


def learn_stages(raw: bytes) -> list[tuple[int, int, int]]:
    """The used stages of a `learned` value: (expiry ns, class, rules bit mask)."""
    return [st for i in range(LEARN_STAGES) if (st := _LEARN_STAGE.unpack_from(raw, i * _LEARN_STAGE.size))[0]]


def learn_owner(raw: bytes) -> tuple[int, int]:
    """(endpoint id, generation) of a `learned` key."""
    ep, gen = struct.unpack_from("<II", raw)
    return ep, gen


# The skb->mark bit a source pod's hook sets on a packet it vouches for to the destination pod's
# hook on this node (bpf/stockade.c `vouch`; docs/ebpf.md "The vouching mark"): one bit nothing
# else on the node uses -- not kube-proxy's 0x4000 (masquerade) / 0x8000 (drop), not Calico's
# 0xffff0000, not Cilium's 0x0f00. Set by `STOCKADE_EBPF_MARK` (the agent's `--ebpf-mark`);
# 0 turns vouching off (every packet judged at both hooks, as before).
MARK_ENV = "STOCKADE_EBPF_MARK"
DEFAULT_MARK = 0x1000


def parse_mark(text: str) -> int:
    """A mark bit as written (`0x1000`, `4096`, `0`): one bit of the 32-bit mark, or 0."""
    try:
        mark = int(text.strip(), 0)
    except ValueError:
        mark = -1
    if mark < 0 or mark > 0xFFFFFFFF or mark & (mark - 1):
        raise ValueError(f"{text!r} is not one bit of the 32-bit skb mark (e.g. 0x1000), nor 0")
    return mark


def skb_mark() -> int:
    """The mark bit in force: `$STOCKADE_EBPF_MARK`, else DEFAULT_MARK."""
    raw = os.environ.get(MARK_ENV, "").strip()
    if not raw:
        return DEFAULT_MARK
    try:
        return parse_mark(raw)
    except ValueError as e:
        raise DataplaneError(f"${MARK_ENV}: {e}") from None


# How a packet between two local pods, judged for both at the source's hook, reaches the
# destination (bpf/stockade.c `to_pod`; docs/ebpf.md "Direct delivery"): "stack" (the default)
# through the node's forwarding, vouched for by the mark; "peer" straight into the pod's network
# namespace (bpf_redirect_peer), past the node's netfilter.
# Set by `STOCKADE_EBPF_DELIVER` (the agent's `--ebpf-deliver`).
DELIVER_ENV = "STOCKADE_EBPF_DELIVER"
DELIVERY = ("stack", "peer")


def parse_delivery(text: str) -> str:
    word = text.strip().lower()
    if word not in DELIVERY:
        raise ValueError(f"{text!r} is not a delivery ({' or '.join(DELIVERY)})")
    return word


def delivery() -> str:
    """The delivery in force: `$STOCKADE_EBPF_DELIVER`, else "stack"."""
    raw = os.environ.get(DELIVER_ENV, "").strip()
    if not raw:
        return "stack"
    try:
        return parse_delivery(raw)
    except ValueError as e:
        raise DataplaneError(f"${DELIVER_ENV}: {e}") from None


def v_config(audit: bool, rate: float, burst: int, mark: int | None = None, deliver: str | None = None) -> bytes:
    """The `config` value; `mark` None: `skb_mark()`, `deliver` None: `delivery()`."""
    interval = int(1e9 / rate) if rate > 0 else 0
    how = delivery() if deliver is None else deliver
    return bytes(Config(int(audit), max(burst, 0), interval, skb_mark() if mark is None else mark,
                        int(how == "peer")))


def k_flow(ep: int, d: int, fam: int, proto: int, saddr: bytes, sport: int, daddr: bytes, dport: int) -> bytes:
    return bytes(FlowKey(ep, d, fam, proto, 0, socket.htons(sport), socket.htons(dport), addr16(saddr),
                         addr16(daddr)))


def v_counter_info(ep_id: int, d: int, rule_id: str) -> bytes:
    return bytes(CounterInfo(ep_id, d, (c_uint8 * 6)(*bytes.fromhex(rule_id))))


def counter_owner(raw: bytes) -> tuple[int, int, str]:
    """(endpoint id, direction, rule id) of a `counterinfo` value."""
    info = unpack(CounterInfo, raw)
    return info.ep_id, info.dir, bytes(info.rule).hex()


def stat_sum(values: list[bytes]) -> tuple[int, int]:
    """(packets, bytes) summed over a per-CPU `Stat` value."""
    p = b = 0
    for v in values:
        s = unpack(Stat, v)
        p, b = p + s.packets, b + s.bytes
    return p, b


ZERO_STAT = bytes(Stat())


# ------------------------------------------------------------------ endpoint keys

_HASHED = b"\xff"  # a byte no UTF-8 text starts with: the value holds the key's digest
_DIGEST = 16


def is_hashed(value: bytes) -> bool:
    return value[:1] == _HASHED


def epkey_value(key: str) -> bytes:
    """The `epkeys` value of an endpoint key: its UTF-8 when that reads back exactly (at
    most 255 bytes, no NUL, no lone surrogate), else 0xff, a 128-bit digest of the key and
    its escaped display form cut to fit; never a key cut mid-character, and two keys never
    share a value (a cut prefix would: adoption would merge their endpoints)."""
    raw = utf8(key)
    if len(raw) < EPKEY_SIZE and b"\0" not in raw:
        try:
            raw.decode()
            return raw.ljust(EPKEY_SIZE, b"\0")
        except UnicodeDecodeError:
            pass  # a lone surrogate: decode() would not give the key back
    digest = hashlib.blake2s(raw, digest_size=_DIGEST).digest()
    shown = display(key, EPKEY_SIZE - 2 - _DIGEST).encode()
    return (_HASHED + digest + shown).ljust(EPKEY_SIZE, b"\0")


def epkey_name(value: bytes) -> str:
    """The key an `epkeys` value names, or, for a digest, a placeholder ("\0" + digest;
    no key stored as plain text holds a NUL) that `apply` resolves against its program."""
    if is_hashed(value):
        return "\0" + value[1 : 1 + _DIGEST].hex()
    return value.rstrip(b"\0").decode(errors="surrogateescape")  # an older agent's cut key: never matches
