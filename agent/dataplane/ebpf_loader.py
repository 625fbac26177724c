"""Short-lived child: compile bpf/stockade.c with bcc, load it, pin programs and maps, exit.

    python -m agent.dataplane.ebpf_loader --pin-dir DIR [-D NAME=VALUE ...]

bcc leaves ~160 MB of LLVM in the process that compiles, so the agent runs this in a
child and then works on the pinned objects with plain bpf(2) syscalls
(`agent.dataplane.bpfsys`). Everything is pinned into `DIR-partial` and renamed to
`DIR` at the end, so `DIR` either holds a complete set or does not exist.
Prints one JSON line (timings) on success; on failure prints the cause on stderr and
exits 1.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from agent.dataplane import bpfsys

SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "stockade.c"
PROGRAMS = ("stk_ingress", "stk_egress")
MAPS = (
    "active", "addrs", "epstate", "ifcfg", "nodeaddrs", "peers", "ports", "flows", "frags",
    "rule_stats", "drop_stats", "epkeys", "slotinfo", "config", "sample_tat", "samples",
)

HEADERS_HINT = (
    "bcc could not compile the eBPF program. The usual cause on a kernel without a headers "
    "package is missing /lib/modules/$(uname -r)/{build,source}: install linux-headers-amd64 "
    "and run `make kernel-headers` (it links them to the generic Debian headers)."
)

# What loading and pinning the tc programs takes (include/uapi/linux/capability.h bits):
# NET_ADMIN for a tc program, BPF for maps and programs, PERFMON for the verifier to accept
# pointer arithmetic. SYS_ADMIN also counts as BPF and PERFMON (kernels before 5.8 have only it).
NEEDED_CAPS = {"CAP_NET_ADMIN": 12, "CAP_PERFMON": 38, "CAP_BPF": 39}
CAP_SYS_ADMIN = 21


def missing_capabilities(status: str) -> list[str]:
    """The capabilities in NEEDED_CAPS that a /proc/PID/status text's CapEff lacks."""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status, re.M)
    eff = int(m[1], 16) if m else 0
    admin = bool(eff >> CAP_SYS_ADMIN & 1)
    return [name for name, bit in NEEDED_CAPS.items()
            if not eff >> bit & 1 and not (admin and name != "CAP_NET_ADMIN")]


def bpf_refused() -> OSError | None:
    """Why the kernel refuses to create a one-entry array map, if it does. With the
    capabilities above this is a seccomp profile or an LSM: runtimes' default seccomp
    profiles allowed bpf(2) only with CAP_SYS_ADMIN for years."""
    attr = bpfsys._attr()
    for offset, value in ((0, 2), (4, 4), (8, 4), (12, 1)):  # BPF_MAP_TYPE_ARRAY, key, value, entries
        bpfsys._put(attr, offset, ctypes.c_uint32, value)
    try:
        os.close(bpfsys._bpf(bpfsys.MAP_CREATE, attr))
    except OSError as e:
        return e
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pin-dir", required=True)
    ap.add_argument("-D", dest="defines", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        from bcc import BPF  # heavy: LLVM
    except ImportError as e:
        print(f"bcc is not importable ({e}): install python3-bpfcc and build the venv with "
              "--system-site-packages (make setup)", file=sys.stderr)
        return 1
    # Without them bcc fails on its first map with a message that blames the kernel headers.
    missing = missing_capabilities(Path("/proc/self/status").read_text())
    if missing:
        print(f"the eBPF dataplane needs capabilities {', '.join(NEEDED_CAPS)} (CAP_SYS_ADMIN also covers "
              f"CAP_BPF and CAP_PERFMON); this process lacks {', '.join(missing)}", file=sys.stderr)
        return 1
    refused = bpf_refused()
    if refused is not None:
        print(f"the kernel refused bpf(2) ({refused.strerror}) although this process has the capabilities it "
              "needs: a seccomp profile or LSM blocks it (container runtimes' default seccomp profiles allow "
              "bpf(2) only with CAP_SYS_ADMIN; the eBPF deployment needs a profile that allows it)", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    cflags = [f"-D{d}" for d in args.defines] + ["-w"]
    try:
        b = BPF(src_file=str(SOURCE).encode(), cflags=cflags)
    except Exception as e:
        print(f"{HEADERS_HINT} ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    t1 = time.monotonic()
    try:
        fns = {name: b.load_func(name.encode(), BPF.SCHED_CLS) for name in PROGRAMS}
    except Exception as e:
        print(f"the kernel refused the eBPF program (need CAP_BPF/CAP_NET_ADMIN and a BPF-enabled "
              f"kernel): {e}", file=sys.stderr)
        return 1
    t2 = time.monotonic()
    final = args.pin_dir.rstrip("/")
    tmp = final + "-partial"  # bpffs refuses dots in names
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        for name, fn in fns.items():
            bpfsys.obj_pin(fn.fd, f"{tmp}/{name}")
        for name in MAPS:
            table = b.get_table(name)
            fd = table.get_fd() if hasattr(table, "get_fd") else table.map_fd  # QueueStack has no get_fd
            bpfsys.obj_pin(fd, f"{tmp}/{name}")
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"pinning under {final} failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"compile_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3), "pin_dir": final}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
