"""`make demo`: enforce a manifest directory in a throwaway namespace lab and show
`stockade matrix` next to what real probes saw. Needs root; removes the lab at the end.

    python -m tests.kit.demo examples
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from agent.pipeline import DirectoryPipeline
from tests.kit import Lab


def main(source: str) -> int:
    snap = DirectoryPipeline(source, None).snapshot()
    eps = sorted(snap.inventory.endpoints.values(), key=lambda e: e.key)
    ports = sorted({p.port for e in eps for p in e.ports if p.protocol == "TCP"})
    nodes = sorted({e.node for e in eps})
    if len(nodes) != 1:
        print(f"demo wants every pod on one node, found {nodes}", file=sys.stderr)
        return 1
    disagreements = 0
    with Lab() as lab, tempfile.TemporaryDirectory() as state:
        print(f"lab: node namespace {lab.node}, {len(eps)} pods; enforcing {source} on node {nodes[0]}")
        for e in eps:
            lab.add_pod(e.key, [str(ip) for ip in e.ips], ports=ports)
        lab.stockade("apply", "--source", source, "--node", nodes[0], "--state-dir", state)
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
        lab.stockade("cleanup")
    print("\ncolumns:", ", ".join(f"{i}={e.key}" for i, e in enumerate(eps)))
    print("matrix and kernel agree on every probe" if not disagreements
          else f"{disagreements} DISAGREEMENTS between matrix and kernel")
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main(str(Path(sys.argv[1] if len(sys.argv) > 1 else "examples").resolve())))
