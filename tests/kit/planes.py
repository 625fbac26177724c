"""A dataplane driven in the lab's node namespace, and the probe check shared by the
IR-level packet tests: the packets' verdicts are the expected ones and the simulator's."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from agent.dataplane.base import ApplyStats, Counters, Dataplane, DropEvent, DropLog
from agent.dataplane.ebpf import EbpfDataplane
from agent.dataplane.nftables import NftablesDataplane, Options
from agent.ir import Program, Verdict
from agent.simulate import evaluate
from tests.kit import Lab
from tests.kit.netns import worker

T = TypeVar("T")


class Plane:
    """One dataplane driven in the lab's node namespace: eBPF takes the namespace as an
    argument; nftables (libnftables, the NFLOG socket) runs on a thread inside it."""

    def __init__(self, lab: Lab, name: str, audit: bool = False) -> None:
        self.lab, self.name, self.audit = lab, name, audit
        self.pool: ThreadPoolExecutor | None = worker(lab.node) if name == "nftables" else None
        self.dp: Dataplane = self.call(self._make)
        self.log: DropLog | None = None

    def _make(self) -> Dataplane:
        if self.name == "nftables":
            return NftablesDataplane(Options(audit=self.audit))
        return EbpfDataplane(netns=self.lab.node, audit=self.audit)

    def call(self, fn: Callable[[], T]) -> T:
        return fn() if self.pool is None else self.pool.submit(fn).result()

    def apply(self, prog: Program) -> ApplyStats:
        return self.call(lambda: self.dp.apply(prog))

    def counters(self, prog: Program) -> Counters:
        return self.call(lambda: self.dp.counters(prog))

    def open_log(self) -> None:
        self.log = self.call(self.dp.drop_log)
        assert self.log is not None

    def drops(self) -> list[DropEvent]:
        assert self.log is not None
        return self.log.read(timeout=0.5)

    def restart(self) -> None:
        """A new agent process's dataplane object (eBPF adopts the pinned maps)."""
        self.close(cleanup=False)
        self.pool = worker(self.lab.node) if self.name == "nftables" else None
        self.dp = self.call(self._make)

    def close(self, cleanup: bool = True) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
        if cleanup:
            self.call(self.dp.cleanup)
        if isinstance(self.dp, EbpfDataplane):
            self.dp.close()
        if self.pool is not None:
            self.pool.shutdown()


def check_probes(lab: Lab, prog: Program, probes: dict[str, list[str]], src: dict[str, tuple[str, str]],
                 want: dict[str, dict[str, bool]]) -> None:
    """Probe `probes` ("proto:addr:port" per source pod; `src`: its IPv4 and IPv6 address):
    the packets give `want`, and the simulator says the same as the packets."""
    seen = lab.probe_many(probes, timeout=1.0)
    assert seen == want
    for pod, results in seen.items():
        for spec, ok in results.items():
            proto, rest = spec.split(":", 1)
            addr, port = rest.rsplit(":", 1)
            s = src[pod][1] if ":" in addr else src[pod][0]
            v = evaluate(prog, ipaddress.ip_address(s), ipaddress.ip_address(addr), proto, int(port))
            assert (v.verdict is Verdict.ACCEPT) == ok, (pod, spec, v)
