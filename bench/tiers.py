"""Tier benchmark: one ClusterNetworkPolicy added -> kernel, beside one NetworkPolicy added.

    python -m bench.tiers [--size 1k] [--events 20] [--dataplanes nftables,ebpf] [--json F]   (as root)

(`make bench` runs it too, at 1k with 20 events per kind; --skip-tiers leaves it out.)

Each dataplane runs in a fresh network namespace (made and deleted here; the worker,
`python -m bench.tiers worker ...`, runs inside it). The worker plays the whole agent path
against the fake API server (tests/kit/kubeapi.py, real HTTP list/watch on the namespace's
loopback): a generated cluster plus a few standing cluster policies is listed, the daemon
(KubernetesSource -> pipeline -> real dataplane) syncs it, then NetworkPolicies and
ClusterNetworkPolicies are added one at a time, alternating, each of the same shape (every
pod of the namespace with the most local pods; peers: one team's namespaces; a new TCP
port), so each changes the kernel by one rule. Two figures per kind:

- `put_to_kernel_s`: from the API server accepting the object to the daemon's apply
  having returned with it (the watch's delivery, the debounce, compile and apply);
- `wire_to_kernel_s`: what the daemon itself reports (stockade_event_to_kernel_seconds):
  from reading the event off the watch to the apply having returned.

Nothing here asserts on time; it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.control import make_dataplane, size_of, summary
from tests.kit.generate import TEAMS, generate

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("NetworkPolicy", "ClusterNetworkPolicy")
DEBOUNCE = 0.02  # the CLI's default (`stockade run --debounce`)
CNP_API = "policy.networking.k8s.io/v1alpha2"


def standing_policies() -> list[dict[str, Any]]:
    """Cluster policies already in force, so an added one is never the first of its tier."""
    def cnp(name: str, tier: str, priority: int, rule: dict[str, Any], ingress: bool) -> dict[str, Any]:
        return {"apiVersion": CNP_API, "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
                "spec": {"tier": tier, "priority": priority, "subject": {"namespaces": {}},
                         "ingress" if ingress else "egress": [rule]}}

    return [
        cnp("deny-metadata", "Admin", 1, {"name": "metadata", "action": "Deny",
                                          "to": [{"networks": ["169.254.169.254/32"]}]}, ingress=False),
        cnp("monitoring-pass", "Admin", 2, {"name": "scrapes", "action": "Pass",
                                            "from": [{"namespaces": {"matchLabels": {"monitoring": "true"}}}]},
            ingress=True),
        cnp("dns", "Admin", 3, {"name": "kube-dns", "action": "Accept", "to": [{"pods": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {}}}], "protocols": [{"udp": {"destinationPort": {"number": 53}}}]}, ingress=False),
        cnp("baseline", "Baseline", 1, {"name": "other-namespaces", "action": "Deny",
                                        "from": [{"namespaces": {"matchLabels": {"env": "dev"}}}]}, ingress=True),
    ]


def added(kind: str, i: int, namespace: str, team: str) -> dict[str, Any]:
    """The i-th object of `kind`: every pod of `namespace`, peers of `team`, TCP port 20000+i."""
    port = 20000 + i
    if kind == "NetworkPolicy":
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": f"bench-np-{i}", "namespace": namespace},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{
                    "from": [{"namespaceSelector": {"matchLabels": {"team": team}}}],
                    "ports": [{"protocol": "TCP", "port": port}]}]}}
    return {"apiVersion": CNP_API, "kind": "ClusterNetworkPolicy", "metadata": {"name": f"bench-cnp-{i}"},
            "spec": {"tier": "Admin", "priority": 100 + i % 900,
                     "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
                     "ingress": [{"name": "from-team", "action": "Deny",
                                  "from": [{"namespaces": {"matchLabels": {"team": team}}}],
                                  "protocols": [{"tcp": {"destinationPort": {"number": port}}}]}]}}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Inside a fresh network namespace: fake API on its loopback, the daemon, a real dataplane."""
    from prometheus_client import CollectorRegistry

    from agent.daemon import Daemon
    from agent.pipeline import KubernetesPipeline
    from agent.sources.kubernetes import KubernetesSource
    from tests.kit.kubeapi import FakeKubeAPI

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    workdir = Path(args.workdir)
    pods, policies = size_of(args.size)
    cl = generate(pods, policies, seed=args.seed)
    local = [p["metadata"]["namespace"] for p in cl.local_pods]
    namespace = max(sorted(set(local)), key=local.count)
    api = FakeKubeAPI().start()
    out: dict[str, Any] = {"size": args.size, "dataplane": args.dataplane, "namespace": namespace,
                           "local_pods_in_namespace": local.count(namespace)}
    for obj in [*cl.objects(), *standing_policies()]:
        api.put(obj)
    dp = make_dataplane(args.dataplane, workdir)
    src = KubernetesSource(kubeconfig=str(api.kubeconfig(workdir / "kubeconfig")), node=cl.node)
    daemon = Daemon(KubernetesPipeline(cl.node, source=src), dp, debounce=DEBOUNCE, resync=3600,
                    registry=CollectorRegistry())
    applied: dict[tuple[str, str, str], float] = {}
    seen = threading.Condition()

    def on_synced(snap: Any) -> None:
        now = time.perf_counter()
        with seen:
            for ev in snap.events:
                applied.setdefault(ev.ref.key, now)
            seen.notify_all()

    daemon.on_synced.append(on_synced)
    thread = threading.Thread(target=daemon.run, name="daemon", daemon=True)
    t0 = time.perf_counter()
    thread.start()
    try:
        if not daemon.ready.wait(600) or not src.synced.wait(600):
            raise RuntimeError("the daemon never became ready")
        out["cold_s"] = time.perf_counter() - t0
        put_to_kernel: dict[str, list[float]] = {k: [] for k in KINDS}
        for i in range(args.events):
            for kind in KINDS if i % 2 == 0 else reversed(KINDS):  # alternate who goes first
                obj = added(kind, i, namespace, TEAMS[i % len(TEAMS)])
                ns = obj["metadata"].get("namespace", "") if kind == "NetworkPolicy" else ""
                key = (kind, ns, obj["metadata"]["name"])
                start = time.perf_counter()
                api.put(obj)
                with seen:
                    if not seen.wait_for(lambda key=key: key in applied, timeout=120):
                        raise RuntimeError(f"{kind} {key[2]} never reached the kernel")
                    put_to_kernel[kind].append(applied[key] - start)
        wire = {k: [dt for kind, etype, dt in daemon.event_latency.samples if kind == k and etype == "ADDED"]
                for k in KINDS}
        out["kinds"] = {k: {"put_to_kernel_s": summary(put_to_kernel[k]), "wire_to_kernel_s": summary(wire[k])}
                        for k in KINDS}
        np_med = out["kinds"]["NetworkPolicy"]["put_to_kernel_s"]["median"]
        cnp_med = out["kinds"]["ClusterNetworkPolicy"]["put_to_kernel_s"]["median"]
        out["cnp_over_np"] = cnp_med / np_med if np_med else None
        out["program"] = {"local_endpoints": len(daemon.program.endpoints) if daemon.program else 0,
                          "objects": dp.objects()}
    finally:
        daemon.stop()
        thread.join(30)
        dp.cleanup()
        api.close()
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}" if x >= 0.1 else f"{x * 1000:.1f}"


def line(key: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"  {key}: ERROR {r['error'].splitlines()[-1][:200] if r['error'] else ''}"
    parts = []
    for k in KINDS:
        p, w = r["kinds"][k]["put_to_kernel_s"], r["kinds"][k]["wire_to_kernel_s"]
        parts.append(f"{k} {_ms(p['median'])}/{_ms(p['p99'])} (n={p['n']}), wire {_ms(w['median'])}/{_ms(w['p99'])}")
    ratio = r.get("cnp_over_np")
    return f"  {key}: " + "; ".join(parts) + (f"; CNP/NP median {ratio:.2f}" if ratio else "")


def table(res: dict[str, Any]) -> str:
    """One line per dataplane: NetworkPolicy vs ClusterNetworkPolicy added -> kernel."""
    return "\n".join(["one policy added -> kernel (median/p99 ms, n): API put -> apply returned; "
                      "wire = watch event read -> apply returned", *(line(k, r) for k, r in res.items())])


def run(dataplanes: list[str], size: str, events: int, seed: int, log: Any = print) -> dict[str, Any]:
    """Each dataplane's worker in its own fresh network namespace; returns {dataplane/size: result}."""
    res: dict[str, Any] = {}
    for dp in dataplanes:
        ns = f"stktiers{os.getpid()}-{dp}"
        work = tempfile.mkdtemp(prefix="stkbench-tiers-")
        out = Path(work) / "result.json"
        log(f"tiers: {dp} {size}, {events} NetworkPolicies and {events} ClusterNetworkPolicies added")
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "bench.tiers", "worker",
                                "--size", size, "--dataplane", dp, "--events", str(events), "--seed", str(seed),
                                "--workdir", work, "--out", str(out)],
                               cwd=ROOT, capture_output=True, text=True, timeout=1800)
            res[f"{dp}/{size}"] = (json.loads(out.read_text()) if r.returncode == 0
                                   else {"error": r.stderr.strip()[-1500:]})
        except subprocess.TimeoutExpired:
            res[f"{dp}/{size}"] = {"error": "timed out after 1800 s"}
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
            shutil.rmtree(work, ignore_errors=True)
        log(line(f"{dp}/{size}", res[f"{dp}/{size}"]))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tiers", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--size", default="1k")
    w.add_argument("--dataplane", default="nftables", choices=["nftables", "ebpf"])
    w.add_argument("--events", type=int, default=20)
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--workdir", required=True)
    w.add_argument("--out", required=True)
    ap.add_argument("--size", default="1k", help="1k | 10k | 50k | PODS/POLICIES")
    ap.add_argument("--events", type=int, default=20, help="objects added per kind")
    ap.add_argument("--dataplanes", default="nftables,ebpf")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.tiers needs root (network namespaces, nftables, eBPF)", file=sys.stderr)
        return 2
    if args.cmd == "worker":
        Path(args.out).write_text(json.dumps(worker(args), indent=1, default=str))
        return 0
    res = run(args.dataplanes.split(","), args.size, args.events, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
