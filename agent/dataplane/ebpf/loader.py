"""Short-lived child: compile bpf/stockade.c with bcc, load it, pin programs and maps, exit.

    python -m agent.dataplane.ebpf.loader --pin-dir DIR [-D NAME=VALUE ...]

bcc leaves ~160 MB of LLVM in the process that compiles, so the agent runs this in a
child and then works on the pinned objects with plain bpf(2) syscalls
(`agent.dataplane.ebpf.bpfsys`). The child compares every map's key and value layout
with `layout.MAPS` and refuses a build where they differ. Everything is pinned into
`DIR-partial` and renamed to `DIR` at the end, so `DIR` either holds a complete set or
does not exist. `build` hashes the C source and the map sizes, so a changed source or
size loads a new build next to the old one (which the agent removes after its first
apply). Prints one JSON line (timings) on success; on failure prints the cause on
stderr and exits 1. The agent runs it through `agent.dataplane.ebpf.builds`, and never
imports this module (nor bcc).
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
from typing import Any

from agent.dataplane.ebpf import bpfsys, layout
from agent.dataplane.ebpf.builds import MAPS, PROGRAMS, SOURCE, TAILS


def layout_errors(b: Any) -> list[str]:
    """How the maps bcc compiled (`b`: a bcc.BPF) differ from `layout.MAPS`."""
    tables = {}
    for name in MAPS:
        try:
            t = b[name]
        except KeyError:
            continue
        # per-CPU tables: Leaf is the array of one value per CPU, sLeaf the value
        tables[name] = (getattr(t, "Key", None), getattr(t, "sLeaf", t.Leaf))
    return layout.check(tables)

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
    ap.add_argument("--source", default=str(SOURCE), help="the C source (a test's variant)")
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
        b = BPF(src_file=args.source.encode(), cflags=cflags)
    except Exception as e:
        print(f"{HEADERS_HINT} ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    t1 = time.monotonic()
    errors = layout_errors(b)
    if errors:
        print("the map layouts in agent/dataplane/ebpf/layout.py do not match bpf/stockade.c:\n  "
              + "\n  ".join(errors), file=sys.stderr)
        return 1
    try:
        fns = {name: b.load_func(name.encode(), BPF.SCHED_CLS) for name in (*TAILS, *PROGRAMS)}
        tails = b.get_table("tails")
        for i, name in enumerate(TAILS):
            tails[ctypes.c_int(i)] = ctypes.c_int(fns[name].fd)
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
        for name in (*MAPS, "tails"):
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
