"""Datapath benchmark in the namespace lab (tests/kit): two local pods through a node namespace.

Configurations, measured in one run: no policy at all (the floor, measured before and
after the policy configurations), then an ingress policy on the server pod whose rule
allows the client pod plus N other /32 peers (N = 10, 1k, 10k, 100k) on the test ports;
its namespace's other pods stay default-denied. Each configuration is programmed by the
agent's own pipeline and dataplane (`apply` below, run inside the node namespace).

Per configuration and repetition: TCP throughput (iperf3), new TCP connections per
second (bench.loadgen crr), request-response latency p50/p99 on one connection
(bench.loadgen rr), UDP 64-byte packet rate received (iperf3 -u -l 64 -b 0).

Alone (root): `python -m bench.datapath run --dataplanes ebpf --peers 10,100000 --reps 3
[--seconds 1.5] [--out FILE]` prints each configuration's ratios to the floor. A dataplane
`ebpf:peer` is the eBPF dataplane with direct delivery (`--ebpf-deliver peer`), e.g.
`--dataplanes ebpf,ebpf:peer` measures both against the same floors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.kit.generate import (
    CLIENT_IP,
    CRR_PORT,
    IPERF_PORT,
    LOCAL_NODE,
    RR_PORT,
    SERVER_IP,
    datapath_manifests,
)

ROOT = Path(__file__).resolve().parents[1]
# CPU placement, fixed so rounds are comparable on a 2-core VM (unpinned, the scheduler
# flips request-response between same-core ~7 us and cross-core ~60 us wake-ups):
# request-response and connection tests run client and server on one core (CPU-bound,
# so per-packet filter cost shows in the rate); iperf3 client and server on different cores.
RR_CPU = str(max(0, (os.cpu_count() or 1) - 1))
IPERF_CLIENT_CPU, IPERF_SERVER_CPU = "0", RR_CPU
METRICS = ("tcp_gbps", "crr_per_s", "rr_p50_us", "rr_p99_us", "udp64_kpps")


# ------------------------------------------------------------------ inside the node namespace


def apply_cmd(args: argparse.Namespace) -> int:
    """Program the manifests with the agent's pipeline (inside the node namespace)."""
    from agent.admission import LastGood
    from agent.pipeline import compile_kubernetes
    from agent.query import make_dataplane
    from agent.sources.kubeobjects import RawObject, ref_of

    t0 = time.perf_counter()
    dp = make_dataplane(args.dataplane)  # eBPF: pin root from the environment (tests.kit.privileges.dataplane_env)
    if args.clear:
        dp.cleanup()
        print(json.dumps({"cleared": True}))
        return 0
    objs = json.loads(Path(args.manifests).read_text())
    raw = [RawObject(ref_of(b, "kubernetes"), b) for b in objs]
    program = compile_kubernetes(raw, LastGood(), LOCAL_NODE, "kubernetes").program
    t1 = time.perf_counter()
    stats = dp.apply(program)
    t2 = time.perf_counter()
    print(json.dumps({"compile_s": t1 - t0, "apply_s": t2 - t1, "objects": dp.objects(),
                      "full": stats.full}))
    return 0


# ------------------------------------------------------------------ runner side


class Bench:
    def __init__(self, lab: Any, seconds: float) -> None:
        self.lab = lab
        self.seconds = seconds
        self.client = lab.pods["bench/client"].netns
        self.server = lab.pods["bench/server"].netns

    def _in(self, ns: str, cpu: str, *cmd: str, timeout: float = 60) -> str:
        r = subprocess.run(["ip", "netns", "exec", ns, "taskset", "-c", cpu, *cmd], capture_output=True, text=True,
                           timeout=timeout, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()[-500:]}")
        return r.stdout

    def iperf(self, *extra: str) -> dict[str, Any]:
        for attempt in range(3):
            try:
                out = self._in(self.client, IPERF_CLIENT_CPU, "iperf3", "-c", SERVER_IP, "-p", str(IPERF_PORT), "-J",
                               "-t", str(self.seconds), *extra, timeout=self.seconds + 30)
                return json.loads(out)
            except RuntimeError:  # server busy finishing the previous test
                if attempt == 2:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def tcp(self) -> float:
        d = self.iperf()
        return d["end"]["sum_received"]["bits_per_second"] / 1e9

    def udp64(self) -> float:
        d = self.iperf("-u", "-l", "64", "-b", "0")
        s = d["end"]["sum"]
        received = s["packets"] - s.get("lost_packets", 0)
        return received / s["seconds"] / 1e3

    def loadgen(self, mode: str, port: int) -> dict[str, Any]:
        out = self._in(self.client, RR_CPU, sys.executable, "-m", "bench.loadgen", mode, SERVER_IP, str(port),
                       str(self.seconds), timeout=self.seconds + 30)
        return json.loads(out.strip().splitlines()[-1])

    def measure(self) -> dict[str, float]:
        crr = self.loadgen("crr", CRR_PORT)
        if crr["errors"] and not crr["connections"]:
            raise RuntimeError("policy blocks the benchmark traffic: no connection succeeded")
        rr = self.loadgen("rr", RR_PORT)
        return {"tcp_gbps": self.tcp(), "crr_per_s": crr["per_s"], "rr_p50_us": rr["p50_us"],
                "rr_p99_us": rr["p99_us"], "udp64_kpps": self.udp64()}


def _agg(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


def run(dataplanes: list[str], peer_sizes: list[int], reps: int, seconds: float,
        log: Any = print) -> dict[str, Any]:
    from tests.kit import Lab
    from tests.kit.privileges import dataplane_env

    out: dict[str, Any] = {"seconds_per_test": seconds, "reps": reps, "peer_sizes": peer_sizes,
                           "dataplanes": {}}
    tmp = Path(tempfile.mkdtemp(prefix="stkbench-dp-"))
    with contextlib.ExitStack() as cleanup, Lab(prefix=f"stkbench{os.getpid()}d") as lab:
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        lab.add_pod("bench/client", [CLIENT_IP], ports=(81,))
        lab.add_pod("bench/server", [SERVER_IP], ports=(81,))
        server = lab.pods["bench/server"].netns
        for cpu, cmd in ((IPERF_SERVER_CPU, ["iperf3", "-s", "-p", str(IPERF_PORT), "--rcv-timeout", "5000"]),
                         (RR_CPU, [sys.executable, "-m", "bench.loadgen", "serve", str(CRR_PORT), str(RR_PORT)])):
            p = subprocess.Popen(["ip", "netns", "exec", server, "taskset", "-c", cpu, *cmd], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            lab.procs.append(p)
        time.sleep(0.5)
        bench = Bench(lab, seconds)
        for label in dataplanes:
            dpname, _, how = label.partition(":")  # "ebpf:peer": direct delivery
            with dataplane_env(dpname, f"bench-{os.getpid()}"), _delivery(how):  # eBPF: a private bpffs
                try:
                    out["dataplanes"][label] = _run_dataplane(lab, bench, dpname, peer_sizes, reps, tmp, log)
                except Exception as e:  # report, keep the other dataplane's figures
                    log(f"datapath {label} failed: {e}")
                    out["dataplanes"][label] = {"error": str(e)}
                finally:
                    _apply(lab, dpname, None, clear=True, check=False)
    return out


def _delivery(how: str) -> Any:
    """$STOCKADE_EBPF_DELIVER for the agent runs inside ("": the default, stack), restored after."""
    from unittest import mock

    from agent.dataplane.ebpf.layout import DELIVER_ENV

    return mock.patch.dict(os.environ, {DELIVER_ENV: how or "stack"})


def _apply(lab: Any, dpname: str, manifests_file: Path | None, clear: bool = False,
           check: bool = True) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.datapath", "apply", "--dataplane", dpname]
    cmd += ["--clear"] if clear else ["--manifests", str(manifests_file)]
    r = lab.node_sh(*cmd, check=check, cwd=ROOT)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else {}


def _run_dataplane(lab: Any, bench: Bench, dpname: str, peer_sizes: list[int], reps: int, tmp: Path,
                   log: Any) -> dict[str, Any]:
    """Rounds of (floor, 10, ..., 100k): every configuration once per round, so slow drift
    of the machine hits the floor and the policies alike."""
    raw: dict[str, list[dict[str, float]]] = {}
    applied: dict[str, Any] = {}
    for peers in peer_sizes:
        f = tmp / f"{dpname}-{peers}.json"
        f.write_text(json.dumps(datapath_manifests(peers)))
    for r in range(reps):
        for peers in [0, *peer_sizes]:
            name = "floor" if peers == 0 else str(peers)
            if peers == 0:
                _apply(lab, dpname, None, clear=True)
            else:
                applied[name] = _apply(lab, dpname, tmp / f"{dpname}-{peers}.json")
            m = bench.measure()
            raw.setdefault(name, []).append(m)
            log(f"  {dpname} {name:>6} round {r + 1}: " + " ".join(f"{k}={v:.4g}" for k, v in m.items()))
    result: dict[str, Any] = {"applied": applied, "floor": {k: _agg([x[k] for x in raw["floor"]])
                                                            for k in METRICS}, "configs": {}}
    floor = {k: result["floor"][k]["median"] for k in METRICS}
    for name, ms in raw.items():
        if name == "floor":
            continue
        cfg: dict[str, Any] = {}
        for k in METRICS:
            vals = [x[k] for x in ms]
            # value / floor for every metric (> 1 is worse for latencies; the table says so);
            # per round as well: the ratio to the floor of the same round.
            per_round = [v / raw["floor"][i][k] for i, v in enumerate(vals)]
            cfg[k] = _agg(vals) | {"ratio": _agg([v / floor[k] for v in vals]),
                                   "ratio_same_round": _agg(per_round)}
        result["configs"][name] = cfg
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.datapath")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply")
    a.add_argument("--dataplane", default="nftables", choices=["nftables", "ebpf"])
    a.add_argument("--manifests")
    a.add_argument("--clear", action="store_true")
    r = sub.add_parser("run", help="measure: floor and each peer size, in rounds (needs root)")
    r.add_argument("--dataplanes", default="ebpf", help="comma list of nftables,ebpf,ebpf:peer")
    r.add_argument("--peers", default="10,100000", help="comma list of peer-set sizes")
    r.add_argument("--reps", type=int, default=3, help="rounds")
    r.add_argument("--seconds", type=float, default=1.5, help="seconds per measurement")
    r.add_argument("--out", help="write the result as JSON here")
    c = sub.add_parser("cost", help="ns per packet of each eBPF hook on an established flow (BPF_PROG_TEST_RUN)")
    c.add_argument("--peers", type=int, default=10)
    c.add_argument("--repeat", type=int, default=200000)
    c.add_argument("--trials", type=int, default=5, help="the least mean of these many runs is kept")
    c.add_argument("--root", help="agent tree that programs the lab (default: this one)")
    args = ap.parse_args(argv)
    if args.cmd == "apply":
        return apply_cmd(args)
    if args.cmd == "cost":
        return cost_cmd(args)
    return run_cmd(args)


# ------------------------------------------------------------------ per-packet cost (BPF_PROG_TEST_RUN)

PROG_TEST_RUN = 10  # bpf(2) command


def test_run(prog_fd: int, data: bytes, ifindex: int, repeat: int) -> tuple[int, int]:
    """(return code, mean ns per run) of a tc program on `data` as if on device `ifindex`
    (resolved in the caller's network namespace)."""
    import ctypes

    from agent.dataplane.ebpf import bpfsys

    ctx = bytearray(192)  # struct __sk_buff; ifindex at offset 40
    ctx[40:44] = ifindex.to_bytes(4, "little")
    buf, cbuf = ctypes.create_string_buffer(data, len(data)), ctypes.create_string_buffer(bytes(ctx), len(ctx))
    attr = bpfsys._attr()
    for off, ctype, val in ((0, ctypes.c_uint32, prog_fd), (8, ctypes.c_uint32, len(data)),
                            (16, ctypes.c_uint64, ctypes.addressof(buf)), (32, ctypes.c_uint32, repeat),
                            (40, ctypes.c_uint32, len(ctx)), (48, ctypes.c_uint64, ctypes.addressof(cbuf))):
        bpfsys._put(attr, off, ctype, val)
    bpfsys._bpf(PROG_TEST_RUN, attr)
    return ctypes.c_uint32.from_buffer(attr, 4).value, ctypes.c_uint32.from_buffer(attr, 36).value


def udp_frame(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A 64-byte Ethernet frame of an IPv4 UDP packet (checksums are not read by the program)."""
    import ipaddress
    import struct

    payload = bytes(64 - 14 - 20 - 8)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 1, 0, 64, 17, 0,
                     ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp + payload


def cost_cmd(args: argparse.Namespace) -> int:
    """Per-packet ns of each hook on an established pod-to-pod UDP flow, by BPF_PROG_TEST_RUN on
    the pinned programs (CPU time of the classifier alone: far less noisy than packet rates on a
    shared VM). `--root`: the tree whose agent programs the lab (e.g. an export of main)."""
    import socket as so

    from agent.dataplane.ebpf import bpfsys
    from tests.kit import Lab
    from tests.kit.netns import call_in
    from tests.kit.privileges import dataplane_env

    root = Path(args.root or ROOT)
    f = Path(tempfile.mkdtemp(prefix="stkbench-cost-")) / "m.json"
    f.write_text(json.dumps(datapath_manifests(args.peers)))
    out: dict[str, Any] = {"root": str(root), "peers": args.peers, "repeat": args.repeat}
    with Lab(prefix=f"stkcost{os.getpid()}") as lab, dataplane_env("ebpf", f"cost{os.getpid()}"):
        lab.add_pod("bench/client", [CLIENT_IP], ports=(81,))
        lab.add_pod("bench/server", [SERVER_IP], ports=(IPERF_PORT,))
        lab.node_sh(sys.executable, "-m", "bench.datapath", "apply", "--dataplane", "ebpf", "--manifests", str(f),
                    cwd=root)

        def udp() -> so.socket:
            s = so.socket(so.AF_INET, so.SOCK_DGRAM)
            s.bind((CLIENT_IP, 40000))
            s.connect((SERVER_IP, IPERF_PORT))
            return s

        s = call_in(lab.pods["bench/client"].netns, udp)
        s.settimeout(1)
        for _ in range(5):  # the flow known at both ends (and, vouching, each device learned)
            s.send(b"x")
            s.recv(64)
        pin_root = os.environ["STOCKADE_BPF_PIN_ROOT"]
        build = next(d for d in os.listdir(pin_root) if not d.startswith("shared-"))
        progs = [bpfsys.obj_get(f"{pin_root}/{build}/{n}") for n in ("stk_ingress", "stk_egress")]
        def measure() -> dict[str, Any]:
            fwd = udp_frame(CLIENT_IP, SERVER_IP, 40000, IPERF_PORT)
            rev = udp_frame(SERVER_IP, CLIENT_IP, IPERF_PORT, 40000)
            cases = {"request, source hook": (0, fwd, "bench/client"),
                     "request, destination hook": (1, fwd, "bench/server"),
                     "reply, source hook": (0, rev, "bench/server"),
                     "reply, destination hook": (1, rev, "bench/client"),
                     # more than a vouched packet costs there (config, then active and an ifcfg
                     # miss, where the vouched path stops after config): its upper bound
                     "no device entry (lo), destination hook": (1, fwd, "lo")}
            res = {}
            for name, (hook, data, pod) in cases.items():
                runs = [test_run(progs[hook], data, idx[pod], args.repeat) for _ in range(args.trials)]
                res[name] = {"rc": runs[0][0], "ns": min(r[1] for r in runs)}
            return res

        # /sys/class/net is the mounting namespace's: read ifindexes inside the node namespace
        idx = call_in(lab.node, lambda: {k: so.if_nametoindex(p.host_if) for k, p in lab.pods.items()} | {"lo": 1})
        out["hooks"] = call_in(lab.node, measure)
        s.close()
        for fd in progs:
            os.close(fd)
        lab.node_sh(sys.executable, "-m", "bench.datapath", "apply", "--dataplane", "ebpf", "--clear", cwd=root)
    out["loadavg"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    return 0


def run_cmd(args: argparse.Namespace) -> int:
    """Measure and print the ratios to the floor (median [min-max] over rounds), as the README's table."""
    res = run(args.dataplanes.split(","), [int(p) for p in args.peers.split(",") if p], args.reps, args.seconds)
    res["loadavg"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"load average at the end: {res['loadavg']}")
    for dp, r in res["dataplanes"].items():
        for name, cfg in r.get("configs", {}).items():
            print(f"{dp:>8} {name:>6}: " + "  ".join(
                f"{k} {cfg[k]['ratio']['median']:.2f} [{cfg[k]['ratio']['min']:.2f}-{cfg[k]['ratio']['max']:.2f}]"
                for k in METRICS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
