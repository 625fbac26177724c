"""`make demo`: enforce a manifest directory in a throwaway namespace lab and show
`stockade matrix` next to what real probes saw, then `stockade explain` for a flow decided
by each ClusterNetworkPolicy rule (Admin and Baseline tiers) that decides one. Needs root;
removes the lab at the end.

    python -m tests.kit.demo examples [nftables|ebpf]
"""

from __future__ import annotations

import ipaddress
import json
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from agent.inventory import Endpoint
from agent.ir import Tier, Verdict
from agent.pipeline import DirectoryPipeline, Snapshot
from agent.query import explain
from agent.sources.files import DirectorySource
from agent.sources.kubeobjects import CLUSTER_POLICY_KINDS
from tests.kit import Lab
from tests.kit.privileges import dataplane_env


def _network_targets(source: str) -> Iterator[tuple[str, str]]:
    """(address, port) for each `networks` peer of a cluster policy's egress rule: flows to
    outside the cluster that only `explain` shows (the lab has nothing there to probe)."""
    objects, _ = DirectorySource(source, settle=0).read()
    for obj in objects:
        spec = obj.body.get("spec") if obj.ref.kind in CLUSTER_POLICY_KINDS else None
        for rule in (spec or {}).get("egress") or [] if isinstance(spec, Mapping) else []:
            for peer in rule.get("to") or [] if isinstance(rule, Mapping) else []:
                nets = peer.get("networks") if isinstance(peer, Mapping) else None
                for net in nets or [] if isinstance(nets, list) else []:
                    try:
                        address = ipaddress.ip_network(str(net), strict=False).network_address
                    except ValueError:
                        continue
                    yield str(address), _first_port(rule)


def _first_port(rule: Mapping[str, Any]) -> str:
    for proto in rule.get("protocols") or []:
        for body in proto.values() if isinstance(proto, Mapping) else []:
            number = (body.get("destinationPort") or {}).get("number") if isinstance(body, Mapping) else None
            if number:
                return str(number)
    return "80"


def tier_flows(snap: Snapshot, eps: list[Endpoint], ports: list[int], source: str) -> list[tuple[str, str, str]]:
    """One TCP flow per Admin/Baseline rule that decides (or passes) some flow: allowed
    flows first, then denied ones; pod pairs on the demo's ports, then the policies'
    `networks` peers."""
    candidates = [(s.key, d.key, str(p)) for p in ports for s in eps for d in eps if s is not d]
    candidates += [(eps[0].key, addr, port) for addr, port in _network_targets(source)] if eps else []
    flows = [(c, explain(snap, c[0], c[1], "TCP", c[2]).flow) for c in candidates]
    # Allowed flows first, and those a NetworkPolicy rule took part in (a Pass that a
    # NetworkPolicy then accepted); otherwise in the order met (a stable sort).
    flows.sort(key=lambda cf: (cf[1].verdict is not Verdict.ACCEPT, not any(
        d.rule is not None and d.rule.tier is Tier.POLICY for d in (cf[1].egress, cf[1].ingress) if d)))
    seen: set[str] = set()
    out = []
    for (src, dst, port), flow in flows:
        rules = [r for d in (flow.egress, flow.ingress) if d is not None for r in (*d.passed, d.rule)
                 if r is not None and r.tier is not Tier.POLICY]
        new = {str(r.origin) for r in rules} - seen
        if new:
            seen |= new
            out.append((src, dst, port))
    return out


def main(source: str, dataplane: str = "nftables") -> int:
    snap = DirectoryPipeline(source, None).snapshot()
    eps = sorted(snap.inventory.endpoints.values(), key=lambda e: e.key)
    ports = sorted({p.port for e in eps for p in e.ports if p.protocol == "TCP"})
    nodes = sorted({e.node for e in eps})
    if len(nodes) != 1:
        print(f"demo wants every pod on one node, found {nodes}", file=sys.stderr)
        return 1
    disagreements = 0
    with dataplane_env(dataplane, "demo"), Lab() as lab, tempfile.TemporaryDirectory() as state:
        print(f"lab: node namespace {lab.node}, {len(eps)} pods; enforcing {source} on node {nodes[0]} "
              f"({dataplane})")
        for e in eps:
            lab.add_pod(e.key, [str(ip) for ip in e.ips], ports=ports)
        lab.stockade("apply", "--source", source, "--node", nodes[0], "--state-dir", state,
                     "--dataplane", dataplane)
        width = max(len(e.key) for e in eps)
        for port in ports:
            sim = json.loads(lab.stockade("matrix", "--source", source, "--port", str(port),
                                          "--output", "json", "--state-dir", state).stdout)["verdicts"]
            specs = {s.key: [f"tcp:{d.ips[0]}:{port}" for d in eps if d is not s] for s in eps}
            seen = lab.probe_many(specs, timeout=0.5)
            print(f"\nTCP/{port}   (matrix/probe: A = allow, d = deny, ! = they disagree)")
            print(" " * (width + 2) + "  ".join(f"{i:>3}" for i in range(len(eps))))
            for i, s in enumerate(eps):
                cells = []
                for d in eps:
                    if d is s:
                        cells.append("  -")
                        continue
                    m = sim[s.key][d.key] == "allow"
                    p = seen[s.key][f"tcp:{d.ips[0]}:{port}"]
                    disagreements += m != p
                    cells.append(("A" if m else "d") + "/" + ("A" if p else "d") + ("!" if m != p else ""))
                print(f"{s.key:>{width}} {i:>1} " + " ".join(f"{c:>4}" for c in cells))
        flows = tier_flows(snap, eps, ports, source)
        if flows:
            print("\nClusterNetworkPolicy tiers at work (stockade explain):")
        for src, dst, port in flows:
            out = lab.stockade("explain", "--source", source, "--from", src, "--to", dst, "--port", port,
                               "--state-dir", state).stdout
            print("$ stockade explain --from", src, "--to", dst, "--port", port)
            print(out.rstrip())
        lab.stockade("cleanup", "--dataplane", dataplane)
    print("\ncolumns:", ", ".join(f"{i}={e.key}" for i, e in enumerate(eps)))
    print("matrix and kernel agree on every probe" if not disagreements
          else f"{disagreements} DISAGREEMENTS between matrix and kernel")
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main(str(Path(sys.argv[1] if len(sys.argv) > 1 else "examples").resolve()), *sys.argv[2:3]))
