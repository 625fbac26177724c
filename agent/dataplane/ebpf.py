"""eBPF dataplane: tc classifiers (bpf/stockade.c) on each local endpoint's host-side
interface, driven by pinned maps.

Processes:
- `agent.dataplane.ebpf_loader` (a short-lived child) compiles the C source with bcc,
  loads the two programs and pins them with every map under
  `<pin_root>/<build>/` (`build` hashes the source and the map sizes). The agent never
  imports bcc: it manages the pinned maps with bpf(2) through `agent.dataplane.bpfsys`
  and attaches the pinned programs with pyroute2 (clsact, direct-action, prio
  `FILTER_PRIO`, handle 1, name `stockade-<build>-<hook>`).

Maps (all keys/values little-endian host order except addresses and ports):
- `active` array[1] -> the global slot (0/1) in force. `ifcfg`, `addrs` and `epstate` are
  keyed by slot too (one copy of every entry per slot; see Atomicity).
- `ifcfg` (ifindex, slot) -> (l3, direction judged at tc ingress, at tc egress, bound endpoint
  id). A veth of a pod: tc ingress judges the pod's egress, tc egress its ingress,
  bound id 0. A device whose endpoint is the node itself: the other way round -- an
  endpoint with an address of the node, or one with `interface` set (NetBird's wt0),
  which is *bound* to the device: its id is in the device's entry. `l3`: raw IP device
  (TUN), no Ethernet header.
- `addrs` (family, slot, address) -> endpoint id; `epstate` (endpoint id, slot) ->
  (generation, per direction: enforced, isolated). `epkeys`/`slotinfo` remember endpoint keys and
  counter slots for a restarted agent.
- Finding the endpoint of a packet: its local address (destination for the direction
  judged as ingress, source for egress) in `addrs`; if absent and the device has a
  bound endpoint, that endpoint when the local address is a node address (`nodeaddrs`).
  So, as nftables judges such an endpoint by device (`iifname` in prerouting for
  packets to a local address, `oifname` in output), the endpoint bound to wt0 judges
  packets arriving on wt0 for this host and leaving through wt0 from it, whether or not
  its own addresses are known: NetBird's bootstrap endpoint (`ips=()`, ingress isolated)
  denies new inbound flows and passes outbound ones and their replies (recorded in
  `flows` under its id). Packets routed through the device (neither address the node's)
  are not the node's; pod veths are found by address only. `nodeaddrs` (family, 0,
  address) is refreshed by every `apply` (the daemon's periodic resync included), like the
  attachment itself; it describes the host, not the policy, and has no slots.
- A packet leaving an endpoint (the direction judged is egress) for another local
  endpoint's address (in `addrs`, not a node address) is judged for both at this hook:
  the source's egress, then the destination's ingress, under the same slot; it passes
  only if both pass, and the flow is remembered at both ends (`flows`, `frags`), so the
  destination's own hook passes it as a known flow. A drop by the destination is counted
  and sampled as the destination's. Should the destination's hook judge it again anyway
  (its flow entry evicted meanwhile), the packet must pass that judgement too.
- `peers` LPM (endpoint, generation, direction, family, peer prefix) -> peer class.
  Classes are computed here: every distinct prefix of the direction's rules becomes an
  entry whose class is the set of rules containing it (prefixes of one family are
  nested or disjoint, so the longest match is the most specific prefix, and the rules
  containing the packet's peer are exactly those containing that prefix); rules with
  `peers=None` are in every class, and a /0 entry catches addresses only they match.
- `ports` LPM (endpoint, generation, class, direction, protocol, has_port, port
  prefix) -> (verdict, counter slot). Per class and protocol the first-match function
  over the port space is computed here (IR order), cut into maximal intervals with the
  same deciding rule, and each interval into aligned power-of-two port prefixes (at
  most 30 per interval). `has_port=0` entries answer packets without a port (ICMP,
  other protocols, non-first fragments): only rules matching every port of the
  protocol (or every protocol) match them.
- `flows` LRU (endpoint, direction, family, protocol, ports, addresses) -> last seen,
  FIN flags; written when a judged packet passes, looked up as is (same direction) and
  reversed with the other direction (replies). ICMP echo uses the identifier as port;
  ICMP errors look up their inner header reversed. RST deletes, both FINs shorten the
  timeout to 10 s. `frags` LRU remembers first fragments that passed so later
  fragments of the datagram pass; unknown later fragments are judged without a port.
- `rule_stats` per-CPU array slot -> (packets, bytes) of judged packets per rule;
  `drop_stats` per-CPU array (endpoint id * 2 + direction) -> default-deny drops.
- `config` array[1] -> (audit, sample burst, sample interval ns), written by every
  `apply`: runtime settings, no rebuild. Audit mode: a packet judged a drop (drop rule,
  default deny, unwalkable header chain) is counted as in enforce mode, sampled with
  the audit flag, then passes and is remembered in `flows` like an allowed packet (as
  conntrack would remember it under nftables), so its replies pass without being
  reported as drops of their own.
- Drop sampling: `sample_tat` per-CPU array (endpoint id * 2 + direction) -> the
  theoretical arrival time of the next sample (GCRA: `sample_burst` at once, then one
  per interval; default 10/s burst 20, per endpoint, direction and CPU, as the nftables
  log rate). Samples go into `samples`, a BPF_MAP_TYPE_QUEUE pushed with BPF_EXIST (a
  full queue overwrites its oldest sample). `EbpfDropLog` pops it with
  BPF_MAP_LOOKUP_AND_DELETE_ELEM (bpfsys, no bcc) and maps a sample (endpoint id,
  direction, counter slot or NO_SLOT for the default deny, protocol, addresses,
  ports, audit flag) to a `DropEvent` through the pinned `epkeys` and `slotinfo`
  (slot -> rule id, the IR's `Rule.id`); a sample whose slot was released meanwhile is
  discarded rather than misattributed.

Strict mode: `established()` walks `flows` and returns the TCP/UDP/SCTP tuples as
`Flow`s in the direction of the packet that created each entry (the original
direction; a flow between two local endpoints has the same tuple at both);
`forget()` deletes, for each flow, every key `established()` saw for it in either
orientation plus the keys the program would look up now (both endpoints by address,
both directions, both orientations), so its next packet is judged under the current
generation. Node-to-pod flows are left alone by `agent.strict.stale_flows`.

Bounds (per endpoint and direction, R rules, P distinct peer prefixes, Q port ranges):
`peers` entries <= P + 2; classes <= P + 2; `ports` entries <= classes * 5 protocols *
(2Q + 2) intervals * 30 prefixes (in practice one or two per port rule and class).

Atomicity: one map update switches every endpoint at once. A packet reads `active` once,
before any other lookup, and uses that slot for every lookup of its judgement (`ifcfg`,
`addrs`, `epstate`, then `peers`/`ports` by the generation `epstate` names). Between two
applies both slots hold the same entries. One apply, with S the slot in force and T the
other: (1) `nodeaddrs` additions; each changed endpoint's tables are written under a new
generation g+1 (nobody reads it yet; on a write error they are deleted again); (2) slot T
of `ifcfg`, `epstate` and `addrs` is made to hold the whole new policy (changed
endpoints point at g+1, unchanged ones keep their generation, departed endpoints,
addresses and devices are deleted from T), and devices are attached (a device without an
entry in S is not judged yet); (3) the flip: `active` := T, one array update; (4) after
the grace period (packets that read S are done) the replaced generations go, counter
slots of departed or taken-over endpoints are released, devices no endpoint wants are
detached, and slot S catches up with T; (5) `nodeaddrs` removals. A kill before (3)
leaves the old policy in force whole (S untouched), after it the new one (T complete);
what is left over (half-written T or g+1 entries, stale S entries, old generations) is
never read, and a restarted agent rewrites or sweeps it.

A packet between two local endpoints meets both policies at the source's hook, under one
slot (see above), so a flip between its two hooks cannot mix one endpoint's old tables
with the other's new ones: the destination's hook passes it as a known flow. Were it to
judge it again under the other slot (flow entry evicted in between), the packet would need
both verdicts, old AND new: that can block what the old policy allowed only when the new
one blocks it too, and never allows anything either policy forbids.

A new endpoint bound to a device takes over the id of a departing endpoint bound to the
same device (the bootstrap endpoint replaced by the local peer after the first sync, or
the peer renamed): `epkeys` is rewritten to the new key, its tables switch with the flip
as above, the device's `ifcfg` entries are unchanged, and the flows recorded under the id
(connections the node opened meanwhile) survive, as conntrack entries do under
nftables; counter slots and default-deny counters start afresh under the new key.

Restart adoption: a new agent reads the slot in force from `active` and rebuilds
endpoints, generations, addresses and devices from that slot's entries (and what each
slot holds, so its first apply rewrites exactly what differs), counter slots from
`slotinfo`, and which device an endpoint is bound to from `ifcfg` (ifindex -> name), so
the takeover above works across a restart too. Its first apply sweeps entries of
generations the slot in force does not use before writing new ones (an agent killed
before its flip leaves some), and again after its flip. An apply that fails forgets the
model; the next one adopts what the kernel holds. `cleanup` detaches every filter and
unpins everything, `ifcfg` and `active` included.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import itertools
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.dataplane import bpfsys, child, conntrack, nflog
from agent.dataplane.base import ApplyStats, Count, Counters, Dataplane, DataplaneError, DropEvent, DropLog, Flow
from agent.dataplane.escape import display, utf8
from agent.ir import PORTED, Direction, DirectionProgram, EndpointProgram, IPAddress, Program, Rule, Verdict

log = logging.getLogger(__name__)

PIN_ROOT = "/sys/fs/bpf/stockade"
# Overrides the pin root (e.g. a bpffs the tests mount where `ip netns exec` still sees it).
PIN_ROOT_ENV = "STOCKADE_BPF_PIN_ROOT"
SOURCE = os.path.join(os.path.dirname(__file__), "..", "..", "bpf", "stockade.c")
FILTER_PRIO = 0x5EC
FILTER_HANDLE = 1
PARENTS = {0: 0xFFFFFFF2, 1: 0xFFFFFFF3}  # tc ingress, tc egress (clsact)
GRACE_S = 0.02  # after a flip: packets judged under the previous slot are done (in flight)
SLOTTED = ("ifcfg", "epstate", "addrs")  # maps holding one copy of their entries per global slot

DIR_CODE = {Direction.INGRESS: 0, Direction.EGRESS: 1}
F_ENFORCED, F_ISOLATED = 1, 2
V_CODE = {Verdict.ACCEPT: 1, Verdict.DROP: 2}
V_NAME = {1: "accept", 2: "drop"}
PROTO = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1}
P_OTHER = 0
PROTO_NAME = {v: k for k, v in PROTO.items()} | {P_OTHER: "other"}
ALL_PROTOS = (6, 17, 132, 1, P_OTHER)
NO_SLOT = 0xFFFFFFFF  # sample of a default-deny drop
S_AUDIT, S_PORTS = 1, 2


@dataclass(frozen=True)
class Sizes:
    """Map capacities (max_entries). Changing any of them loads a new build."""

    endpoints: int = 4096
    addrs: int = 16384
    peers: int = 262144
    ports: int = 262144
    flows: int = 65536  # LRU, preallocated: ~110 B each
    frags: int = 16384
    slots: int = 65536
    ifaces: int = 4096
    node_addrs: int = 1024
    samples: int = 1024  # queue of sampled drops waiting for the agent

    def defines(self) -> list[str]:
        return [f"MAX_SAMPLES={self.samples}",
            f"MAX_ENDPOINTS={self.endpoints}", f"MAX_ADDRS={self.addrs}", f"MAX_PEERS={self.peers}",
            f"MAX_PORTS={self.ports}", f"MAX_FLOWS={self.flows}", f"MAX_FRAGS={self.frags}",
            f"MAX_SLOTS={self.slots}", f"MAX_IFACES={self.ifaces}", f"MAX_NODE_ADDRS={self.node_addrs}",
        ]


# ------------------------------------------------------------------ IR -> tables (pure)


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


def _class_ports(rules: tuple[Rule, ...], members: tuple[int, ...]) -> PortEntries:
    out: PortEntries = {}
    for proto in ALL_PROTOS:
        # no port known: first rule matching every port of the protocol
        for i in members:
            if _rule_matches(rules[i], proto, None):
                out[(proto, 0, 0, 16)] = (V_CODE[rules[i].verdict], i)
                break
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
            who = next((i for i in members if _rule_matches(rules[i], proto, a)), None)
            if segs and segs[-1][2] == who:
                segs[-1] = (segs[-1][0], b, who)
            else:
                segs.append((a, b, who))
        for a, b, who in segs:
            if who is None:
                continue
            for port, plen in port_prefixes(a, b - 1):
                out[(proto, 1, port, plen)] = (V_CODE[rules[who].verdict], who)
    return out


@dataclass(frozen=True)
class DirTables:
    """One endpoint direction's map contents, independent of ids, slots, generations."""

    flags: int
    peers: tuple[tuple[int, int, int, int], ...] = ()  # (family, address int, prefixlen, class)
    ports: tuple[tuple[int, PortEntries], ...] = ()  # (class, entries)
    rule_ids: tuple[str, ...] = ()

    def __hash__(self) -> int:
        return hash((self.flags, self.peers, self.rule_ids))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DirTables) and (
            self.flags, self.peers, self.ports, self.rule_ids
        ) == (other.flags, other.peers, other.ports, other.rule_ids)

    @property
    def entries(self) -> tuple[int, int]:
        return len(self.peers), sum(len(e) for _, e in self.ports)


def compile_direction(dp: DirectionProgram) -> DirTables:
    flags = (F_ENFORCED if dp.enforced else 0) | (F_ISOLATED if dp.isolated else 0)
    rules = dp.rules
    if not dp.enforced or not rules:
        return DirTables(flags, rule_ids=tuple(r.id for r in rules))
    anyone = tuple(i for i, r in enumerate(rules) if r.peers is None)
    classes: dict[tuple[int, ...], int] = {}
    peers = []
    for fam, width in ((4, 32), (6, 128)):
        holders: dict[tuple[int, int], set[int]] = {}
        for i, r in enumerate(rules):
            if r.peers is None:
                continue
            for n in r.peers.family(fam):
                holders.setdefault((int(n.network_address), n.prefixlen), set()).add(i)
        prefixes = set(holders)
        if anyone:
            prefixes.add((0, 0))
        for addr, plen in sorted(prefixes):
            members = set(anyone)
            for ln in range(plen + 1):  # every ancestor (or the prefix itself) that a rule holds
                mask = ((1 << ln) - 1) << (width - ln) if ln else 0
                members |= holders.get((addr & mask, ln), set())
            key = tuple(sorted(members))
            cls = classes.setdefault(key, len(classes) + 1)
            peers.append((fam, addr, plen, cls))
    ports = tuple((cls, _class_ports(rules, members)) for members, cls in classes.items())
    return DirTables(flags, tuple(peers), ports, tuple(r.id for r in rules))


# ------------------------------------------------------------------ key/value packing


def _addr_bytes(ip: IPAddress | int, family: int) -> bytes:
    if isinstance(ip, int):
        return ip.to_bytes(4 if family == 4 else 16, "big").ljust(16, b"\0")
    return ip.packed.ljust(16, b"\0")


def k_addr(ip: IPAddress, slot: int = 0) -> bytes:
    """`addrs` key (under a global slot) or `nodeaddrs` key (slot 0)."""
    return struct.pack("<BB2x", ip.version, slot) + _addr_bytes(ip, ip.version)


def k_ep(ep_id: int, slot: int) -> bytes:
    return struct.pack("<II", ep_id, slot)


def k_if(ifindex: int, slot: int) -> bytes:
    return struct.pack("<II", ifindex, slot)


SLOT_KEY = {"ifcfg": k_if, "epstate": k_ep, "addrs": k_addr}
SlotContents = dict[str, dict]
"""One global slot of the slotted maps: map name -> {ifindex / endpoint id / address: value}."""


def _empty_slot() -> SlotContents:
    return {name: {} for name in SLOTTED}


def _slot_item(name: str, k: bytes) -> tuple[int, object]:
    """(slot, item) of a slotted map's key."""
    if name == "addrs":
        fam, slot = k[0], k[1]
        return slot, ipaddress.ip_address(k[4:8] if fam == 4 else k[4:20])
    item, slot = struct.unpack("<II", k[:8])
    return slot, item


def v_epstate(gen: int, ing: int, eg: int) -> bytes:
    return struct.pack("<IBB2x", gen, ing, eg)


def k_peer(ep: int, gen: int, d: int, family: int, addr: int, plen: int) -> bytes:
    return struct.pack("<IIIBB", 80 + plen, ep, gen, d, family) + _addr_bytes(addr, family)


def k_port(ep: int, gen: int, cls: int, d: int, proto: int, has_port: int, port: int, plen: int) -> bytes:
    prefixlen = 120 + plen if has_port else 136
    return struct.pack("<IIIIBBB", prefixlen, ep, gen, cls, d, proto, has_port) + struct.pack(">H", port)


def v_port(slot: int, verdict: int) -> bytes:
    return struct.pack("<IB3x", slot, verdict)


def v_config(audit: bool, rate: float, burst: int) -> bytes:
    interval = int(1e9 / rate) if rate > 0 else 0
    return struct.pack("<IIQ", int(audit), max(burst, 0), interval)


def _flow_tuple(k: bytes) -> tuple[int, int, bytes, int, bytes, int]:
    """(family, proto, saddr, sport, daddr, dport) of a `flows` key."""
    fam, proto = k[5], k[6]
    sport, dport = struct.unpack(">HH", k[8:12])
    n = 4 if fam == 4 else 16
    return fam, proto, k[12 : 12 + n], sport, k[28 : 28 + n], dport


def k_flow(ep: int, d: int, fam: int, proto: int, saddr: bytes, sport: int, daddr: bytes, dport: int) -> bytes:
    return (struct.pack("<IBBBx", ep, d, fam, proto) + struct.pack(">HH", sport, dport)
            + saddr.ljust(16, b"\0") + daddr.ljust(16, b"\0"))


def v_ifcfg(l3: bool, host: bool, ep_id: int = 0) -> bytes:
    # pod behind a veth: tc ingress = its egress (1); the node itself: tc ingress = its ingress (0)
    # ep_id: the endpoint bound to the device (0: none, endpoints are found by address only)
    return struct.pack("<BBBxI", int(l3), 0 if host else 1, 1 if host else 0, ep_id)


# ------------------------------------------------------------------ model


@dataclass
class EpState:
    ep_id: int
    gen: int
    tables: dict[Direction, DirTables] | None  # None: adopted, contents unknown
    addrs: set[IPAddress] = field(default_factory=set)
    slots: dict[tuple[int, str], int] = field(default_factory=dict)  # (dir, rule id) -> slot
    iface: str | None = None  # device the endpoint is bound to (EndpointProgram.interface)


def _entries(ep: EpState, tables: dict[Direction, DirTables], gen: int) -> tuple[list, list]:
    peers, ports = [], []
    for d, t in tables.items():
        dc = DIR_CODE[d]
        for fam, addr, plen, cls in t.peers:
            peers.append((k_peer(ep.ep_id, gen, dc, fam, addr, plen), struct.pack("<I", cls)))
        for cls, entries in t.ports:
            for (proto, has_port, port, plen), (verdict, idx) in entries.items():
                slot = ep.slots[(dc, t.rule_ids[idx])]
                ports.append((k_port(ep.ep_id, gen, cls, dc, proto, has_port, port, plen),
                              v_port(slot, verdict)))
    return peers, ports


EPKEY_SIZE = 256  # struct ep_name in bpf/stockade.c
_HASHED = b"\xff"  # a byte no UTF-8 text starts with: the value holds the key's digest
_DIGEST = 16


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
    if value[:1] == _HASHED:
        return "\0" + value[1 : 1 + _DIGEST].hex()
    return value.rstrip(b"\0").decode(errors="surrogateescape")  # an older agent's cut key: never matches


def build_id(sizes: Sizes) -> str:
    with open(SOURCE, "rb") as f:
        src = f.read()
    return hashlib.blake2s(src + json.dumps(sizes.defines()).encode(), digest_size=6).hexdigest()


class EbpfDataplane(Dataplane):
    name = "ebpf"

    def __init__(self, sizes: Sizes | None = None, pin_root: str | None = None, netns: str | None = None,
                 python: str | None = None, audit: bool = False, sample_rate: float = 10.0,
                 sample_burst: int = 20) -> None:
        self.sizes = sizes or Sizes()
        # Runtime settings (the `config` map, written by apply): audit mode passes judged
        # drops; drops are sampled at `sample_rate` per second (0: not at all) after a
        # burst of `sample_burst`, per endpoint, direction and CPU.
        self.audit = audit
        self.sample_rate = sample_rate
        self.sample_burst = sample_burst
        self._flow_keys: dict[tuple, list[bytes]] = {}  # flow (either orientation) -> keys seen
        self.pin_root = (pin_root or os.environ.get(PIN_ROOT_ENV) or PIN_ROOT).rstrip("/")
        self.netns = netns  # named netns for routes, addresses and tc (None: the current one)
        self.python = python or sys.executable
        self.build = build_id(self.sizes)
        self.pin_dir = f"{self.pin_root}/{self.build}"
        self.maps: dict[str, bpfsys.Map] = {}
        self.prog_fds: dict[int, int] = {}
        self.prog_ids: dict[int, int] = {}
        self.eps: dict[str, EpState] | None = None  # None: not yet loaded/adopted
        self.slot = 0  # the global slot in force (`active`)
        # what each slot of the slotted maps holds (both alike between applies)
        self.have: list[SlotContents] = [_empty_slot(), _empty_slot()]
        self.node_addrs: set[IPAddress] = set()
        self.free_slots: list[int] = []
        self.next_slot = 0
        self.next_ep = 1
        self.unattached: dict[str, str] = {}
        self._adopted = False
        self._links: dict[int, object] = {}  # endpoint key -> why it has no interface
        # epkeys values stored as a digest -> their key, for drop events (read on the drop
        # log's thread: only single get/set operations on it)
        self.hashed_names: dict[bytes, str] = {}
        # adopted endpoints whose epkeys value is a digest: placeholder -> their key in eps
        self._unresolved: dict[str, str] = {}
        self.last_load: dict[str, object] = {}
        self._ipr = None

    # ---------------------------------------------------------------- plumbing

    @property
    def ipr(self):  # type: ignore[no-untyped-def]
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        return self._ipr

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        for fd in self.prog_fds.values():
            os.close(fd)
        self.maps, self.prog_fds, self.eps = {}, {}, None
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _ensure_bpffs(self) -> None:
        base = os.path.dirname(self.pin_root.rstrip("/")) or "/"
        if not bpfsys.is_bpffs(base):
            try:
                os.makedirs(base, exist_ok=True)
                subprocess.run(["mount", "-t", "bpf", "bpf", base], check=True, capture_output=True)
            except (OSError, subprocess.CalledProcessError) as e:
                raise DataplaneError(
                    f"no BPF filesystem at {base} and mounting one failed ({e}); run as root or "
                    f"`mount -t bpf bpf {base}`"
                ) from e
        os.makedirs(self.pin_root, exist_ok=True)

    def _load(self) -> None:
        """Open the pinned objects of this build, compiling them in a child if absent."""
        if self.maps:
            return
        self._ensure_bpffs()
        if not os.path.exists(f"{self.pin_dir}/stk_egress"):
            cmd = [self.python, "-m", "agent.dataplane.ebpf_loader", "--pin-dir", self.pin_dir]
            for d in self.sizes.defines():
                cmd += ["-D", d]
            t0 = time.monotonic()
            root = os.path.dirname(os.path.dirname(os.path.abspath(SOURCE)))
            env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
            r = child.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise DataplaneError(f"eBPF loader failed: {r.stderr.strip()[-2000:]}")
            self.last_load = json.loads(r.stdout.strip().splitlines()[-1])
            self.last_load["total_s"] = round(time.monotonic() - t0, 3)
            log.info("compiled and pinned eBPF build %s: %s", self.build, self.last_load)
        try:
            from agent.dataplane.ebpf_loader import MAPS, PROGRAMS

            for name in MAPS:
                self.maps[name] = bpfsys.Map.pinned(f"{self.pin_dir}/{name}")
            for hook, name in enumerate(PROGRAMS):
                self.prog_fds[hook] = bpfsys.obj_get(f"{self.pin_dir}/{name}")
                self.prog_ids[hook] = bpfsys.prog_id(self.prog_fds[hook])
        except OSError as e:
            self.close()
            raise DataplaneError(f"cannot open pinned eBPF objects in {self.pin_dir}: {e}") from e

    def _adopt(self) -> None:
        """Rebuild the model from pinned maps a previous agent left behind: the slot in force
        from `active`, endpoints, generations, addresses and devices from that slot's
        entries (the other slot may be half-written: it is only ever rewritten), slots."""
        self._load()
        self._unresolved = {}
        raw = self.maps["active"].lookup(struct.pack("<I", 0))
        self.slot = struct.unpack("<I", raw[:4])[0] & 1 if raw else 0
        self.have = [_empty_slot(), _empty_slot()]
        for name in SLOTTED:
            for k, v in self.maps[name].items():
                slot, item = _slot_item(name, k)
                if slot > 1:  # never written by us: make sure it goes
                    self.maps[name].delete(k)
                    continue
                self.have[slot][name][item] = v
        act = self.have[self.slot]
        eps: dict[str, EpState] = {}
        byid: dict[int, EpState] = {}
        for k, v in self.maps["epkeys"].items():
            ep_id = struct.unpack("<I", k)[0]
            name = epkey_name(v)
            if v[:1] == _HASHED:
                self._unresolved[name] = name
            st = act["epstate"].get(ep_id)
            gen = struct.unpack("<I", st[:4])[0] if st else 0
            eps[name] = byid[ep_id] = EpState(ep_id, gen, None)
            self.next_ep = max(self.next_ep, ep_id + 1)
        for ip, v in act["addrs"].items():
            ep = byid.get(struct.unpack("<I", v)[0])
            if ep is not None:
                ep.addrs.add(ip)
        used = set()
        for k, v in self.maps["slotinfo"].items():
            slot = struct.unpack("<I", k)[0]
            ep_id, d = struct.unpack("<IB", v[:5])
            rid = v[5:11].hex()
            if ep_id in byid:
                byid[ep_id].slots[(d, rid)] = slot
                used.add(slot)
        self.next_slot = max(used, default=-1) + 1
        self.free_slots = sorted(set(range(self.next_slot)) - used, reverse=True)
        names: dict[int, str] = {}
        for idx, v in act["ifcfg"].items():
            bound = byid.get(struct.unpack("<I", v[4:8])[0])
            if bound is not None:  # an endpoint bound to this device: remember which device
                if not names:
                    names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in self.ipr.get_links()}
                bound.iface = names.get(idx)
        self.node_addrs = set()
        for k in self.maps["nodeaddrs"].all_keys():
            fam = k[0]
            self.node_addrs.add(ipaddress.ip_address(k[4:8] if fam == 4 else k[4:20]))
        self.eps = eps
        self._adopted = bool(eps)
        if eps:
            log.info("adopted pinned eBPF state: %d endpoints, slot %d", len(eps), self.slot)

    # ---------------------------------------------------------------- apply

    def _alloc_slot(self) -> int:
        if self.free_slots:
            slot = self.free_slots.pop()
        else:
            if self.next_slot >= self.sizes.slots:
                raise DataplaneError(f"eBPF map rule_stats is full ({self.sizes.slots} counter slots)")
            slot = self.next_slot
            self.next_slot += 1
        zero = struct.pack("<QQ", 0, 0)
        self.maps["rule_stats"].update(struct.pack("<I", slot), zero)
        return slot

    def _alloc_ep(self) -> int:
        assert self.eps is not None
        used = {e.ep_id for e in self.eps.values()}
        for _ in range(self.sizes.endpoints):
            cand = self.next_ep if self.next_ep < self.sizes.endpoints else 1
            self.next_ep = cand + 1
            if cand not in used:
                return cand
        raise DataplaneError(f"eBPF map epstate is full ({self.sizes.endpoints} endpoints)")

    def _write(self, name: str, items: Iterable[tuple[bytes, bytes]]) -> int:
        m = self.maps[name]
        n = 0
        for k, v in items:
            try:
                m.update(k, v)
            except bpfsys.BpfError as e:
                if e.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                    raise DataplaneError(
                        f"eBPF map {name} is full ({m.max_entries} entries): raise its size"
                    ) from e
                raise DataplaneError(f"updating eBPF map {name} failed: {e}") from e
            n += 1
        return n

    def _sync_slots(self, ep: EpState, tables: dict[Direction, DirTables]) -> None:
        want = {(DIR_CODE[d], rid) for d, t in tables.items() for rid in t.rule_ids}
        for key in want - set(ep.slots):
            slot = self._alloc_slot()
            ep.slots[key] = slot
            info = struct.pack("<IB", ep.ep_id, key[0]) + bytes.fromhex(key[1]) + b"\0"
            self._write("slotinfo", [(struct.pack("<I", slot), info)])

    def _release_slots(self, ep: EpState, keep: set[tuple[int, str]]) -> None:
        for key in list(ep.slots):
            if key not in keep:
                slot = ep.slots.pop(key)
                self.maps["slotinfo"].delete(struct.pack("<I", slot))
                self.free_slots.append(slot)

    def _check_capacity(self, program: Program, compiled: dict[str, dict[Direction, DirTables]]) -> None:
        assert self.eps is not None
        peers = ports = 0
        for key, tables in compiled.items():
            old = self.eps.get(key)
            for t in tables.values():
                a, b = t.entries
                peers, ports = peers + a, ports + b
            if old is not None and old.tables is not None and old.tables != tables:
                for t in old.tables.values():  # both generations live for a moment
                    a, b = t.entries
                    peers, ports = peers + a, ports + b
        addrs = sum(len(ep.ips) for ep in program.endpoints.values())
        slots = sum(len(t.rule_ids) for tables in compiled.values() for t in tables.values())
        for name, need, cap in (("peers", peers, self.sizes.peers), ("ports", ports, self.sizes.ports),
                                ("addrs", addrs, self.sizes.addrs),
                                ("epstate", len(compiled), self.sizes.endpoints - 1),
                                ("rule_stats", slots, self.sizes.slots)):
            if need > cap:
                raise DataplaneError(f"eBPF map {name} would need {need} entries, capacity is {cap}: "
                                     "raise its size")

    def apply(self, program: Program) -> ApplyStats:
        if self.eps is None:
            self._adopt()
        assert self.eps is not None
        self._resolve_hashed(program)
        memo: dict[DirectionProgram, DirTables] = {}  # endpoints selected alike share tables

        def tables_of(dp: DirectionProgram) -> DirTables:
            if dp not in memo:
                memo[dp] = compile_direction(dp)
            return memo[dp]

        compiled = {key: {d: tables_of(ep.direction(d)) for d in Direction}
                    for key, ep in program.endpoints.items()}
        self._check_capacity(program, compiled)
        try:
            return self._apply(program, compiled)
        except BaseException:
            # The kernel holds the old policy (failure before the flip) or the new one (after):
            # forget the model, the next apply adopts what is there (and sweeps what is not).
            self.eps = None
            raise

    def _resolve_hashed(self, program: Program) -> None:
        """Adopted endpoints whose key was stored as a digest get their key back from the
        program (one that no longer has it departs under its placeholder)."""
        assert self.eps is not None
        if not self._unresolved:
            return
        # out of the way first: a program key may spell another endpoint's placeholder
        pending = {ph: self.eps.pop(k) for ph, k in self._unresolved.items() if k in self.eps}
        for key in program.endpoints:
            value = epkey_value(key)
            if value[:1] == _HASHED and (st := pending.pop(epkey_name(value), None)) is not None:
                self.eps[key] = st
                self.hashed_names[value] = key
        self._unresolved = {}
        for ph, st in pending.items():  # not in this program (yet): back under a free name
            k = ph
            while k in program.endpoints or k in self.eps:
                k += "\0"
            self.eps[k] = st
            self._unresolved[ph] = k

    def _apply(self, program: Program, compiled: dict[str, dict[Direction, DirTables]]) -> ApplyStats:
        assert self.eps is not None
        old, new = self.slot, 1 - self.slot
        added = removed = written = 0
        known_devices = set(self.have[old]["ifcfg"]) | set(self.have[new]["ifcfg"])
        cmds = self._write("config", [(struct.pack("<I", 0),
                                       v_config(self.audit, self.sample_rate, self.sample_burst))])
        if self._adopted:
            # entries of generations the slot in force does not use (e.g. written by an agent
            # killed before its flip) go before any generation is written again
            removed += self._sweep()
        stale: list[tuple[str, bytes]] = []  # the replaced generations' entries, deleted after the flip
        retired: list[int] = []  # counter slots of taken-over endpoints, freed after the flip
        renamed: list[EpState] = []
        # node addresses first: they only ever widen node -> endpoint traffic
        node = self._node_addresses()
        new_na = node - self.node_addrs
        cmds += self._write("nodeaddrs", [(k_addr(ip), b"\1") for ip in new_na])
        # 1. new generations of every changed endpoint (nothing reads them before the flip)
        switched: list[tuple[EpState, int, dict[Direction, DirTables]]] = []
        fresh: list[tuple[str, bytes]] = []
        for key, ep in program.endpoints.items():
            tables = compiled[key]
            st = self.eps.get(key)
            if st is None:
                st = self._take_over(ep, program, stale, retired)
                if st is not None:
                    renamed.append(st)
                else:
                    st = EpState(self._alloc_ep(), 0, None)
                self.eps[key] = st
                value = epkey_value(key)
                if value[:1] == _HASHED:
                    self.hashed_names[value] = key
                cmds += self._write("epkeys", [(struct.pack("<I", st.ep_id), value)])
            st.iface = ep.interface
            if st.tables != tables:
                self._sync_slots(st, tables)
                gen = st.gen + 1
                peers, ports = _entries(st, tables, gen)
                try:
                    cmds += self._write("peers", peers)
                    fresh += [("peers", k) for k, _ in peers]
                    cmds += self._write("ports", ports)
                    fresh += [("ports", k) for k, _ in ports]
                except DataplaneError:
                    for m, k in fresh + [("peers", k) for k, _ in peers] + [("ports", k) for k, _ in ports]:
                        self.maps[m].delete(k)  # never flipped to: drop the half-written generations
                    raise
                if st.tables is not None:
                    old_peers, old_ports = _entries(st, st.tables, st.gen)
                    stale += [("peers", k) for k, _ in old_peers] + [("ports", k) for k, _ in old_ports]
                switched.append((st, gen, tables))
                added += len(peers) + len(ports)
                written += 1
        gens = {id(st): gen for st, gen, _ in switched}
        departed = [key for key in self.eps if key not in program.endpoints]
        # 2. what the slotted maps hold for the new policy
        want = _empty_slot()
        for key, ep in program.endpoints.items():
            st = self.eps[key]
            fl = (compiled[key][Direction.INGRESS].flags, compiled[key][Direction.EGRESS].flags)
            want["epstate"][st.ep_id] = v_epstate(gens.get(id(st), st.gen), *fl)
            for ip in ep.ips:
                want["addrs"][ip] = struct.pack("<I", st.ep_id)
        devices = self._find_interfaces(program)
        for idx, (host, bound) in devices.items():
            l3 = self._links[idx]["ifi_type"] != 1  # ARPHRD_ETHER
            want["ifcfg"][idx] = v_ifcfg(l3, host, bound)
        # 3. the inactive slot gets the new policy whole; devices are attached (a device
        # without an entry in the slot in force is not judged yet)
        cmds += self._write_slot(new, want)
        for idx in devices:
            self._attach(idx)
        # 4. the flip: one update switches every endpoint, address and device at once
        flipped = want != self.have[old]
        if flipped:
            self._flip(new)
            cmds += 1
        for st, gen, tables in switched:
            st.gen, st.tables = gen, tables
            self._release_slots(st, {(DIR_CODE[d], r) for d, t in tables.items() for r in t.rule_ids})
        for key, ep in program.endpoints.items():
            self.eps[key].addrs = set(ep.ips)
        # 5. after the grace period nothing reads the previous slot nor the replaced generations
        gone = [self.eps.pop(key) for key in departed]
        for key in departed:
            self.hashed_names.pop(epkey_value(key), None)
        for st in gone:
            if st.tables is not None:
                old_peers, old_ports = _entries(st, st.tables, st.gen)
                stale += [("peers", k) for k, _ in old_peers] + [("ports", k) for k, _ in old_ports]
        if flipped or stale or self._adopted:
            time.sleep(GRACE_S)
        for name, k in stale:
            self.maps[name].delete(k)
        removed += len(stale)
        cmds += len(stale)
        # a taken-over id starts its counters afresh under its new key (its old slots were
        # only referenced by the replaced generation)
        for slot in retired:
            self.maps["slotinfo"].delete(struct.pack("<I", slot))
            self.free_slots.append(slot)
        for st in renamed:
            for d in (0, 1):
                self.maps["drop_stats"].update(struct.pack("<I", st.ep_id * 2 + d), struct.pack("<QQ", 0, 0))
        for st in gone:
            self.maps["epkeys"].delete(struct.pack("<I", st.ep_id))
            self._release_slots(st, set())
            for d in (0, 1):
                self.maps["drop_stats"].update(struct.pack("<I", st.ep_id * 2 + d), struct.pack("<QQ", 0, 0))
            cmds += 1
        for idx in known_devices - set(want["ifcfg"]):
            self._detach(idx)
        # 6. the previous slot catches up: both slots alike until the next apply
        cmds += self._write_slot(old, want)
        if self._adopted:
            removed += self._sweep()
            self._adopted = False
        for ip in self.node_addrs - node:
            self.maps["nodeaddrs"].delete(k_addr(ip))
        self.node_addrs = node
        self._drop_old_builds()
        return ApplyStats(full=written == len(program.endpoints) and written > 0, commands=cmds,
                          elements_added=added, elements_removed=removed, chains_written=written)

    def _write_slot(self, slot: int, want: SlotContents) -> int:
        """Make one slot of the slotted maps hold `want` (the slot not in force, or the
        previous one after the grace period)."""
        n = 0
        for name in SLOTTED:
            have, key = self.have[slot][name], SLOT_KEY[name]
            for item, v in want[name].items():
                if have.get(item) != v:
                    n += self._write(name, [(key(item, slot), v)])
                    have[item] = v
            for item in set(have) - set(want[name]):
                self.maps[name].delete(key(item, slot))
                del have[item]
                n += 1
        return n

    def _flip(self, slot: int) -> None:
        """Switch every packet judged from now on to `slot`: one array update."""
        self.maps["active"].update(struct.pack("<I", 0), struct.pack("<I", slot))
        self.slot = slot

    def _take_over(self, ep: EndpointProgram, program: Program, stale: list[tuple[str, bytes]],
                   retired: list[int]) -> EpState | None:
        """A new endpoint bound to a device takes over the id of a departing endpoint bound
        to the same device (NetBird's bootstrap endpoint replaced by the local peer, or the
        peer renamed): its tables then change with the flip, the device's `ifcfg` entries
        stay as they are, and the flows recorded under the id (connections the node opened,
        whose replies must keep passing) survive. The old generation's entries and counter
        slots go after the flip."""
        assert self.eps is not None
        if ep.interface is None:
            return None
        prev = next((k for k, st in self.eps.items()
                     if st.iface == ep.interface and k not in program.endpoints), None)
        if prev is None:
            return None
        st = self.eps.pop(prev)
        if st.tables is not None:
            old_peers, old_ports = _entries(st, st.tables, st.gen)
            stale += [("peers", k) for k, _ in old_peers] + [("ports", k) for k, _ in old_ports]
        retired += st.slots.values()
        st.slots, st.tables = {}, None  # written afresh under generation gen + 1
        log.info("eBPF: endpoint %s takes over %s on %s (id %d)", display(ep.key, 300), display(prev, 300),
                 display(ep.interface, 64), st.ep_id)
        return st

    def _sweep(self) -> int:
        """After adoption: delete entries of generations the slot in force does not use."""
        assert self.eps is not None
        live = {(st.ep_id, st.gen) for st in self.eps.values()}
        n = 0
        for name in ("peers", "ports"):
            m = self.maps[name]
            for k in list(m.all_keys()):
                ep_id, gen = struct.unpack("<II", k[4:12])
                if (ep_id, gen) not in live:
                    m.delete(k)
                    n += 1
        return n

    def _node_addresses(self) -> set[IPAddress]:
        out: set[IPAddress] = set()
        for msg in self.ipr.get_addr():
            a = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
            if a:
                out.add(ipaddress.ip_address(a))
        return out

    # ---------------------------------------------------------------- interfaces

    def _routes(self) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]]:
        routes = []
        for fam in (socket.AF_INET, socket.AF_INET6):
            for msg in self.ipr.get_routes(family=fam, table=254):
                if msg.get_attr("RTA_GATEWAY") or msg.get_attr("RTA_MULTIPATH") or msg["dst_len"] == 0:
                    continue
                oif = msg.get_attr("RTA_OIF")
                dst = msg.get_attr("RTA_DST")
                if oif and dst:
                    routes.append((ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False), oif))
        return routes

    def _find_interfaces(self, program: Program) -> dict[int, tuple[bool, int]]:
        """ifindex -> (whether its endpoint is the node itself, id of the endpoint bound to
        it or 0), for every endpoint we enforce."""
        assert self.eps is not None
        routes = self._routes()
        links = {msg["index"]: msg for msg in self.ipr.get_links()}
        byname = {msg.get_attr("IFLA_IFNAME"): idx for idx, msg in links.items()}
        out: dict[int, tuple[bool, int]] = {}
        bound: dict[int, str] = {}
        before, self.unattached = self.unattached, {}
        for ep in program.endpoints.values():
            # attached even when nothing is enforced: flows are tracked for the replies
            if ep.interface:
                if ep.interface not in byname:
                    self.unattached[ep.key] = f"interface {ep.interface} does not exist"
                    continue
                # The node itself behind the device (as nftables judges it: iifname in
                # prerouting, oifname in output), bound to it: enforced with or without
                # addresses (NetBird's bootstrap endpoint has none).
                idx = byname[ep.interface]
                if idx in bound:
                    self.unattached[ep.key] = f"interface {ep.interface} is bound to {bound[idx]} already"
                    continue
                bound[idx] = ep.key
                out[idx] = (True, self.eps[ep.key].ep_id)
                continue
            host = any(ip in self.node_addrs for ip in ep.ips)
            idxs: set[int] = set()
            for ip in ep.ips:
                best = max((r for r in routes if ip in r[0]), key=lambda r: r[0].prefixlen, default=None)
                if best is not None:
                    idxs.add(best[1])
            if not idxs:
                self.unattached[ep.key] = "no directly connected route to its addresses"
                continue
            for i in idxs:
                h, b = out.get(i, (False, 0))
                out[i] = (h or host, b)
        for key, why in self.unattached.items():
            if before.get(key) != why:
                log.warning("eBPF: endpoint %s is not enforced: %s", display(key, 300), display(why, 300))
        self._links = links
        return out

    def _filter_names(self, idx: int) -> dict[int, str]:
        from pyroute2.netlink.exceptions import NetlinkError

        out = {}
        for hook, parent in PARENTS.items():
            try:
                msgs = self.ipr.get_filters(index=idx, parent=parent)
            except NetlinkError:  # no clsact qdisc on this device (yet)
                continue
            for m in msgs:
                if (m["info"] >> 16) != FILTER_PRIO or m.get_attr("TCA_KIND") != "bpf":
                    continue
                opts = m.get_attr("TCA_OPTIONS")
                name = opts.get_attr("TCA_BPF_NAME") if opts else None
                if name:
                    out[hook] = name
        return out

    def _attach(self, idx: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        have = self._filter_names(idx)
        for hook, parent in PARENTS.items():
            # the program id makes the name unique per load: a filter left by another load
            # of the same build (e.g. pins lost with a private mount namespace) is replaced
            name = f"stockade-{self.build}-{'in' if hook == 0 else 'eg'}-{self.prog_ids[hook]}"
            if have.get(hook) == name:
                continue
            try:
                self.ipr.tc("add", "clsact", idx)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise DataplaneError(f"cannot add clsact qdisc on ifindex {idx}: {e}") from e
            cmd = "replace-filter" if hook in have else "add-filter"
            try:
                self.ipr.tc(cmd, "bpf", idx, FILTER_HANDLE, fd=self.prog_fds[hook], name=name,
                            parent=parent, classid=1, direct_action=True, prio=FILTER_PRIO)
            except NetlinkError as e:
                raise DataplaneError(f"cannot attach eBPF filter on ifindex {idx}: {e}") from e

    def _detach(self, idx: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        for hook, parent in PARENTS.items():
            if hook not in self._filter_names(idx):
                continue
            try:
                self.ipr.tc("del-filter", "bpf", idx, FILTER_HANDLE, parent=parent, prio=FILTER_PRIO)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise DataplaneError(f"cannot detach eBPF filter on ifindex {idx}: {e}") from e

    def _drop_old_builds(self) -> None:
        for entry in os.listdir(self.pin_root):
            if entry != self.build:
                shutil.rmtree(f"{self.pin_root}/{entry}", ignore_errors=True)

    # ---------------------------------------------------------------- interface methods

    def render(self, program: Program) -> str:
        out = [f"# eBPF build {self.build}: maps under {self.pin_dir} (generation 1 shown)",
               f"config audit={int(self.audit)} sample_rate={self.sample_rate}/s burst={self.sample_burst}"]
        slot = 0
        for n, (key, ep) in enumerate(sorted(program.endpoints.items()), start=1):
            st = EpState(n, 1, None)
            tables = {d: compile_direction(ep.direction(d)) for d in Direction}
            for d, t in tables.items():
                for rid in t.rule_ids:
                    if (DIR_CODE[d], rid) not in st.slots:
                        st.slots[(DIR_CODE[d], rid)] = slot
                        slot += 1
            fl = {d.value: f"{'enforced' if t.flags & 1 else 'open'}{',isolated' if t.flags & 2 else ''}"
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
                    net = ipaddress.ip_network((addr, plen)) if fam == 4 else ipaddress.IPv6Network((addr, plen))
                    out.append(f"  peers {d.value} {net} -> class {cls}")
                for cls, entries in t.ports:
                    for (proto, has_port, port, plen), (verdict, idx) in sorted(entries.items()):
                        where = f"{port}/{plen}" if has_port else "no-port"
                        out.append(f"  ports {d.value} class {cls} {PROTO_NAME[proto]} {where} -> "
                                   f"{V_NAME[verdict]} rule {t.rule_ids[idx]} slot "
                                   f"{st.slots[(DIR_CODE[d], t.rule_ids[idx])]}")
        return "\n".join(out) + "\n"

    def counters(self, program: Program | None = None) -> Counters:
        """Per-rule and default-deny counters. Endpoint ids and counter slots are kept in
        pinned maps, so a fresh process (e.g. `stockade counters`) reads them too;
        `program` restricts the answer to its endpoints."""
        c = Counters()
        if self.eps is None:
            if not os.path.exists(f"{self.pin_dir}/stk_egress"):
                return c  # nothing loaded: nothing counted (and no compile just to read)
            self._adopt()
        assert self.eps is not None
        if program is not None:
            self._resolve_hashed(program)
        stats, drops = self.maps["rule_stats"], self.maps["drop_stats"]
        for key, st in self.eps.items():
            if program is not None and key not in program.endpoints:
                continue
            for (dc, rid), slot in st.slots.items():
                d = Direction.INGRESS if dc == 0 else Direction.EGRESS
                c.add_rule((key, rid, d), _sum(stats.lookup_percpu(struct.pack("<I", slot))))
            for d, dc in DIR_CODE.items():
                if program is not None:
                    isolated = program.endpoints[key].direction(d).isolated
                else:
                    isolated = st.tables is None or bool(st.tables[d].flags & F_ISOLATED)
                if isolated:
                    c.add_drop((key, d), _sum(drops.lookup_percpu(struct.pack("<I", st.ep_id * 2 + dc))))
        return c

    # ---------------------------------------------------------------- strict mode, drops

    def established(self) -> list[Flow]:
        """TCP/UDP/SCTP entries of the BPF flow table, in the direction of the packet that
        created them (the original direction: the side that opened the flow)."""
        if self.eps is None:
            self._adopt()
        index: dict[tuple, list[bytes]] = {}
        out: dict[tuple, Flow] = {}
        for k in self.maps["flows"].all_keys():
            fam, proto, sa, sp, da, dp = _flow_tuple(k)
            if proto not in conntrack.PROTOCOLS:
                continue
            t = (fam, proto, sa, sp, da, dp)
            index.setdefault(_unordered(t), []).append(k)
            if t not in out:
                out[t] = Flow(conntrack.PROTOCOLS[proto], ipaddress.ip_address(sa), ipaddress.ip_address(da), sp, dp)
        self._flow_keys = index
        return list(out.values())

    def forget(self, flows: list[Flow]) -> int:
        """Delete every entry of these flows: both orientations, at both endpoints, both
        directions (the keys `established` saw, and those the kernel would look up now)."""
        if self.eps is None:
            self._adopt()
        assert self.eps is not None
        by_ip = {ip: st.ep_id for st in self.eps.values() for ip in st.addrs}
        bound = {st.ep_id for st in self.eps.values() if st.iface}  # found by device for node addresses
        m = self.maps["flows"]
        n = 0
        for f in flows:
            fam, proto = f.src.version, conntrack.NUMBERS[f.protocol]
            t = (fam, proto, f.src.packed, f.sport, f.dst.packed, f.dport)
            keys = set(self._flow_keys.pop(_unordered(t), []))
            eps = {by_ip.get(f.src), by_ip.get(f.dst)} - {None}
            if f.src in self.node_addrs or f.dst in self.node_addrs:
                eps |= bound
            for ep in eps:
                assert ep is not None
                for d in (0, 1):
                    keys.add(k_flow(ep, d, fam, proto, f.src.packed, f.sport, f.dst.packed, f.dport))
                    keys.add(k_flow(ep, d, fam, proto, f.dst.packed, f.dport, f.src.packed, f.sport))
            gone = [m.delete(k) for k in keys]
            n += any(gone)
        return n

    def node_addresses(self) -> list[IPAddress]:
        return sorted(self._node_addresses(), key=lambda ip: (ip.version, ip))

    def drop_log(self) -> DropLog | None:
        """Sampled drops from the pinned `samples` queue (opened on first read: the daemon
        asks before its first sync may have compiled the build)."""
        if self.sample_rate <= 0:
            return None
        return EbpfDropLog(self.pin_dir, self.hashed_names)

    def map_fill(self) -> dict[str, float]:
        if self.eps is None:
            return {}
        return {name: n / cap for name, (n, cap) in self.fill(walk=False).items() if cap}

    def objects(self) -> dict[str, int]:
        """Programmed map entries by map (the policy maps; flows are not walked here)."""
        if self.eps is None:
            return {}
        return {name: n for name, (n, _) in self.fill(walk=False).items()}

    def fill(self, walk: bool = True) -> dict[str, tuple[int, int]]:
        """Entries and capacity per map; `walk`: also count the LRU flows and frags maps by
        walking them (one syscall per entry)."""
        if self.eps is None:
            self._adopt()
        assert self.eps is not None
        peers = ports = 0
        for st in self.eps.values():
            for t in (st.tables or {}).values():
                a, b = t.entries
                peers, ports = peers + a, ports + b
        out = {
            "epstate": (len(self.eps), self.sizes.endpoints),
            "addrs": (sum(len(s.addrs) for s in self.eps.values()), self.sizes.addrs),
            "peers": (peers, self.sizes.peers),
            "ports": (ports, self.sizes.ports),
            "rule_stats": (sum(len(s.slots) for s in self.eps.values()), self.sizes.slots),
            "ifcfg": (len(self.have[self.slot]["ifcfg"]), self.sizes.ifaces),
            "nodeaddrs": (len(self.node_addrs), self.sizes.node_addrs),
        }
        if walk:
            out["flows"] = (self.maps["flows"].count(), self.sizes.flows)
            out["frags"] = (self.maps["frags"].count(), self.sizes.frags)
        return out

    def cleanup(self) -> None:
        """Detach every filter we own in this netns and unpin everything under pin_root."""
        from pyroute2.netlink.exceptions import NetlinkError

        for msg in self.ipr.get_links():
            idx = msg["index"]
            for hook, name in self._filter_names(idx).items():
                if not name.startswith("stockade-"):
                    continue
                try:
                    self.ipr.tc("del-filter", "bpf", idx, FILTER_HANDLE, parent=PARENTS[hook], prio=FILTER_PRIO)
                except NetlinkError as e:
                    if e.code not in (errno.ENOENT, errno.ENODEV):
                        raise DataplaneError(f"cannot detach eBPF filter on ifindex {idx}: {e}") from e
        for m in self.maps.values():
            m.close()
        for fd in self.prog_fds.values():
            os.close(fd)
        self.maps, self.prog_fds, self.eps = {}, {}, None
        self.have = [_empty_slot(), _empty_slot()]
        self.node_addrs = set()
        if os.path.isdir(self.pin_root):
            shutil.rmtree(self.pin_root)


def _sum(values: list[bytes]) -> Count:
    p = b = 0
    for v in values:
        vp, vb = struct.unpack("<QQ", v[:16])
        p, b = p + vp, b + vb
    return Count(p, b)


def _unordered(t: tuple) -> tuple:
    """A flow tuple and its reverse, as one key."""
    fam, proto, sa, sp, da, dp = t
    return (fam, proto, *sorted(((sa, sp), (da, dp))))


class EbpfDropLog(DropLog):
    """Drains the kernel's `samples` queue (pop = BPF_MAP_LOOKUP_AND_DELETE_ELEM; no bcc, no
    ring buffer). Endpoint keys and rule ids are read from the pinned `epkeys` and
    `slotinfo` maps with their own fds, so this runs on its own thread next to `apply`."""

    POLL_S = 0.05

    def __init__(self, pin_dir: str, hashed_names: dict[bytes, str] | None = None) -> None:
        self.pin_dir = pin_dir
        self.hashed_names = {} if hashed_names is None else hashed_names  # see EbpfDataplane
        self.maps: dict[str, bpfsys.Map] = {}

    def _open(self) -> bool:
        if not self.maps:
            try:
                for name in ("samples", "epkeys", "slotinfo"):
                    self.maps[name] = bpfsys.Map.pinned(f"{self.pin_dir}/{name}")
            except OSError:
                self.close()
                return False
        return True

    def read(self, timeout: float) -> list[DropEvent]:
        end = time.monotonic() + timeout
        while True:
            out = []
            if self._open():
                while (raw := self.maps["samples"].pop()) is not None:
                    ev = self._event(raw)
                    if ev is not None:
                        out.append(ev)
            if out or time.monotonic() >= end:
                return out
            time.sleep(min(self.POLL_S, max(0.0, end - time.monotonic())))

    def _event(self, raw: bytes) -> DropEvent | None:
        ep_id, slot, d, fam, l4, flags = struct.unpack("<IIBBBB", raw[:12])
        sport, dport = struct.unpack(">HH", raw[12:16])
        value = self.maps["epkeys"].lookup(struct.pack("<I", ep_id))
        if value is None:
            return None  # endpoint gone meanwhile
        rule_id = None
        if slot != NO_SLOT:
            info = self.maps["slotinfo"].lookup(struct.pack("<I", slot))
            if info is None or struct.unpack("<IB", info[:5]) != (ep_id, d):
                return None  # slot released (and maybe reused) meanwhile: never misattribute
            rule_id = info[5:11].hex()
        n = 4 if fam == 4 else 16
        ported = bool(flags & S_PORTS)
        return DropEvent(
            self.hashed_names.get(value) or epkey_name(value), Direction.INGRESS if d == 0 else Direction.EGRESS,
            rule_id, nflog.L4_NAMES.get(l4, str(l4)), str(ipaddress.ip_address(raw[16 : 16 + n])),
            str(ipaddress.ip_address(raw[32 : 32 + n])), sport if ported else None, dport if ported else None,
            audit=bool(flags & S_AUDIT),
        )

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps = {}
