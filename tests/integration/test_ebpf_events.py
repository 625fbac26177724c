"""The event path costs what it touches, on real packets: devices are rescanned only after
netlink reported a change (a pod whose veth appears after the first apply is still
found and enforced, on both dataplanes; a filter someone removed is put back), and the
clean-up a flip's grace guards is deferred to the next apply, which leaves only the
generations in force (and survives an agent exiting with it pending)."""

from __future__ import annotations

import ipaddress

from agent.dataplane.ebpf import EbpfDataplane
from agent.dataplane.ebpf.layout import PeerKey, PortKey, unpack
from agent.ir import DirectionProgram, EndpointProgram, PortMatch, Program, Rule
from tests.kit import Lab
from tests.kit.ebpf_lab import A, B, C, net, origin
from tests.kit.planes import Plane, check_probes

D = "10.30.0.4"


def _program(allowed: tuple[str, ...], with_d: bool = False) -> Program:
    """b accepts TCP 80 only from `allowed`; d (when present) accepts nothing."""
    ip = ipaddress.ip_address
    eps = {
        "app/a": EndpointProgram("app/a", (ip(A),)),
        "app/b": EndpointProgram("app/b", (ip(B),), ingress=DirectionProgram(True, (
            Rule(origin(0), net(*allowed), (PortMatch("tcp", 80, 80),), key="web"),) if allowed else ())),
        "app/c": EndpointProgram("app/c", (ip(C),)),
    }
    if with_d:
        eps["app/d"] = EndpointProgram("app/d", (ip(D),), ingress=DirectionProgram(True))
    return Program("file", eps)


SRC = {"app/a": (A, A), "app/c": (C, C)}


def test_a_pod_added_after_the_first_apply_is_found_and_enforced(lab: Lab, dataplane: str) -> None:
    for key, ip in (("app/a", A), ("app/b", B), ("app/c", C)):
        lab.add_pod(key, [ip])
    p = Plane(lab, dataplane)
    try:
        p.apply(_program((A,)))
        check_probes(lab, _program((A,)), {"app/a": [f"tcp:{B}:80"], "app/c": [f"tcp:{B}:80"]}, SRC,
                     {"app/a": {f"tcp:{B}:80": True}, "app/c": {f"tcp:{B}:80": False}})
        lab.add_pod("app/d", [D])  # a veth and a route the first apply never saw
        prog = _program((A, C), with_d=True)
        p.apply(prog)
        if isinstance(p.dp, EbpfDataplane):
            assert not p.dp.unattached
        probes = {"app/a": [f"tcp:{B}:80", f"tcp:{D}:80"], "app/c": [f"tcp:{B}:80", f"tcp:{D}:80"]}
        check_probes(lab, prog, probes, SRC, {"app/a": {f"tcp:{B}:80": True, f"tcp:{D}:80": False},
                                              "app/c": {f"tcp:{B}:80": True, f"tcp:{D}:80": False}})
    finally:
        p.close()


def _entries(dp: EbpfDataplane) -> set[tuple[int, int]]:
    """(endpoint id, generation) of every peers/ports entry in the kernel."""
    out = set()
    for name, t in (("peers", PeerKey), ("ports", PortKey)):
        for k in dp.maps[name].all_keys():
            e = unpack(t, k)
            out.add((e.ep_id, e.gen))
    return out


def _live(dp: EbpfDataplane) -> set[tuple[int, int]]:
    assert dp.eps is not None
    return {(st.ep_id, st.gen) for st in dp.eps.values() if st.tables and any(t.entries != (0, 0)
                                                                              for t in st.tables.values())}


def test_deferred_clean_up_and_device_cache(lab: Lab, pin_root: str) -> None:
    for key, ip in (("app/a", A), ("app/b", B), ("app/c", C)):
        lab.add_pod(key, [ip])
    dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
    try:
        dp.apply(_program((A,)))
        dp.apply(_program((C,)))  # b's tables change: a new generation, the old one stale
        b = dp.eps["app/b"] if dp.eps else None
        assert b is not None and b.gen == 2
        # the replaced generation stays until the next apply (packets may still read it)
        assert (b.ep_id, 1) in _entries(dp) and (b.ep_id, 2) in _entries(dp)
        assert lab.probe_many({"app/c": [f"tcp:{B}:80"], "app/a": [f"tcp:{B}:80"]}) == {
            "app/c": {f"tcp:{B}:80": True}, "app/a": {f"tcp:{B}:80": False}}
        dp.apply(_program((C,)))  # nothing changed: only the deferred clean-up
        assert _entries(dp) == _live(dp)
        # a filter removed behind our back is put back by the next apply (tc event seen)
        lab.node_sh("tc", "filter", "del", "dev", lab.pods["app/b"].host_if, "egress")
        assert "stockade" not in lab.node_sh("tc", "filter", "show", "dev", lab.pods["app/b"].host_if,
                                             "egress").stdout
        dp.apply(_program((C,)))
        assert "stockade" in lab.node_sh("tc", "filter", "show", "dev", lab.pods["app/b"].host_if,
                                         "egress").stdout
        assert not lab.probe_many({"app/a": [f"tcp:{B}:80"]})["app/a"][f"tcp:{B}:80"]
        # an agent exiting with clean-up pending: the next one adopts and sweeps it
        dp.apply(_program((A,)))
        assert len({g for e, g in _entries(dp) if e == b.ep_id}) == 2
        dp._deferred = None  # as if the process died: no close-time clean-up
        dp.close()
        dp = EbpfDataplane(pin_root=pin_root, netns=lab.node)
        dp.apply(_program((A,)))  # adopted: every endpoint rewritten, the sweep deferred
        dp.apply(_program((A,)))
        assert _entries(dp) == _live(dp)
        assert lab.probe_many({"app/c": [f"tcp:{B}:80"], "app/a": [f"tcp:{B}:80"]}) == {
            "app/c": {f"tcp:{B}:80": False}, "app/a": {f"tcp:{B}:80": True}}
    finally:
        dp.cleanup()
        dp.close()
