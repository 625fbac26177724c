"""The BPF flow table seen as connections, for strict mode: list the established flows,
forget the ones a new policy no longer allows (so their next packet is judged)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from agent.dataplane import conntrack
from agent.dataplane.base import Flow
from agent.dataplane.ebpf import bpfsys
from agent.dataplane.ebpf.layout import FlowKey, ip_of, k_flow, unpack
from agent.ir import IPAddress

FlowTuple = tuple[int, int, bytes, int, bytes, int]
"""(family, protocol, source address, source port, destination address, destination port)."""


def flow_tuple(k: bytes) -> FlowTuple:
    """The tuple of a `flows` key."""
    f = unpack(FlowKey, k)
    return (f.family, f.proto, ip_of(f.family, f.saddr), socket.ntohs(f.sport), ip_of(f.family, f.daddr),
            socket.ntohs(f.dport))


def unordered(t: FlowTuple) -> tuple:
    """A flow tuple and its reverse, as one key."""
    fam, proto, sa, sp, da, dp = t
    return (fam, proto, *sorted(((sa, sp), (da, dp))))


class FlowTable:
    """`established` remembers the keys it saw per flow, so `forget` deletes every entry
    of a flow (both orientations, every endpoint and direction it was recorded under)."""

    def __init__(self) -> None:
        self._keys: dict[tuple, list[bytes]] = {}  # flow (either orientation) -> keys seen

    def established(self, flows: bpfsys.Map) -> list[Flow]:
        """TCP/UDP/SCTP entries, in the direction of the packet that created them (the
        original direction: the side that opened the flow; a flow between two local
        endpoints has the same tuple at both)."""
        index: dict[tuple, list[bytes]] = {}
        out: dict[FlowTuple, Flow] = {}
        for k in flows.all_keys():
            t = flow_tuple(k)
            _, proto, sa, sp, da, dp = t
            if proto not in conntrack.REJUDGED:
                continue
            index.setdefault(unordered(t), []).append(k)
            if t not in out:
                out[t] = Flow(conntrack.REJUDGED[proto], ipaddress.ip_address(sa), ipaddress.ip_address(da), sp, dp)
        self._keys = index
        return list(out.values())

    def forget(self, flows: bpfsys.Map, gone: list[Flow], by_ip: dict[IPAddress, int], bound: Iterable[int],
               node_addrs: set[IPAddress]) -> int:
        """Delete every entry of these flows: the keys `established` saw, and those the
        program would look up now (both endpoints found by address -- `by_ip` -- or, for a
        node address, the endpoints `bound` to a device; both directions and orientations)."""
        n = 0
        for f in gone:
            fam, proto = f.src.version, conntrack.NUMBERS[f.protocol]
            t = (fam, proto, f.src.packed, f.sport, f.dst.packed, f.dport)
            keys = set(self._keys.pop(unordered(t), []))
            eps = {by_ip[ip] for ip in (f.src, f.dst) if ip in by_ip}
            if f.src in node_addrs or f.dst in node_addrs:
                eps |= set(bound)
            for ep in eps:
                for d in (0, 1):
                    keys.add(k_flow(ep, d, fam, proto, f.src.packed, f.sport, f.dst.packed, f.dport))
                    keys.add(k_flow(ep, d, fam, proto, f.dst.packed, f.dport, f.src.packed, f.sport))
            deleted = [flows.delete(k) for k in keys]
            n += any(deleted)
        return n
