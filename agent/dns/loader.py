"""Short-lived child: compile bpf/dnshold.c with bcc, load it, hand the program and its map
to the agent as file descriptors over a Unix socket (SCM_RIGHTS), exit.

    python -m agent.dns.loader --fd N      (N: an inherited AF_UNIX socket)

bcc leaves ~160 MB of LLVM in the process that compiles (as for the eBPF dataplane, whose
loader child is agent.dataplane.ebpf.loader), so the agent runs this in a child and works on
the objects it received with plain bpf(2) calls (agent.dataplane.ebpf.bpfsys) and tc
netlink. Nothing is pinned: the program and map live as long as some process or tc filter
holds them. Prints one JSON line (timings) on success; on failure the cause on stderr, exit 1.
The agent calls `load()` and never imports bcc.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from agent.dataplane import child

SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "dnshold.c"
PROGRAM, MAP = "dnshold_egress", "dnshold"


class LoadError(RuntimeError):
    pass


def load(python: str = sys.executable, timeout: float = 120.0) -> tuple[int, int]:
    """(program fd, map fd) of a fresh build of bpf/dnshold.c, compiled in a child."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        root = str(SOURCE.parents[1])
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        r = child.run([python, "-m", "agent.dns.loader", "--fd", str(theirs.fileno())],
                      pass_fds=(theirs.fileno(),), capture_output=True, text=True, env=env, timeout=timeout)
        if r.returncode != 0:
            raise LoadError(f"DNS hold loader failed: {r.stderr.strip()[-2000:]}")
        ours.settimeout(5.0)
        _, fds, _, _ = socket.recv_fds(ours, 16, 2)
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        raise LoadError(f"DNS hold loader sent {len(fds)} file descriptors, not 2")
    return fds[0], fds[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fd", type=int, required=True)
    args = ap.parse_args(argv)
    try:
        from bcc import BPF  # heavy: LLVM, in this child only
    except ImportError as e:
        print(f"bcc is not importable ({e}): the DNS hold needs python3-bpfcc", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    try:
        b = BPF(src_file=str(SOURCE).encode(), cflags=["-w"])
        fn = b.load_func(PROGRAM.encode(), BPF.SCHED_CLS)
        table = b[MAP.encode()]
    except Exception as e:
        print(f"cannot build the DNS hold (bcc, kernel headers, CAP_BPF/CAP_NET_ADMIN/CAP_PERFMON): "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    t1 = time.monotonic()
    with socket.socket(fileno=args.fd) as s:
        socket.send_fds(s, [b"dnshold"], [fn.fd, table.get_fd()])
    print(json.dumps({"compile_s": round(t1 - t0, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
