"""The loader compares the map layouts of agent/dataplane/ebpf/layout.py with the structs
bcc compiled from bpf/stockade.c, and refuses a build where they differ, naming the map
and field. Privileged (bcc, bpf(2)): fails, not skips, without them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.dataplane.ebpf.builds import SOURCE

ROOT = Path(__file__).resolve().parents[2]


def load(source: Path, pin_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.dataplane.ebpf.loader", "--pin-dir", str(pin_dir),
                           "--source", str(source)], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_the_real_source_matches_and_a_drifted_struct_is_refused(tmp_path: Path) -> None:
    src = SOURCE.read_text()
    drifted = tmp_path / "drifted.c"
    old = "struct port_val {\n    u32 counter;"
    assert old in src
    drifted.write_text(src.replace(old, "struct port_val {\n    u64 counter;"))
    r = load(drifted, tmp_path / "never")
    assert r.returncode == 1, r.stdout
    assert "do not match bpf/stockade.c" in r.stderr and "ports value" in r.stderr, r.stderr
    assert not (tmp_path / "never").exists()
    # the real source passes the same check (the build dir is not on a bpffs: pinning fails after it)
    r = load(SOURCE, tmp_path / "pins")
    assert "do not match" not in r.stderr and "pinning under" in r.stderr, r.stderr
