"""The eBPF loader names a missing capability instead of letting bcc blame the kernel headers."""

from __future__ import annotations

from agent.dataplane.ebpf.loader import missing_capabilities


def status(*bits: int) -> str:
    return f"Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{sum(1 << b for b in bits):016x}\n"


def test_all_three_or_sys_admin_for_bpf_and_perfmon() -> None:
    net_admin, sys_admin, perfmon, bpf = 12, 21, 38, 39
    assert missing_capabilities(status(net_admin, perfmon, bpf)) == []
    assert missing_capabilities(status(net_admin, bpf)) == ["CAP_PERFMON"]
    assert missing_capabilities(status(net_admin, perfmon)) == ["CAP_BPF"]
    assert missing_capabilities(status(perfmon, bpf)) == ["CAP_NET_ADMIN"]
    assert missing_capabilities(status(net_admin, sys_admin)) == []  # kernels before 5.8
    assert missing_capabilities(status(sys_admin)) == ["CAP_NET_ADMIN"]
    assert missing_capabilities(status()) == ["CAP_NET_ADMIN", "CAP_PERFMON", "CAP_BPF"]
    assert missing_capabilities("no such line") == ["CAP_NET_ADMIN", "CAP_PERFMON", "CAP_BPF"]
