"""The eBPF drop log: sampled drops popped from the pinned `samples` queue."""

from __future__ import annotations

import ipaddress
import socket
import time

from agent.dataplane import nflog
from agent.dataplane.base import DropEvent, DropLog
from agent.dataplane.ebpf import bpfsys
from agent.dataplane.ebpf.layout import (
    NO_COUNTER,
    S_AUDIT,
    S_PORTS,
    Sample,
    counter_owner,
    epkey_name,
    ip_of,
    u32,
    unpack,
)
from agent.ir import Direction


class EbpfDropLog(DropLog):
    """Drains the kernel's `samples` queue (pop = BPF_MAP_LOOKUP_AND_DELETE_ELEM; no bcc, no
    ring buffer). Endpoint keys and rule ids are read from the pinned `epkeys` and
    `counterinfo` maps with their own fds, so this runs on its own thread next to `apply`."""

    POLL_S = 0.05

    def __init__(self, pin_dir: str, hashed_names: dict[bytes, str] | None = None) -> None:
        self.pin_dir = pin_dir
        # epkeys values stored as a digest -> their key (shared with EbpfDataplane, which fills it)
        self.hashed_names = {} if hashed_names is None else hashed_names
        self.maps: dict[str, bpfsys.Map] = {}

    def _open(self) -> bool:
        if not self.maps:
            try:
                for name in ("samples", "epkeys", "counterinfo"):
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
        s = unpack(Sample, raw)
        value = self.maps["epkeys"].lookup(u32(s.ep_id))
        if value is None:
            return None  # endpoint gone meanwhile
        rule_id = None
        if s.counter != NO_COUNTER:
            info = self.maps["counterinfo"].lookup(u32(s.counter))
            if info is None:
                return None  # counter released meanwhile
            ep_id, d, rule_id = counter_owner(info)
            if (ep_id, d) != (s.ep_id, s.dir):
                return None  # released and reused meanwhile: never misattribute
        ported = bool(s.flags & S_PORTS)
        return DropEvent(
            self.hashed_names.get(value) or epkey_name(value), Direction.INGRESS if s.dir == 0 else Direction.EGRESS,
            rule_id, nflog.L4_NAMES.get(s.l4, str(s.l4)), str(ipaddress.ip_address(ip_of(s.family, s.saddr))),
            str(ipaddress.ip_address(ip_of(s.family, s.daddr))),
            socket.ntohs(s.sport) if ported else None, socket.ntohs(s.dport) if ported else None,
            audit=bool(s.flags & S_AUDIT),
        )

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps = {}
