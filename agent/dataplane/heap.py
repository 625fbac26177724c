"""Freed heap handed back to the kernel before and between memory-heavy steps.

CPython and glibc keep freed memory for reuse; a container's memory limit counts it all
the same. A cold load's peak is what the compile left plus the load's own parse, so the
garbage and free pages are returned first (glibc's malloc_trim; a no-op elsewhere).
"""

from __future__ import annotations

import ctypes
import gc

_libc = ctypes.CDLL(None)
_trim = getattr(_libc, "malloc_trim", None)  # glibc only (musl has none)


def release(collect: bool = False) -> None:
    """Return free heap pages to the kernel; with `collect`, first free unreachable cycles."""
    if collect:
        gc.collect()
    if _trim is not None:
        _trim(0)
