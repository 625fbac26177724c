"""The eBPF dataplane: tc classifiers (bpf/stockade.c) on each local endpoint's host-side
interface, driven by pinned maps. Design notes: docs/ebpf.md.

- `tables`: the pure compiler (IR direction -> peer classes and port prefixes)
- `layout`: one ctypes layout per map, checked against the C structs at build time
- `reconcile`: the double-buffered switch and restart adoption; `dataplane`: `EbpfDataplane`
- `attach`: devices (routes, bound interfaces) and tc filters
- `flows`: the flow table for strict mode; `droplog`: sampled drops
- `builds`: the pinned builds; `loader`: the bcc compile child; `bpfsys`: bpf(2) via ctypes
"""

from agent.dataplane.ebpf.builds import PIN_ROOT, PIN_ROOT_ENV
from agent.dataplane.ebpf.dataplane import EbpfDataplane
from agent.dataplane.ebpf.droplog import EbpfDropLog
from agent.dataplane.ebpf.layout import (
    EPKEY_SIZE,
    NO_COUNTER,
    S_AUDIT,
    S_PORTS,
    Sizes,
    epkey_name,
    epkey_value,
    k_flow,
    v_ifcfg,
)
from agent.dataplane.ebpf.reconcile import EpState
from agent.dataplane.ebpf.tables import ALL_PROTOS, PROTO, PROTO_NAME, V_CODE, compile_direction, port_prefixes

__all__ = [
    "ALL_PROTOS", "EPKEY_SIZE", "NO_COUNTER", "PIN_ROOT", "PIN_ROOT_ENV", "PROTO", "PROTO_NAME", "S_AUDIT",
    "S_PORTS", "V_CODE", "EbpfDataplane", "EbpfDropLog", "EpState", "Sizes", "compile_direction",
    "epkey_name", "epkey_value", "k_flow", "port_prefixes", "v_ifcfg",
]
