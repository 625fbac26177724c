"""Where an eBPF apply for one newly learned DNS address goes (`--dns-egress`: each answer
bringing a new address waits for `Daemon.reapply`, i.e. `with_learned` + `dataplane.apply`).

    python -m bench.dnsapply [--applies 200] [--pods 1] [--json F]   (as root)

In the namespace lab: `--pods` pods each with a `*.bench.test` domainNames rule, the eBPF
dataplane in the node namespace, then `--applies` applies each with ONE more learned
address for the first pod (as the agent does). Reports the mean/p50/p99 of the whole apply
and of its parts: `to_flip` (start to the flip: from then on the new address is allowed;
the rest is cleanup an answer need not wait for), `with_learned` (the program transform),
compiling the changed endpoint's tables, map writes (`_write`, `_write_half`), the grace
sleep after the flip (GRACE_S), the device scan and attach, old builds' cleanup.
Reports; never passes or fails.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from agent.dataplane.ebpf import EbpfDataplane, reconcile
from agent.dataplane.ebpf.attach import Devices
from agent.policy.cluster import Learned, with_learned
from tests.kit import Lab
from tests.kit.builders import ns, pod, snapshot_of
from tests.kit.privileges import private_bpffs

PARTS: dict[str, list[float]] = defaultdict(list)


def timed(owner: Any, name: str, label: str) -> None:
    """Wrap owner.name to add its time to PARTS[label] (per apply, summed)."""
    fn = getattr(owner, name)

    def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            PARTS[label][-1] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--applies", type=int, default=200)
    ap.add_argument("--pods", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    cnp = {"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": "names"},
           "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchLabels": {"team": "app"}}},
                    "egress": [{"action": "Accept", "to": [{"domainNames": ["*.bench.test"]}],
                                "protocols": [{"tcp": {"destinationPort": {"number": 443}}}]},
                               {"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}]}}
    pods = [(f"app/p{i}", f"10.38.{i // 250}.{1 + i % 250}") for i in range(a.pods)]
    docs = [ns("app", team="app"), *(pod(k, [ip]) for k, ip in pods), cnp]
    labels = ["total", "to_flip", "with_learned", "compile_direction", "map_writes", "write_half", "grace_sleep",
              "devices_find", "attach", "node_addresses", "need", "ensure_capacity", "sync_counters",
              "drop_old_builds"]
    with private_bpffs("bench-dnsapply") as pins, Lab() as lab:
        for k, ip in pods:
            lab.add_pod(k, [ip])
        base = snapshot_of(docs, node="n1").program
        dp = EbpfDataplane(netns=lab.node, pin_root=pins)
        dp.apply(with_learned(base, Learned()))
        rule = next(r.key for r in base.endpoints[pods[0][0]].egress.rules if "/domains@" in r.key)
        rule_key = rule.split("/domains@")[0]
        timed(reconcile, "compile_direction", "compile_direction")
        timed(dp, "_write", "map_writes")
        timed(dp, "_write_half", "write_half")
        timed(Devices, "find", "devices_find")
        timed(Devices, "attach", "attach")
        timed(Devices, "node_addresses", "node_addresses")
        timed(dp, "_need", "need")
        timed(dp, "_ensure_capacity", "ensure_capacity")
        timed(dp, "_sync_counters", "sync_counters")
        timed(reconcile.builds, "drop_old_builds", "drop_old_builds")
        real_flip = dp._flip
        t0 = 0.0

        def flip(half: int) -> None:  # the new addresses are in force from here on
            PARTS["to_flip"][-1] = time.perf_counter() - t0
            real_flip(half)

        dp._flip = flip  # type: ignore[method-assign]
        real_sleep: Callable[[float], None] = time.sleep

        def sleep(s: float) -> None:
            t = time.perf_counter()
            real_sleep(s)
            PARTS["grace_sleep"][-1] += time.perf_counter() - t

        reconcile.time.sleep = sleep  # type: ignore[attr-defined]  # the module's `time`, i.e. this one
        items = []
        try:
            for i in range(a.applies):
                for lab_ in labels:
                    PARTS[lab_].append(0.0)
                items.append((pods[0][0], rule_key, ipaddress.ip_address(f"192.0.{2 + i // 250}.{1 + i % 250}"), 1e12))
                t0 = time.perf_counter()
                prog = with_learned(base, Learned.of(items))
                PARTS["with_learned"][-1] = time.perf_counter() - t0
                dp.apply(prog)
                PARTS["total"][-1] = time.perf_counter() - t0
        finally:
            reconcile.time.sleep = real_sleep  # type: ignore[attr-defined]
            dp.cleanup()
            dp.close()
    row: dict[str, Any] = {"pods": a.pods, "applies": a.applies}
    for lab_ in labels:
        xs = PARTS[lab_]
        row[lab_] = {"mean_ms": round(statistics.mean(xs) * 1000, 3), "p50_ms": round(pct(xs, 0.5) * 1000, 3),
                     "p99_ms": round(pct(xs, 0.99) * 1000, 3)}
    print(json.dumps(row, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
