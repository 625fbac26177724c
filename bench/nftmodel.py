"""In-process cost of one nftables event: build_model, diff, by event kind and size.

The synthetic cluster (tests/kit/generate.py, as bench/events.py builds it) through
admission and the incremental compiler, a first model built, then per event (a remote
pod's labels, a new remote pod, a policy added) the model build
with the dataplane's memory (`NftablesDataplane.apply` without the kernel: `update`),
the same by the full `build_model` (the reference), and the diff.
CPU milliseconds, medians and maxima; no kernel: `bench.events` measures by packets.
Prints figures; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from typing import Any

from agent.admission import LastGood, kubernetes_inventory
from agent.dataplane.nftables import Memo, Options, build_model, diff, update
from agent.policy.kubernetes.incremental import IncrementalCompiler
from agent.sources.kubeobjects import RawObject, ref_of
from tests.kit.generate import SIZES, generate

KINDS = ("pod_labels", "pod_remote", "policy_added")


class World:
    def __init__(self, size: str, seed: int) -> None:
        pods, pols = SIZES[size]
        self.cl = generate(pods, pols, seed)
        self.raw: dict[tuple[str, str, str], RawObject] = {}
        for body in self.cl.objects():
            self.put(body)
        self.store = LastGood()
        self.compiler = IncrementalCompiler(self.cl.node, "kubernetes")
        self.added = 0

    def put(self, body: dict[str, Any]) -> None:
        obj = RawObject(ref_of(body, "kubernetes"), body)
        self.raw[(obj.ref.kind, obj.ref.namespace, obj.ref.name)] = obj

    def event(self, kind: str) -> None:
        cl = self.cl
        if kind == "pod_labels":
            remote = [i for i in range(0, len(cl.pod_objs), 7) if cl.pod_objs[i]["spec"]["nodeName"] != cl.node]
            i = remote[cl.rng.randrange(len(remote))]
            body = cl.pod_objs[i] = cl.relabel_pod(cl.pod_objs[i])
        elif kind == "pod_remote":
            body = cl.new_pod(local=False)
            cl.pod_objs.append(body)
        else:  # a copy of an existing policy under a new name
            body = copy.deepcopy(cl.policy_objs[cl.rng.randrange(len(cl.policy_objs))])
            body["metadata"]["name"] = f"added-{self.added}"
            self.added += 1
            cl.policy_objs.append(body)
        self.put(body)

    def program(self):  # type: ignore[no-untyped-def]
        return self.compiler.compile(kubernetes_inventory(list(self.raw.values()), self.store))


def ms(t0: float) -> float:
    return (time.process_time() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.nftmodel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10k")
    ap.add_argument("--events", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="also compare each model with a full build")
    args = ap.parse_args()
    opts = Options()
    for size in args.sizes.split(","):
        gc.unfreeze()
        w = World(size, args.seed)
        memo = Memo()
        prog = w.program()
        t0 = time.process_time()
        model = update(prog, opts, None, memo)
        gc.freeze()  # as the daemon does after its first sync (agent/daemon.py Heap)
        out: dict[str, Any] = {"size": size, "endpoints": len(prog.endpoints), "sets": len(model.sets),
                               "first_build_ms": round(ms(t0), 1), "events": {}}
        for kind in KINDS:
            figs: dict[str, list[float]] = {"update": [], "build_model": [], "diff": []}
            for _ in range(args.events):
                w.event(kind)
                prog = w.program()
                gc.disable()  # the daemon syncs with the collector paused (agent/pipeline.py gc_paused)
                t0 = time.process_time()
                new = update(prog, opts, model, memo)
                figs["update"].append(ms(t0))
                t0 = time.process_time()
                ref = build_model(prog, opts, model)
                figs["build_model"].append(ms(t0))
                if args.check:
                    assert new == ref and new.shared == ref.shared, kind
                t0 = time.process_time()
                diff(model, new)
                figs["diff"].append(ms(t0))
                gc.enable()
                model = new
            out["events"][kind] = {k: {"p50": round(statistics.median(v), 2), "max": round(max(v), 2)}
                                   for k, v in figs.items()}
        print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
