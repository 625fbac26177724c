"""What privileged tests (and the benchmarks in the lab) need from the machine: root and
tools, a private bpffs, and the dataplane a CLI process runs against."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit import ROOT

ROOT_EXAMPLES = ROOT / "examples"

# Every packet test runs once per dataplane; one suite, not a copy per backend.
DATAPLANES = ["nftables", "ebpf"]
PIN_ROOT_ENV = "STOCKADE_BPF_PIN_ROOT"


def require_privileges() -> None:
    """Privileged tests fail (not skip) when the machine cannot run them: CI must see it."""
    if os.geteuid() != 0:
        pytest.fail("packet tests need root (network namespaces, nftables)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            pytest.fail(f"packet tests need `{tool}`: run `make setup`")


@contextlib.contextmanager
def private_bpffs(tag: str) -> Iterator[str]:
    """A private bpffs for pinned maps, visible inside `ip netns exec` (which remounts
    /sys, so pins under /sys/fs/bpf would vanish with each CLI process); unmounted after."""
    require_privileges()
    root = Path("/run/stockade-test") / f"bpf-{os.getpid()}-{tag}"
    root.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"cannot mount bpffs (eBPF tests need it): {res.stderr}")
    try:
        yield f"{root}/stockade"
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
        root.rmdir()


@contextlib.contextmanager
def dataplane_env(name: str, tag: str) -> Iterator[str]:
    """Run the CLI processes of a test against `name`; eBPF gets its own pin root."""
    if name != "ebpf":
        yield name
        return
    with private_bpffs(tag) as pins:
        old = os.environ.get(PIN_ROOT_ENV)
        os.environ[PIN_ROOT_ENV] = pins
        try:
            yield name
        finally:
            if old is None:
                os.environ.pop(PIN_ROOT_ENV, None)
            else:
                os.environ[PIN_ROOT_ENV] = old
