"""Network namespaces from Python threads (stdlib only: the TUN relay runs it as root).

setns(2) moves only the calling thread, and a socket or TUN fd keeps the namespace it
was created in; so what a thread opens inside a lab namespace can then be used from any
thread. This is the one place tests and benchmarks call setns.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into {what}: {os.strerror(err)}")


def enter(netns: str) -> None:
    """Move the calling thread into network namespace `netns` (a name under /run/netns)."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(fd, netns)
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside(netns: str) -> Iterator[None]:
    """The calling thread is in `netns` for the block, then back in its own namespace."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter(netns)
        try:
            yield
        finally:
            _setns(home, "the thread's own namespace")
    finally:
        os.close(home)


def call_in(netns: str | None, make: Callable[[], T]) -> T:
    """`make()`, called on a throwaway thread inside `netns` (None: here)."""
    if netns is None:
        return make()
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            enter(netns)
            out["value"] = make()
        except BaseException as e:  # re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=run, name=f"setns-{netns}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def listener(netns: str, host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket on `host`, an ephemeral port, inside `netns`."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        s.listen(64)
        return s
    return call_in(netns, make)


def worker(netns: str) -> ThreadPoolExecutor:
    """One long-lived thread inside `netns` to submit calls to (no thread per call)."""
    return ThreadPoolExecutor(max_workers=1, initializer=enter, initargs=(netns,))
