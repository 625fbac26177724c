"""Strict mode: re-judge established flows after a policy change. Pure: no I/O.

The kernel's (or the BPF) connection table lets replies and later packets of a flow
pass without judging them again; when a change means a flow would no longer be
allowed, its entry must go so that its next packet is judged (and dropped).
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.dataplane.base import Flow
from agent.inventory import IPAddress
from agent.ir import Program, Verdict
from agent.simulate import evaluate, index_by_ip


def stale_flows(program: Program, flows: Iterable[Flow], node_addresses: Iterable[IPAddress] = ()) -> list[Flow]:
    """Flows the program would not allow any more.

    Connections from the node into a pod it hosts are always allowed (Kubernetes), so a
    flow from a node address to an endpoint judged by address is never stale.
    """
    by_ip = index_by_ip(program)
    node = set(node_addresses)
    out = []
    for f in flows:
        dst_ep = by_ip.get(f.dst)
        if f.src in node and dst_ep is not None and dst_ep.interface is None:
            continue
        if evaluate(program, f.src, f.dst, f.protocol, f.dport, by_ip).verdict is Verdict.DROP:
            out.append(f)
    return out
