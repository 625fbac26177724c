"""Pinned builds, the agent's side: a build is bpf/stockade.c compiled with one set of map
sizes, pinned under `<pin_root>/<build>/` by the loader child (`agent.dataplane.ebpf.loader`),
`build` a hash of the source and the sizes. A changed source, or maps grown for a larger
cluster, load a new build next to the old one, which the agent removes after its first
apply on the new one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from agent.dataplane import child
from agent.dataplane.base import DataplaneError
from agent.dataplane.ebpf import bpfsys, layout

SOURCE = Path(__file__).resolve().parents[3] / "bpf" / "stockade.c"
PROGRAMS = ("stk_ingress", "stk_egress")  # index: the tc hook (0 ingress, 1 egress)
# Tail-called programs, by their index in the `tails` program array (pinned with the build:
# a program array loses its entries once no file descriptor or pin holds it).
TAILS = ("stk_deliver",)
MAPS = tuple(layout.MAPS)
PIN_ROOT = "/sys/fs/bpf/stockade"
# Overrides the pin root (e.g. a bpffs the tests mount where `ip netns exec` still sees it).
PIN_ROOT_ENV = "STOCKADE_BPF_PIN_ROOT"


def build_id(sizes: layout.Sizes) -> str:
    """The pin directory's name: a hash of the C source and the map sizes."""
    src = SOURCE.read_bytes()
    return hashlib.blake2s(src + json.dumps(sizes.defines()).encode(), digest_size=6).hexdigest()


def shared_dir(pin_dir: str, sizes: layout.Sizes) -> str:
    """Where the builds of this source under one pin root pin the maps they share (`flows`,
    `frags`: bpf/stockade.c), named by the source and those maps' sizes."""
    src = hashlib.blake2s(SOURCE.read_bytes(), digest_size=6).hexdigest()
    return f"{os.path.dirname(pin_dir.rstrip('/'))}/shared-{src}-{sizes.flows}-{sizes.frags}"


def ensure_bpffs(pin_root: str) -> None:
    base = os.path.dirname(pin_root.rstrip("/")) or "/"
    if not bpfsys.is_bpffs(base):
        try:
            os.makedirs(base, exist_ok=True)
            subprocess.run(["mount", "-t", "bpf", "bpf", base], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise DataplaneError(
                f"no BPF filesystem at {base} and mounting one failed ({e}); run as root or "
                f"`mount -t bpf bpf {base}`"
            ) from e
    os.makedirs(pin_root, exist_ok=True)


def is_built(pin_dir: str) -> bool:
    return os.path.exists(f"{pin_dir}/{PROGRAMS[-1]}")  # pinned last of all, in one rename


def compile_build(pin_dir: str, sizes: layout.Sizes, python: str) -> dict[str, Any]:
    """Run the loader child for this build (the caller checked `is_built`); its timings."""
    cmd = [python, "-m", "agent.dataplane.ebpf.loader", "--pin-dir", pin_dir]
    shared = shared_dir(pin_dir, sizes)
    os.makedirs(shared, exist_ok=True)
    for d in [*sizes.defines(), f'FLOWS_PIN="{shared}/flows"', f'FRAGS_PIN="{shared}/frags"']:
        cmd += ["-D", d]
    t0 = time.monotonic()
    root = str(SOURCE.parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = child.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise DataplaneError(f"eBPF loader failed: {r.stderr.strip()[-2000:]}")
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    out["total_s"] = round(time.monotonic() - t0, 3)
    return out


def existing(pin_root: str) -> list[tuple[str, layout.Sizes]]:
    """Every complete build of this source under `pin_root`, with the sizes it was
    compiled with (read back from its maps: a build id is a hash of source and sizes, so
    a build of another source never matches)."""
    out = []
    try:
        entries = sorted(os.listdir(pin_root))
    except OSError:
        return []
    for entry in entries:
        pin_dir = f"{pin_root}/{entry}"
        if not is_built(pin_dir):
            continue
        entries_of = {}
        for name in MAPS:
            try:
                m = bpfsys.Map.pinned(f"{pin_dir}/{name}")
            except OSError:
                break
            entries_of[name] = m.max_entries
            m.close()
        else:
            sizes = layout.sizes_of(entries_of)
            if build_id(sizes) == entry:
                out.append((entry, sizes))
    return out


def drop_old_builds(pin_root: str, build: str, sizes: layout.Sizes) -> None:
    """Every build but `build` (and the maps it shares) goes."""
    keep = {build, os.path.basename(shared_dir(f"{pin_root}/{build}", sizes))}
    for entry in os.listdir(pin_root):
        if entry not in keep:
            shutil.rmtree(f"{pin_root}/{entry}", ignore_errors=True)
