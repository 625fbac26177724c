"""Helper processes that die with the agent.

A child the agent started for a kernel change (`nft -f`, the eBPF loader) must not outlive
it: after a SIGKILL its successor starts, reads newer state and programs the kernel, and an
orphan finishing later would put older state back behind the successor's back.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from typing import Any

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: nothing to load in the child


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    """subprocess.run, the child SIGKILLed by the kernel if the agent dies first (the calling
    thread waits for the child, so the thread it is tied to outlives it otherwise)."""
    parent = os.getpid()

    def die_with_parent() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    # Between fork and exec only prctl and getppid run: safe even in a threaded agent.
    return subprocess.run(cmd, preexec_fn=die_with_parent, **kw)
