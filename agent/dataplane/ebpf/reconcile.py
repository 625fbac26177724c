"""The double-buffered switch: `Reconciler` makes the pinned maps hold a Program, every
change switched in with one map update (docs/ebpf.md, "Atomicity"), and rebuilds its
model from the pinned maps after a restart ("Restart adoption")."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import shutil
import struct
import sys
import threading
import time
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from agent.dataplane.base import ApplyStats, DataplaneError, LearnedEntry
from agent.dataplane.ebpf import bpfsys, builds
from agent.dataplane.ebpf.attach import Devices
from agent.dataplane.ebpf.flows import FlowTable
from agent.dataplane.ebpf.layout import (
    DIR_EGRESS,
    F_LEARNED,
    HALVED,
    LIMIT,
    ZERO_STAT,
    AddrKey,
    HalfKey,
    IfCfg,
    LearnKey,
    Sizes,
    counter_owner,
    epkey_name,
    epkey_value,
    ip_of,
    is_hashed,
    k_addr,
    k_half,
    k_learn,
    learn_owner,
    learn_stages,
    read_u32,
    u32,
    unpack,
    v_config,
    v_counter_info,
    v_epstate,
    v_ifcfg,
)
from agent.dataplane.ebpf.learning import LearnGen, Memory, compute, endpoint_of, learned_index, restore
from agent.dataplane.ebpf.tables import (
    DIR_CODE,
    DirTables,
    Entry,
    KeyCache,
    compile_direction,
    entry_keys,
    port_items,
)
from agent.dataplane.escape import display
from agent.ir import Direction, DirectionProgram, EndpointProgram, IPAddress, Program, Rule

log = logging.getLogger(__name__)

# The smallest maps a first build gets, e.g. `peers=64,ports=64` (tests force growth with it).
SIZES_ENV = "STOCKADE_EBPF_SIZES"
GRACE_S = 0.02  # after a flip: packets judged under the previous half are done (in flight)

HalfContents = dict[str, dict]
"""One half of the double-buffered maps: map name -> {ifindex / endpoint id / address: value}."""
HALF_KEY = {"ifcfg": k_half, "epstate": k_half, "addrs": k_addr}
_EP_GEN = struct.Struct("<II")  # (ep_id, gen) at offset 4 of both a peer_key and a port_key
_CLS = struct.Struct("<I")  # a port_key's class, at offset 12 (its direction at 16)


def empty_half() -> HalfContents:
    return {name: {} for name in HALVED}


def _half_item(name: str, k: bytes) -> tuple[int, object]:
    """(half, item) of a double-buffered map's key."""
    if name == "addrs":
        a = unpack(AddrKey, k)
        return a.half, ipaddress.ip_address(ip_of(a.family, a.addr))
    h = unpack(HalfKey, k)
    return h.half, h.id


@dataclass
class Deferred:
    """What an apply leaves for after the grace following its flip (`Reconciler._settle`)."""

    since: float  # monotonic time of the flip
    stale: Stale  # the replaced generations' entries
    retired: list[int]  # rule counters no generation in force references
    gone: list[int]  # ids of departed endpoints (epkeys entry, drop counters)
    detach: set[int]  # devices no endpoint needs any more
    node_gone: set[IPAddress]  # node addresses no longer on the node
    sweep: bool  # after an adoption: delete every generation not in force
    learned: int = 0  # how many of `stale` are `learned` entries


@dataclass
class Stale:
    """Entries to delete after a flip: replaced generations of `peers`/`ports` as (endpoint
    id, generation, tables), their keys made when they are deleted (held as keys until the
    next apply, a policy change touching every endpoint kept ~30 MB of them at 10k pods),
    and other entries (`learned`, learned classes' `ports`) as keys."""

    gens: list[tuple[int, int, dict[Direction, DirTables]]] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)

    def gen(self, ep_id: int, gen: int, tables: dict[Direction, DirTables]) -> None:
        self.gens.append((ep_id, gen, tables))

    def __len__(self) -> int:
        return len(self.entries) + sum(sum(t.entries) for _, _, tables in self.gens for t in tables.values())


@dataclass
class EpState:
    """What the kernel holds for one endpoint (besides its double-buffered entries)."""

    ep_id: int
    gen: int  # the generation of its peers/ports entries in force
    tables: dict[Direction, DirTables] | None  # None: adopted, contents unknown
    counters: dict[tuple[int, str], int] = field(default_factory=dict)  # (dir, rule id) -> rule_stats index
    iface: str | None = None  # device the endpoint is bound to (EndpointProgram.interface)
    rules: tuple[Rule, ...] = ()  # its egress rules as last applied (learned destinations' classes)
    isolated: bool = False  # its egress isolation as last applied
    lindex: dict[str, tuple[int, ...]] = field(default_factory=dict)  # learned rule key -> rule indices
    lg: LearnGen | None = None  # its learned destinations at generation `gen` (None: none written)


def _shape(dp: DirectionProgram) -> tuple[object, ...]:
    """Everything `compile_direction` reads from a direction program, with peer sets by
    identity: equal shapes compile to equal tables (peer sets equal in value but not in
    identity only cost a compile; `PeerSet.of` hands out one object per content)."""
    return (dp.isolated, tuple((r.origin, id(r.peers) if r.peers is not None else None, r.ports, r.verdict, r.key)
                               for r in dp.rules))


_EG = 8  # bytes of (ep_id, gen) in a key


def _run_end(col: bytes, i: int, n: int) -> int:
    """The end of the run of equal (ep_id, gen) starting at entry i of a batch's column of
    them, found with whole-slice comparisons (no object per entry): the batch's end if it
    runs that far (the usual case: ~4k entries an endpoint at 50k pods), else galloped to."""
    e = col[i * _EG:(i + 1) * _EG]

    def same(j: int) -> bool:  # entries i..j-1 all have e (true up to the run's end, then false)
        return col[i * _EG:j * _EG] == e * (j - i)

    if same(n):
        return n
    lo, step = i + 1, 1  # same(lo); same(n) is false
    while (hi := i + 1 + step) < n and same(hi):
        lo, step = hi, step * 2
    hi = min(hi, n)
    while hi - lo > 1:  # same(lo), not same(hi)
        mid = (lo + hi) // 2
        if same(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _runs(m: bpfsys.Map, keep: Container[tuple[int, int]], live: Container[tuple[int, int]],
          dead: list[bytes]) -> Iterator[tuple[tuple[int, int], bytes, bytes]]:
    """A `peers` or `ports` map read a batch at a time, as runs of entries of one (endpoint
    id, generation) in the order listed: (that pair, its keys and values laid end to end
    if it is in `keep`, else empty); the keys of pairs not in `live` appended to `dead`."""
    ks, vs = m.key_size, m.value_size
    cur: tuple[int, int] | None = None
    have_k: list[bytes] = []
    have_v: list[bytes] = []
    for keys, values in m.scan_packed():
        n = len(keys) // ks
        column = bytearray(_EG * n)  # each entry's (ep_id, gen): a strided copy per byte
        for j in range(_EG):
            column[j::_EG] = keys[4 + j::ks]
        col = bytes(column)
        i = 0
        while i < n:
            end = _run_end(col, i, n)
            eg = _EP_GEN.unpack_from(col, i * _EG)
            if eg != cur:
                if cur is not None:
                    yield cur, b"".join(have_k), b"".join(have_v)
                cur, have_k, have_v = eg, [], []
            if eg not in live:
                dead += [keys[j * ks:(j + 1) * ks] for j in range(i, end)]
            elif eg in keep:
                have_k.append(keys[i * ks:end * ks])
                have_v.append(values[i * vs:end * vs])
            i = end
    if cur is not None:
        yield cur, b"".join(have_k), b"".join(have_v)


def _items(keys: bytes, values: bytes, ks: int, vs: int) -> dict[bytes, bytes]:
    return {keys[i * ks:(i + 1) * ks]: values[i * vs:(i + 1) * vs] for i in range(len(keys) // ks)}


class Reconciler:
    """Keeps the pinned maps equal to the last applied Program: loads (or compiles) the
    build, adopts what a previous agent left, and switches every change in at once
    through the double-buffered maps (docs/ebpf.md, "Atomicity")."""

    def __init__(self, sizes: Sizes | None = None, pin_root: str | None = None, netns: str | None = None,
                 python: str | None = None, audit: bool = False, sample_rate: float = 10.0,
                 sample_burst: int = 20, limit: Sizes | None = None) -> None:
        # `sizes`: the smallest maps a first build gets (a program needing more gets
        # HEADROOM x its need); `limit`: the most a map grows to ("Sizes and growth")
        env = os.environ.get(SIZES_ENV)
        self.floor = sizes or (Sizes.parse(env) if env else Sizes())
        self.limit = limit or LIMIT
        self.sizes = self.floor  # the sizes of the build in use (set by _load)
        # the last program whose map needs did not fit within `limit`: map -> (need, capacity)
        self.refused: dict[str, tuple[int, int]] = {}
        # Runtime settings (the `config` map, written by apply): audit mode passes judged
        # drops; drops are sampled at `sample_rate` per second (0: not at all) after a
        # burst of `sample_burst`, per endpoint, direction and CPU.
        self.audit = audit
        self.sample_rate = sample_rate
        self.sample_burst = sample_burst
        self.pin_root = (pin_root or os.environ.get(builds.PIN_ROOT_ENV) or builds.PIN_ROOT).rstrip("/")
        self.netns = netns  # named netns for routes, addresses and tc (None: the current one)
        self.python = python or sys.executable
        self.build = builds.build_id(self.sizes)
        self.pin_dir = f"{self.pin_root}/{self.build}"
        self.devices = Devices(netns, self.build)
        self.growths = 0  # builds switched to because maps grew (this process)
        self.flow_table = FlowTable()
        self.maps: dict[str, bpfsys.Map] = {}
        self.prog_fds: dict[int, int] = {}
        self.prog_ids: dict[int, int] = {}
        self.eps: dict[str, EpState] | None = None  # None: not yet loaded/adopted
        self.half = 0  # the half of the double buffer in force (`active`)
        # what each half of the double-buffered maps holds (both alike between applies)
        self.have: list[HalfContents] = [empty_half(), empty_half()]
        self.node_addrs: set[IPAddress] = set()
        self.free_counters: list[int] = []
        self.next_counter = 0
        self.next_ep = 1
        self._config: bytes | None = None  # the `config` value written (None: unknown)
        self._adopted = False
        # peers/ports keys of generations not in force, read by _verify_adopted, for the sweep in
        # the same apply's _apply
        # (no entry of either map is written between them; a growth copies them as they are)
        self._read_keys: dict[str, list[bytes]] | None = None
        # epkeys values stored as a digest -> their key, for drop events (read on the drop
        # log's thread: only single get/set operations on it)
        self.hashed_names: dict[bytes, str] = {}
        # adopted endpoints whose epkeys value is a digest: placeholder -> their key in eps
        self._unresolved: dict[str, str] = {}
        self.last_load: dict[str, object] = {}
        self._deferred: Deferred | None = None  # the last apply's work left for after its grace
        self._dropped_at = -1  # `growths` when old builds were last removed
        # (endpoint key, direction) -> (its DirectionProgram, `_shape`, tables) as of the
        # last apply (holding the program keeps the peer sets `_shape` names by id alive)
        self._compiled: dict[tuple[str, Direction], tuple[DirectionProgram, tuple[object, ...], DirTables]] = {}
        # destinations learned from DNS answers (`learn`): kept across generations; a
        # restarted agent reads back those of the endpoints whose tables it keeps
        self.memory = Memory()
        self._lock = threading.RLock()  # `apply` and `learn` (the DNS hold's thread)

    # ---------------------------------------------------------------- plumbing

    def close(self) -> None:
        if self._deferred is not None and self.eps is not None and self.maps:
            try:  # best effort: a next agent's adoption sweeps whatever is left
                self._settle()
            except (OSError, DataplaneError) as e:
                log.warning("eBPF: deferred clean-up on close failed: %s", e)
        self._deferred = None
        for m in self.maps.values():
            m.close()
        for fd in self.prog_fds.values():
            os.close(fd)
        self.maps, self.prog_fds, self.eps = {}, {}, None
        self.devices.close()

    def _use(self, sizes: Sizes) -> None:
        """Make the build of these sizes the one `_open` opens (and tc filters name)."""
        self.sizes = sizes
        self.build = builds.build_id(sizes)
        self.pin_dir = f"{self.pin_root}/{self.build}"
        self.devices.build = self.build

    def _load(self, need: dict[str, int] | None = None) -> None:
        """Open the build in use: a build of this source already pinned (the one tc filters
        run, after a restart mid-growth), else one sized for `need` (the floor without),
        compiled in a child."""
        if self.maps:
            return
        builds.ensure_bpffs(self.pin_root)
        found = builds.existing(self.pin_root)
        if found:
            self._use(self._pick(found))
        elif need is not None:
            self._use(self.floor.fit(need, self.limit))
        self._open()

    def _pick(self, found: list[tuple[str, Sizes]]) -> Sizes:
        """Of several complete builds (an agent killed while switching to grown maps), the
        one most devices run (each holds the whole policy), then the largest."""
        if len(found) == 1:
            return found[0][1]
        runs: dict[str, int] = {}
        for idx in self.devices.names():
            for name in self.devices.filter_names(idx).values():
                b = name.split("-")[1] if name.startswith("stockade-") else ""
                runs[b] = runs.get(b, 0) + 1
        return max(found, key=lambda f: (runs.get(f[0], 0), f[1].peers, f[1].ports, f[1].endpoints))[1]

    def _open(self) -> None:
        """Open the pinned objects of the build in use, compiling them in a child if absent."""
        if not builds.is_built(self.pin_dir):
            self.last_load = builds.compile_build(self.pin_dir, self.sizes, self.python)
            log.info("compiled and pinned eBPF build %s: %s", self.build, self.last_load)
        try:
            for name in builds.MAPS:
                self.maps[name] = bpfsys.Map.pinned(f"{self.pin_dir}/{name}")
            for hook, name in enumerate(builds.PROGRAMS):
                self.prog_fds[hook] = bpfsys.obj_get(f"{self.pin_dir}/{name}")
                self.prog_ids[hook] = bpfsys.prog_id(self.prog_fds[hook])
        except OSError as e:
            self.close()
            raise DataplaneError(f"cannot open pinned eBPF objects in {self.pin_dir}: {e}") from e

    def _adopt(self, need: dict[str, int] | None = None) -> None:
        """Rebuild the model from pinned maps a previous agent left behind: the half in force
        from `active`, endpoints, generations and devices from that half's entries (the
        other half may be half-written: it is only ever rewritten), rule counters."""
        self._load(need)
        self._unresolved = {}
        self._config = None
        raw = self.maps["active"].lookup(u32(0))
        self.half = read_u32(raw) & 1 if raw else 0
        self.have = [empty_half(), empty_half()]
        for name in HALVED:
            for k, v in self.maps[name].items():
                half, item = _half_item(name, k)
                if half > 1:  # never written by us: make sure it goes
                    self.maps[name].delete(k)
                    continue
                self.have[half][name][item] = v
        act = self.have[self.half]
        eps: dict[str, EpState] = {}
        byid: dict[int, EpState] = {}
        for k, v in self.maps["epkeys"].items():
            ep_id = read_u32(k)
            name = epkey_name(v)
            if is_hashed(v):
                self._unresolved[name] = name
            st = act["epstate"].get(ep_id)
            gen = read_u32(st) if st else 0
            eps[name] = byid[ep_id] = EpState(ep_id, gen, None)
            self.next_ep = max(self.next_ep, ep_id + 1)
        used = set()
        for k, v in self.maps["counterinfo"].items():
            counter = read_u32(k)
            ep_id, d, rid = counter_owner(v)
            if ep_id in byid:
                byid[ep_id].counters[(d, rid)] = counter
                used.add(counter)
        self.next_counter = max(used, default=-1) + 1
        self.free_counters = sorted(set(range(self.next_counter)) - used, reverse=True)
        names: dict[int, str] = {}
        for idx, v in act["ifcfg"].items():
            bound = byid.get(unpack(IfCfg, v).ep_id)
            if bound is not None:  # an endpoint bound to this device: remember which device
                names = names or self.devices.names()
                bound.iface = names.get(idx)
        self.node_addrs = set()
        for k in self.maps["nodeaddrs"].all_keys():
            a = unpack(AddrKey, k)
            self.node_addrs.add(ipaddress.ip_address(ip_of(a.family, a.addr)))
        self.eps = eps
        self._adopted = bool(eps)
        if eps:
            log.info("adopted pinned eBPF state: %d endpoints, half %d", len(eps), self.half)

    # ---------------------------------------------------------------- apply

    def _alloc_counter(self) -> int:
        if self.free_counters:
            counter = self.free_counters.pop()
        else:
            if self.next_counter >= self.sizes.counters:
                raise DataplaneError(f"eBPF map rule_stats is full ({self.sizes.counters} rule counters)")
            counter = self.next_counter
            self.next_counter += 1
        self.maps["rule_stats"].update(u32(counter), ZERO_STAT)
        return counter

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
        items = list(items)
        try:
            m.update_many(items)  # batch commands: one syscall per few thousand entries
        except bpfsys.BpfError as e:
            if e.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                raise DataplaneError(f"eBPF map {name} is full ({m.max_entries} entries)") from e
            raise DataplaneError(f"updating eBPF map {name} failed: {e}") from e
        return len(items)

    def _write_packed(self, name: str, keys: bytes, values: bytes) -> int:
        """`_write` of entries laid end to end (`bpfsys.Map.update_packed`)."""
        m = self.maps[name]
        try:
            m.update_packed(keys, values)
        except bpfsys.BpfError as e:
            if e.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                raise DataplaneError(f"eBPF map {name} is full ({m.max_entries} entries)") from e
            raise DataplaneError(f"updating eBPF map {name} failed: {e}") from e
        return len(keys) // m.key_size

    def _sync_counters(self, ep: EpState, tables: dict[Direction, DirTables]) -> None:
        want = {(DIR_CODE[d], rid) for d, t in tables.items() for rid in t.rule_ids}
        for key in want - set(ep.counters):
            counter = self._alloc_counter()
            ep.counters[key] = counter
            self._write("counterinfo", [(u32(counter), v_counter_info(ep.ep_id, *key))])

    def _release_counters(self, counters: Iterable[int]) -> None:
        for counter in counters:
            self.maps["counterinfo"].delete(u32(counter))
            self.free_counters.append(counter)

    def _need(self, program: Program, compiled: dict[str, dict[Direction, DirTables]]) -> dict[str, int]:
        """Entries each growing map must hold while `program` is applied: both generations
        of a changed endpoint, departing endpoints' ids and counters until the flip."""
        eps = self.eps or {}
        peers = ports = 0
        for key, tables in compiled.items():
            old = eps.get(key)
            # an adopted endpoint's entries are unknown: count them as large as the new ones
            gens = 1 if old is not None and old.tables == tables else 2
            for t in tables.values():
                a, b = t.entries
                peers, ports = peers + a, ports + b
            if gens == 2 and old is not None and old.tables is not None:
                for t in old.tables.values():
                    a, b = t.entries
                    peers, ports = peers + a, ports + b
            elif gens == 2 and old is not None:
                for t in tables.values():
                    a, b = t.entries
                    peers, ports = peers + a, ports + b
        for key, st in eps.items():  # departing: still there until the flip
            if key not in compiled and st.tables is not None:
                for t in st.tables.values():
                    a, b = t.entries
                    peers, ports = peers + a, ports + b
        addrs = sum(len(ep.ips) for ep in program.endpoints.values())
        counters = sum(len(t.rule_ids) for tables in compiled.values() for t in tables.values())
        counters += sum(len(st.counters) for st in eps.values())
        for st in eps.values():  # learned destinations' own classes, both generations
            ports += 2 * len(st.lg.ports) if st.lg is not None else 0
        # learned: room for both generations of every learned destination, so the map grows
        # at an apply (never at a `learn`: the hold does not wait for a build) once half
        # full; never a reason to refuse a program (capped at the limit)
        learned = min(2 * self.memory.n, self.limit.learned)
        return {"peers": peers, "ports": ports, "addrs": addrs, "epstate": len(set(compiled) | set(eps)),
                "rule_stats": counters, "learned": learned}

    def _ensure_capacity(self, need: dict[str, int]) -> None:
        """Grow the maps the need does not fit (a new build, filled, then switched to), or
        refuse the program, before anything of it is written: the last good state stays."""
        over = self.sizes.over(need)
        if not over:
            self.refused = {}
            return
        beyond = self.limit.over(need)
        if beyond:
            self.refused = beyond
            what = ", ".join(f"{name} would need {n} entries, the most it grows to is {cap}"
                             for name, (n, cap) in sorted(beyond.items()))
            raise DataplaneError(f"eBPF map full: {what}; the previous policy stays in force")
        self._grow(self.sizes.fit(need, self.limit), over)
        self.refused = {}

    def _grow(self, sizes: Sizes, over: dict[str, tuple[int, int]]) -> None:
        """Switch to a build with larger maps holding exactly what the current one holds:
        compile it, copy every map (same ids, generations, halves and counters, so the
        model stays true), repoint each device's tc filters (each replace is atomic per
        hook, and both builds hold the same policy, so a packet is judged alike by
        either), then copy the flows the old programs recorded meanwhile. The caller
        then applies the new program to it as usual (one flip). On failure the old build
        stays in force, untouched."""
        assert self.eps is not None
        old_sizes, old_maps, old_fds, old_ids = self.sizes, self.maps, self.prog_fds, self.prog_ids
        what = ", ".join(f"{name} {n}/{cap}" for name, (n, cap) in sorted(over.items()))
        log.warning("eBPF maps too small for the program (%s): growing to build %s", what,
                    builds.build_id(sizes))
        self._use(sizes)
        self.maps, self.prog_fds, self.prog_ids = {}, {}, {}
        try:
            self._open()
            copied = self._copy_maps(old_maps)
            for idx in self.have[self.half]["ifcfg"]:
                self.devices.attach(idx, self.prog_fds, self.prog_ids)
        except BaseException:
            # the old build still runs wherever a filter was not yet replaced, and holds the
            # same policy where it was: put every device back on it, keep it
            self._close_maps()
            new_dir = self.pin_dir
            self._use(old_sizes)
            self.maps, self.prog_fds, self.prog_ids = old_maps, old_fds, old_ids
            for idx in self.have[self.half]["ifcfg"]:
                self.devices.attach(idx, self.prog_fds, self.prog_ids)
            shutil.rmtree(new_dir, ignore_errors=True)
            self.eps = None  # the next apply re-reads what the kernel holds
            raise
        time.sleep(GRACE_S)  # packets the old programs were judging are done
        for name in ("flows", "frags"):  # recorded by the old programs while filters moved
            if old_maps[name].id != self.maps[name].id:  # (shared by both builds: nothing to do)
                self._copy(old_maps[name], self.maps[name])
        for name, values in copied.items():  # and what they counted meanwhile
            self._add_counts(old_maps[name], self.maps[name], values)
        for m in old_maps.values():
            m.close()
        for fd in old_fds.values():
            os.close(fd)
        self.growths += 1
        log.warning("eBPF maps grown: now build %s (%s)", self.build, ", ".join(
            f"{name} {cap}" for name, cap in self.sizes.capacity().items() if cap != old_sizes.capacity()[name]))

    def _close_maps(self) -> None:
        for m in self.maps.values():
            m.close()
        for fd in self.prog_fds.values():
            os.close(fd)
        self.maps, self.prog_fds, self.prog_ids = {}, {}, {}

    @staticmethod
    def _copy(src: bpfsys.Map, dst: bpfsys.Map, keys: Iterable[bytes] | None = None) -> None:
        for k in src.all_keys() if keys is None else keys:
            v = src.lookup(k)
            if v is not None:
                dst.update(k, v)

    def _copy_maps(self, old: dict[str, bpfsys.Map]) -> dict[str, dict[bytes, bytes]]:
        """Every map of the old build into the new one (the per-CPU arrays only at the
        indexes in use; the `samples` queue is left to drain). Returns the counter values
        copied, per counter map."""
        assert self.eps is not None
        arrays = {"rule_stats": [u32(c) for st in self.eps.values() for c in st.counters.values()],
                  "drop_stats": [u32(st.ep_id * 2 + d) for st in self.eps.values() for d in (0, 1)],
                  "sample_tat": []}
        copied: dict[str, dict[bytes, bytes]] = {}
        for name in builds.MAPS:
            if name == "samples":
                continue
            if name in ("rule_stats", "drop_stats"):
                copied[name] = {k: v for k in arrays[name] if (v := old[name].lookup(k)) is not None}
                for k, v in copied[name].items():
                    self.maps[name].update(k, v)
                continue
            if old[name].id != self.maps[name].id:  # flows, frags: shared by both builds
                self._copy(old[name], self.maps[name], arrays.get(name))
        return copied

    @staticmethod
    def _add_counts(old: bpfsys.Map, new: bpfsys.Map, copied: dict[bytes, bytes]) -> None:
        """Add to the new per-CPU counters what the old ones counted since they were copied
        (every value a run of u64 packets/bytes pairs, one per CPU)."""
        for k, then in copied.items():
            now, cur = old.lookup(k), new.lookup(k)
            if now is None or cur is None or now == then:
                continue
            n = len(now) // 8
            a, b, c = (struct.unpack(f"<{n}Q", x) for x in (now, then, cur))
            new.update(k, struct.pack(f"<{n}Q", *((z + x - y) & (2**64 - 1) for x, y, z in zip(a, b, c, strict=True))))

    def _compile(self, program: Program) -> dict[str, dict[Direction, DirTables]]:
        """Every endpoint direction's tables: the previous apply's when its DirectionProgram
        is the same object or alike (the incremental compiler keeps unchanged ones), else
        compiled, once per distinct program (endpoints selected alike share tables).
        Programs are told alike by `_shape`, not by value: hashing or comparing large peer
        sets by value costs as much as compiling them."""
        prev, self._compiled = self._compiled, {}
        memo: dict[tuple[object, ...], DirTables] = {}
        peer_keys: KeyCache = {}  # each peer set's prefixes as ints, once per apply
        out: dict[str, dict[Direction, DirTables]] = {}
        for key, ep in program.endpoints.items():
            per: dict[Direction, DirTables] = {}
            for d in Direction:
                dp = ep.direction(d)
                was = prev.get((key, d))
                if was is not None and was[0] is dp:
                    shape, t = was[1], was[2]
                else:
                    shape = _shape(dp)
                    if was is not None and was[1] == shape:
                        t = was[2]
                    elif (t := memo.get(shape)) is None:
                        t = memo[shape] = compile_direction(dp, peer_keys)
                per[d] = t
                self._compiled[(key, d)] = (dp, shape, t)
            out[key] = per
        return out

    def apply(self, program: Program) -> ApplyStats:
        with self._lock:
            return self._apply_locked(program)

    def _apply_locked(self, program: Program) -> ApplyStats:
        compiled = self._compile(program)
        if self.eps is None:
            if self._deferred is not None:  # a failed apply: adoption (and its sweep) redoes it all
                self._wait_grace(self._deferred)
                self._deferred = None
            self._adopt(self._need(program, compiled))  # a first build is sized for this program
        assert self.eps is not None
        try:
            settled = self._settle()  # before `_need`: the stale entries are gone by then
        except BaseException:
            self.eps = None
            raise
        self._resolve_hashed(program)
        if self._adopted:
            self._verify_adopted(compiled, program)
        else:  # the lazy sweep of expired learned entries (at the generations in force)
            self._relearn(self.memory.expire(time.monotonic()), time.monotonic())
        self._ensure_capacity(self._need(program, compiled))
        try:
            stats = self._apply(program, compiled)
            return dataclasses.replace(stats, elements_removed=stats.elements_removed + settled)
        except BaseException:
            # The kernel holds the old policy (failure before the flip) or the new one (after):
            # forget the model, the next apply adopts what is there (and sweeps what is not).
            self.eps = None
            raise

    # ---------------------------------------------------------------- learned destinations

    def learn(self, add: Sequence[LearnedEntry], remove: Sequence[LearnedEntry] = ()) -> None:
        """`Dataplane.learn`: the `learned` entries of the destinations these touch (and of
        those expired since the last call) rewritten at each endpoint's generation in force:
        no flip, no grace, nothing else written but the `ports` entries of a class no
        destination had before. Entries of rules (or endpoints) the last apply did not
        program are ignored."""
        with self._lock:
            if self.eps is None:
                raise DataplaneError("eBPF: no program applied (or the last apply failed): nothing to learn into")
            now = time.monotonic()
            expired = self.memory.expire(now)  # the lazy sweep (the program already ignores them)
            touched: dict[str, set[IPAddress]] = {}
            undo: list[tuple[str, IPAddress, str, float | None]] = []  # (endpoint, address, rule, expiry before)
            held = self.memory.held
            for e in add:
                key = endpoint_of(e.rule)
                st = self.eps.get(key)
                if st is None or e.rule not in st.lindex:
                    continue
                if e.expires <= now:  # a new expiry already past: as good as removed
                    remove = [*remove, e]
                    continue
                was = held.get(key, {}).get(e.address, {}).get(e.rule)
                if was == e.expires and st.lg is not None and st.lg.gen == st.gen and e.address in st.lg.written:
                    continue  # already so in the kernel (the learner re-sends everything after a sync)
                undo.append((key, e.address, e.rule, was))
                self.memory.put(key, e.address, e.rule, e.expires)
                touched.setdefault(key, set()).add(e.address)
            for e in remove:
                key = endpoint_of(e.rule)
                was = held.get(key, {}).get(e.address, {}).get(e.rule)
                if self.memory.drop(key, e.address, e.rule):
                    undo.append((key, e.address, e.rule, was))
                    touched.setdefault(key, set()).add(e.address)
            try:
                self._check_learned_room()
            except DataplaneError:
                for key, ip, rule, was in reversed(undo):  # the previous state stays, in memory too
                    self.memory.drop(key, ip, rule)
                    if was is not None:
                        self.memory.put(key, ip, rule, was)
                self._relearn(expired, now)
                raise
            for key, ips in expired.items():
                touched.setdefault(key, set()).update(ips)
            self._relearn(touched, now)

    def _check_learned_room(self) -> None:
        """DataplaneError naming the map when what is learned (one entry per endpoint and
        destination at the generations in force, plus the replaced generations' entries
        not yet deleted) does not fit in `learned`."""
        need = self.memory.n + (self._deferred.learned if self._deferred is not None else 0)
        if need > self.sizes.learned:
            raise DataplaneError(f"eBPF map learned is full ({self.sizes.learned} entries, {need} needed); "
                                 "nothing of this update was written")

    def _relearn(self, touched: dict[str, set[IPAddress]], now: float) -> int:
        """Rewrite these destinations' entries at each endpoint's generation in force."""
        assert self.eps is not None
        cmds = 0
        for key, ips in touched.items():
            st = self.eps.get(key)
            if st is None or st.tables is None or not st.lindex:
                continue  # adopted, contents unknown: the next apply writes them
            if st.lg is None or st.lg.gen != st.gen:
                st.lg = LearnGen.of(st.gen, st.tables[Direction.EGRESS])
            held = self.memory.held.get(key, {})
            cmds += self._learn_write(st, st.lg, st.tables[Direction.EGRESS], {ip: held.get(ip, {}) for ip in ips},
                                      now)
        return cmds

    def _learn_write(self, st: EpState, lg: LearnGen, egress: DirTables, dests: dict[IPAddress, dict[str, float]],
                     now: float) -> int:
        """Write these destinations' entries at `lg`'s generation: new classes' `ports`
        entries first, then the `learned` entries pointing to them; a destination nothing
        is learned for any more is deleted. A full map: DataplaneError naming it (`learn`
        checks the room first, so it writes nothing then)."""
        if not dests:
            return 0
        before = set(lg.classes)
        ports, items, gone = compute(st.ep_id, lg, egress, st.rules, st.isolated, st.counters, st.lindex, dests, now)
        try:
            n = self._write("ports", ports)
            n += self._write("learned", items)
        except DataplaneError:
            for members in set(lg.classes) - before:  # their ports entries stay listed in lg.ports
                del lg.classes[members]
            raise
        self.maps["learned"].delete_many([k_learn(st.ep_id, lg.gen, ip) for ip in gone if ip in lg.written])
        lg.written.update(ip for ip in dests if ip not in gone)
        lg.written.difference_update(gone)
        return n + len(gone)

    def _verify_adopted(self, compiled: dict[str, dict[Direction, DirTables]], program: Program) -> int:
        """After adoption: an endpoint whose pinned entries at its generation in force are
        exactly (every key and value, nothing more) what its new tables compile to keeps
        them, its tables now known, so a restart over an unchanged policy writes no second
        generation (at 10k pods 218k entries, and maps grown to hold both), and keeps what
        it learned from DNS answers (its `learned` entries and their classes' `ports`
        entries, read back into the model). Anything else stays unknown and is rewritten
        as before (what it learned is dropped). Returns the endpoints kept.

        The maps are read a batch at a time and compared one endpoint generation at a
        time (an LPM trie lists the entries under one (endpoint, generation) prefix
        together; one listed in two runs is not kept, only rewritten): at 10k pods holding
        every entry read cost ~30 MB at once. Keys of generations not in force are kept
        for the sweep of the same apply."""
        assert self.eps is not None
        self._read_keys = None
        todo = {(st.ep_id, st.gen): (key, st) for key, st in self.eps.items()
                if st.tables is None and st.gen > 0 and key in compiled}
        if not todo:
            return 0
        # a rule without its counter: written afresh with one
        cand = {eg: (key, st) for eg, (key, st) in todo.items()
                if all((DIR_CODE[d], rid) in st.counters for d, t in compiled[key].items() for rid in t.rule_ids)}
        live = {(st.ep_id, st.gen) for st in self.eps.values()}
        self._read_keys = {"peers": [], "ports": []}
        matched: dict[tuple[int, int], list[bytes]] = {}  # egs whose peers match -> their learned classes' ports keys

        ks = {name: self.maps[name].key_size for name in ("peers", "ports")}
        slow = [0]  # peers runs compared entry by entry

        def peers_match(eg: tuple[int, int], keys: bytes, values: bytes) -> bool:
            key, st = cand[eg]
            # first as the trie lists them: two comparisons of bytes (~4k entries an endpoint
            # at 50k pods); else, as it may list them otherwise, entry by entry
            blobs = [t.peer_blob(st.ep_id, st.gen, DIR_CODE[d], trie=True) for d, t in compiled[key].items()]
            want_k, want_v = b"".join(k for k, _ in blobs), b"".join(v for _, v in blobs)
            if want_k == keys and want_v == values:
                return True
            slow[0] += 1
            return len(want_k) == len(keys) and _items(want_k, want_v, ks["peers"], 4) == _items(
                keys, values, ks["peers"], 4)

        def ports_match(eg: tuple[int, int], keys: bytes, values: bytes) -> bool:
            key, st = cand[eg]
            have = _items(keys, values, ks["ports"], self.maps["ports"].value_size)
            tables = compiled[key]
            # the classes only learned destinations have (egress, numbered after the tables' own)
            own = len(tables[Direction.EGRESS].members)
            extra = [k for k in have if k[16] == DIR_EGRESS and _CLS.unpack_from(k, 12)[0] > own]
            for k in extra:
                del have[k]
            if dict(port_items(st.ep_id, st.counters, tables, st.gen)) != have:
                return False
            matched[eg] = sorted(extra)
            return True

        for name, match in (("peers", peers_match), ("ports", ports_match)):
            dead = self._read_keys[name]
            ok: set[tuple[int, int]] = set()
            seen: set[tuple[int, int]] = set()
            for eg, keys, values in _runs(self.maps[name], cand, live, dead):
                if eg in seen:  # listed in two runs: rewritten
                    ok.discard(eg)
                elif eg in cand and match(eg, keys, values):
                    ok.add(eg)
                seen.add(eg)
            for eg in cand.keys() - seen:  # nothing listed: kept if nothing is wanted
                if match(eg, b"", b""):
                    ok.add(eg)
            cand = {eg: cand[eg] for eg in ok}
        pinned: dict[tuple[int, int], list[tuple[IPAddress, list[tuple[int, int, int]]]]] = {}
        for k, v in self.maps["learned"].dump():
            if (eg := learn_owner(k)) in cand:
                a = unpack(LearnKey, k)
                pinned.setdefault(eg, []).append((ipaddress.ip_address(ip_of(a.family, a.addr)), learn_stages(v)))
        for eg, (key, st) in cand.items():
            tables = compiled[key]
            st.tables = tables
            if tables[Direction.EGRESS].flags & F_LEARNED:
                lg = st.lg = LearnGen.of(st.gen, tables[Direction.EGRESS])
                lg.ports = matched[eg]
                restore(lg, learned_index(program.endpoints[key].egress.rules), pinned.get(eg, []),
                        self.memory, key)
        log.info("eBPF adoption: %d of %d endpoints keep their pinned entries (%d compared entry by entry)",
                 len(cand), len(self.eps), slow[0])
        return len(cand)

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
            if is_hashed(value) and (st := pending.pop(epkey_name(value), None)) is not None:
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
        old, new = self.half, 1 - self.half
        added = removed = written = cmds = 0
        known_devices = set(self.have[old]["ifcfg"]) | set(self.have[new]["ifcfg"])
        config = v_config(self.audit, self.sample_rate, self.sample_burst)
        if config != self._config:  # runtime settings: written when they change
            cmds += self._write("config", [(u32(0), config)])
            self._config = config
        if self._adopted:
            # entries of generations the half in force does not use (e.g. written by an agent
            # killed before its flip) go before any generation is written again
            removed += self._sweep()
        stale = Stale()  # the replaced generations' entries, deleted after the flip
        retired: list[int] = []  # rule counters of departed or taken-over endpoints, freed after the flip
        renamed: list[EpState] = []
        # node addresses first: they only ever widen node -> endpoint traffic
        node = self.devices.node_addresses()
        cmds += self._write("nodeaddrs", [(k_addr(ip), b"\1") for ip in node - self.node_addrs])
        # 1. new generations of every changed endpoint (nothing reads them before the flip)
        # (the written generations, not their keys: a cold start at 10k pods writes ~220k
        # entries, ~30 MB as a list of keys, and a failure is rare)
        switched: list[tuple[EpState, int, dict[Direction, DirTables]]] = []
        learned_gens: dict[int, LearnGen] = {}  # id(EpState) -> its learned entries at its new generation
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
                if is_hashed(value):
                    self.hashed_names[value] = key
                cmds += self._write("epkeys", [(u32(st.ep_id), value)])
            st.iface = ep.interface
            egress = tables[Direction.EGRESS]
            if st.rules is not ep.egress.rules:
                st.rules, st.isolated = ep.egress.rules, ep.egress.isolated
                st.lindex = learned_index(st.rules) if egress.flags & F_LEARNED else {}
                self.memory.forget(key, st.lindex)  # entries of rules that are gone
            if st.tables != tables:
                self._sync_counters(st, tables)
                gen = st.gen + 1
                # peers as (keys, values) blobs: no object per entry (~950k at 50k pods)
                peers = [t.peer_blob(st.ep_id, gen, DIR_CODE[d]) for d, t in tables.items()]
                ports = port_items(st.ep_id, st.counters, tables, gen)
                lg = LearnGen.of(gen, egress) if st.lindex else None  # only endpoints with domainNames rules
                try:
                    for keys, values in peers:
                        cmds += self._write_packed("peers", keys, values)
                    cmds += self._write("ports", ports)
                    if lg is not None:  # what the endpoint learned, recomputed for the new generation
                        cmds += self._learn_write(st, lg, egress, self.memory.held.get(key, {}), time.monotonic())
                except DataplaneError:
                    # never flipped to: drop the half-written generations
                    for sst, sgen, stables in switched:
                        self._delete_quietly(entry_keys(sst.ep_id, stables, sgen))
                        if (slg := learned_gens.get(id(sst))) is not None:
                            self._delete_quietly(slg.keys(sst.ep_id))
                    self._delete_quietly(entry_keys(st.ep_id, tables, gen))
                    if lg is not None:
                        self._delete_quietly(lg.keys(st.ep_id))
                    raise
                if lg is not None:
                    learned_gens[id(st)] = lg
                if st.tables is not None:
                    stale.gen(st.ep_id, st.gen, st.tables)
                switched.append((st, gen, tables))
                added += sum(t.entries[0] for t in tables.values()) + len(ports)
                written += 1
            elif st.lindex and key in self.memory.held and (st.lg is None or st.lg.gen != st.gen):
                # unchanged tables whose learned entries are not written (adopted): now
                lg = LearnGen.of(st.gen, egress)
                cmds += self._learn_write(st, lg, egress, self.memory.held[key], time.monotonic())
                st.lg = lg
        gens = {id(st): gen for st, gen, _ in switched}
        departed = [key for key in self.eps if key not in program.endpoints]
        # 2. what the double-buffered maps hold for the new policy
        want = empty_half()
        devices = self.devices.find(program, {k: st.ep_id for k, st in self.eps.items()}, node)
        pod_device = self.devices.pod_device
        for key, ep in program.endpoints.items():
            st = self.eps[key]
            fl = (compiled[key][Direction.INGRESS].flags, compiled[key][Direction.EGRESS].flags)
            want["epstate"][st.ep_id] = v_epstate(gens.get(id(st), st.gen), *fl, pod_device.get(key, 0))
            for ip in ep.ips:
                want["addrs"][ip] = u32(st.ep_id)
        for idx, (host, bound) in devices.items():
            want["ifcfg"][idx] = v_ifcfg(self.devices.is_l3(idx), host, bound, self.devices.is_peer(idx))
        # 3. the inactive half gets the new policy whole; devices are attached (a device
        # without an entry in the half in force is not judged yet)
        cmds += self._write_half(new, want)
        for idx in devices:
            self.devices.attach(idx, self.prog_fds, self.prog_ids)
        # 4. the flip: one update switches every endpoint, address and device at once
        flipped = want != self.have[old]
        if flipped:
            self._flip(new)
            cmds += 1
        for st, gen, tables in switched:
            if st.lg is not None:
                stale.entries += st.lg.keys(st.ep_id)
            st.gen, st.tables, st.lg = gen, tables, learned_gens.get(id(st))
            keep = {(DIR_CODE[d], r) for d, t in tables.items() for r in t.rule_ids}
            retired += [st.counters.pop(k) for k in list(st.counters) if k not in keep]
        gone = [self.eps.pop(key) for key in departed]
        for key in departed:
            self.memory.forget(key)
        for key in departed:
            self.hashed_names.pop(epkey_value(key), None)
        for st in gone:
            self._retire(st, stale, retired)
        # a taken-over id counts its drops afresh under its new key from the flip on
        for st in renamed:
            for d in (0, 1):
                self.maps["drop_stats"].update(u32(st.ep_id * 2 + d), ZERO_STAT)
        # 5. what packets judged under the previous half may still read goes once the grace
        # has passed: at the start of the next apply (which must wait for it anyway before
        # rewriting that half), so this event costs no sleep
        self._deferred = Deferred(time.monotonic(), stale, retired, [st.ep_id for st in gone],
                                  known_devices - set(want["ifcfg"]), self.node_addrs - node, self._adopted,
                                  sum(1 for name, _ in stale.entries if name == "learned"))
        self._adopted = False
        self.node_addrs |= node
        if self.growths != self._dropped_at:  # old builds: only after a growth switched builds
            builds.drop_old_builds(self.pin_root, self.build, self.sizes)
            self._dropped_at = self.growths
        return ApplyStats(full=written == len(program.endpoints) and written > 0, commands=cmds,
                          elements_added=added, elements_removed=removed, chains_written=written)

    def _settle(self) -> int:
        """The previous apply's deferred work, once no packet can be judged under the half
        it replaced (GRACE_S after its flip; usually long past): the replaced generations'
        entries, freed rule counters and endpoint ids, detached devices, node addresses
        gone, and after an adoption the sweep. The previous half itself is not touched
        here: the next apply rewrites it (from what it holds) as its inactive half.
        Returns the entries deleted."""
        d, self._deferred = self._deferred, None
        self._read_keys = None  # only the sweep right after _verify_adopted uses them
        if d is None:
            return 0
        self._wait_grace(d)
        removed = len(d.stale)
        self._delete(d.stale.entries)
        for ep_id, gen, tables in d.stale.gens:  # one endpoint's keys at a time
            self._delete(entry_keys(ep_id, tables, gen))
        # a taken-over id starts its counters afresh under its new key (its old counters
        # were only referenced by the replaced generation)
        self._release_counters(d.retired)
        for ep_id in d.gone:
            for dc in (0, 1):
                self.maps["drop_stats"].update(u32(ep_id * 2 + dc), ZERO_STAT)
            self.maps["epkeys"].delete(u32(ep_id))
        for idx in d.detach:
            self.devices.detach(idx)
            self.maps["devmac"].delete(u32(idx))  # an index the kernel may give another device
        for ip in d.node_gone:
            self.maps["nodeaddrs"].delete(k_addr(ip))
            self.node_addrs.discard(ip)
        return removed + (self._sweep() if d.sweep else 0)

    def _delete_quietly(self, entries: Iterable[Entry]) -> None:
        """One at a time, as they may be absent (a generation written in part)."""
        for m, k in entries:
            self.maps[m].delete(k)

    def _delete(self, entries: Iterable[Entry]) -> None:
        by_map: dict[str, list[bytes]] = {}
        for name, k in entries:
            by_map.setdefault(name, []).append(k)
        for name, keys in by_map.items():
            self.maps[name].delete_many(keys)

    @staticmethod
    def _wait_grace(d: Deferred) -> None:
        wait = d.since + GRACE_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def _write_half(self, half: int, want: HalfContents) -> int:
        """Make the half not in force hold `want` (from what it holds: the policy before the
        last apply's, as it is only caught up when it is rewritten)."""
        n = 0
        for name in HALVED:
            have, key = self.have[half][name], HALF_KEY[name]
            changed = [(item, v) for item, v in want[name].items() if have.get(item) != v]
            n += self._write(name, [(key(item, half), v) for item, v in changed])
            have.update(changed)
            gone = set(have) - set(want[name])
            self.maps[name].delete_many([key(item, half) for item in gone])
            for item in gone:
                del have[item]
            n += len(gone)
        return n

    def _flip(self, half: int) -> None:
        """Switch every packet judged from now on to `half`: one array update."""
        self.maps["active"].update(u32(0), u32(half))
        self.half = half

    def _retire(self, st: EpState, stale: Stale, retired: list[int]) -> None:
        """An endpoint departs, or its id is taken over: its generation's entries and its
        rule counters go after the flip."""
        if st.tables is not None:
            stale.gen(st.ep_id, st.gen, st.tables)
        if st.lg is not None:
            stale.entries += st.lg.keys(st.ep_id)
        retired += st.counters.values()
        st.counters, st.tables, st.lg = {}, None, None

    def _take_over(self, ep: EndpointProgram, program: Program, stale: Stale,
                   retired: list[int]) -> EpState | None:
        """A new endpoint bound to a device takes over the id of a departing endpoint bound
        to the same device (NetBird's bootstrap endpoint replaced by the local peer, or the
        peer renamed): its tables then change with the flip, the device's `ifcfg` entries
        stay as they are, and the flows recorded under the id (connections the node opened,
        whose replies must keep passing) survive. Written afresh under generation gen + 1."""
        assert self.eps is not None
        if ep.interface is None:
            return None
        prev = next((k for k, st in self.eps.items()
                     if st.iface == ep.interface and k not in program.endpoints), None)
        if prev is None:
            return None
        st = self.eps.pop(prev)
        self._retire(st, stale, retired)
        log.info("eBPF: endpoint %s takes over %s on %s (id %d)", display(ep.key, 300), display(prev, 300),
                 display(ep.interface, 64), st.ep_id)
        return st

    def _sweep(self) -> int:
        """After adoption: delete entries of generations the half in force does not use."""
        assert self.eps is not None
        live = {(st.ep_id, st.gen) for st in self.eps.values()}
        n = 0
        read, self._read_keys = self._read_keys, None
        for name in ("peers", "ports"):
            m = self.maps[name]
            keys = read[name] if read is not None else [k for k, _ in m.dump()]
            dead = [k for k in keys if _EP_GEN.unpack_from(k, 4) not in live]
            m.delete_many(dead)
            n += len(dead)
        # learned destinations: whatever this process did not write at a generation in force
        known = {k_learn(st.ep_id, st.lg.gen, ip) for st in self.eps.values() if st.lg is not None
                 for ip in st.lg.written}
        dead = [k for k in self.maps["learned"].all_keys() if learn_owner(k) not in live or k not in known]
        self.maps["learned"].delete_many(dead)
        return n + len(dead)
