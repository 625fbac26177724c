"""`EbpfDataplane`: the Dataplane interface over the reconciler (counters, strict mode's
flow table, drop log, map fill, rendering, cleanup)."""

from __future__ import annotations

import os
import shutil

from agent.dataplane.base import Count, Counters, Dataplane, DropEvent, DropLog, Flow
from agent.dataplane.ebpf import builds
from agent.dataplane.ebpf.droplog import EbpfDropLog
from agent.dataplane.ebpf.layout import F_ISOLATED, read_u32, stat_sum, u32
from agent.dataplane.ebpf.learning import Memory
from agent.dataplane.ebpf.reconcile import Reconciler, empty_half
from agent.dataplane.ebpf.tables import DIR_CODE, render
from agent.ir import Direction, IPAddress, Program


class EbpfDataplane(Reconciler, Dataplane):
    """tc classifiers (bpf/stockade.c) on each local endpoint's host-side interface, driven
    by pinned maps that `apply` switches atomically; see docs/ebpf.md."""

    name = "ebpf"
    learns_in_kernel = True  # `learn`: the `learned` map (agent/dataplane/ebpf/learning.py)

    @property
    def unattached(self) -> dict[str, str]:
        """Endpoint key -> why no device judges it."""
        return self.devices.unattached

    # ---------------------------------------------------------------- interface methods

    def render(self, program: Program) -> str:
        return render(program, [
            f"# eBPF build {self.build}: maps under {self.pin_dir} (generation 1 shown)",
            f"config audit={int(self.audit)} sample_rate={self.sample_rate}/s burst={self.sample_burst}"])

    def counters(self, program: Program | None = None) -> Counters:
        """Per-rule and default-deny counters. Endpoint ids and rule counters are kept in
        pinned maps, so a fresh process (e.g. `stockade counters`) reads them too;
        `program` restricts the answer to its endpoints."""
        c = Counters()
        if self.eps is None:
            if not builds.existing(self.pin_root):
                return c  # nothing loaded: nothing counted (and no compile just to read)
            self._adopt()
        assert self.eps is not None
        if program is not None:
            self._resolve_hashed(program)
        stats, drops = self.maps["rule_stats"], self.maps["drop_stats"]
        for key, st in self.eps.items():
            if program is not None and key not in program.endpoints:
                continue
            for (dc, rid), counter in st.counters.items():
                d = Direction.INGRESS if dc == 0 else Direction.EGRESS
                c.add_rule((key, rid, d), Count(*stat_sum(stats.lookup_percpu(u32(counter)))))
            for d, dc in DIR_CODE.items():
                if program is not None:
                    isolated = program.endpoints[key].direction(d).isolated
                else:
                    isolated = st.tables is None or bool(st.tables[d].flags & F_ISOLATED)
                if isolated:
                    c.add_drop((key, d), Count(*stat_sum(drops.lookup_percpu(u32(st.ep_id * 2 + dc)))))
        return c

    def established(self) -> list[Flow]:
        """TCP/UDP/SCTP entries of the BPF flow table, in their original direction."""
        if self.eps is None:
            self._adopt()
        return self.flow_table.established(self.maps["flows"])

    def forget(self, flows: list[Flow]) -> int:
        """Delete every entry of these flows, so their next packets are judged under the
        current generation."""
        if self.eps is None:
            self._adopt()
        assert self.eps is not None
        by_ip = {ip: read_u32(v) for ip, v in self.have[self.half]["addrs"].items()}
        bound = [st.ep_id for st in self.eps.values() if st.iface]  # found by device for node addresses
        return self.flow_table.forget(self.maps["flows"], flows, by_ip, bound, self.node_addrs)

    def node_addresses(self) -> list[IPAddress]:
        return sorted(self.devices.node_addresses(), key=lambda ip: (ip.version, ip))

    def drop_log(self) -> DropLog | None:
        """Sampled drops from the pinned `samples` queue (opened on first read: the daemon
        asks before its first sync may have compiled the build)."""
        if self.sample_rate <= 0:
            return None
        return _FollowingDropLog(self, self.hashed_names)

    def map_fill(self) -> dict[str, float]:
        """Entries / capacity per map; a map the last program could not fit even grown to
        its limit shows need / limit (above 1: an alert, the previous policy is in force)."""
        out = {} if self.eps is None else {
            name: n / cap for name, (n, cap) in self.fill(walk=False).items() if cap}
        for name, (need, cap) in self.refused.items():
            out[name] = need / cap
        return out

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
        peers = ports = learned = 0
        for st in self.eps.values():
            for t in (st.tables or {}).values():
                a, b = t.entries
                peers, ports = peers + a, ports + b
            if st.lg is not None:
                ports += len(st.lg.ports)
                learned += len(st.lg.written)
        act = self.have[self.half]
        out = {
            "epstate": (len(self.eps), self.sizes.endpoints),
            "addrs": (len(act["addrs"]), self.sizes.addrs),
            "peers": (peers, self.sizes.peers),
            "ports": (ports, self.sizes.ports),
            "rule_stats": (sum(len(s.counters) for s in self.eps.values()), self.sizes.counters),
            "ifcfg": (len(act["ifcfg"]), self.sizes.ifaces),
            "nodeaddrs": (len(self.node_addrs), self.sizes.node_addrs),
            "learned": (learned, self.sizes.learned),
        }
        if walk:
            out["flows"] = (self.maps["flows"].count(), self.sizes.flows)
            out["frags"] = (self.maps["frags"].count(), self.sizes.frags)
        return out

    def cleanup(self) -> None:
        """Detach every filter we own in this netns and unpin everything under pin_root."""
        self.devices.detach_all()
        self._deferred = None  # everything goes below
        for m in self.maps.values():
            m.close()
        for fd in self.prog_fds.values():
            os.close(fd)
        self.maps, self.prog_fds, self.eps = {}, {}, None
        self.have = [empty_half(), empty_half()]
        self.node_addrs = set()
        self.memory = Memory()
        if os.path.isdir(self.pin_root):
            shutil.rmtree(self.pin_root)


class _FollowingDropLog(EbpfDropLog):
    """The drop log of the build in use: reopened on the new build's maps after the maps
    grew (samples still queued in the old build are lost with it)."""

    def __init__(self, dp: EbpfDataplane, hashed_names: dict[bytes, str]) -> None:
        super().__init__(dp.pin_dir, hashed_names)
        self.dp = dp

    def read(self, timeout: float) -> list[DropEvent]:
        if self.dp.pin_dir != self.pin_dir:  # one attribute read: safe beside apply's thread
            self.close()
            self.pin_dir = self.dp.pin_dir
        return super().read(timeout)
