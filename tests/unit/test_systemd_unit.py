"""The systemd unit passes `systemd-analyze verify` (with ExecStart pointing at this checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd)")
    stockade = Path(sys.executable).with_name("stockade")
    unit = (ROOT / "systemd" / "stockade.service").read_text()
    assert "ExecStart=/usr/local/bin/stockade run --source netbird" in unit
    target = tmp_path / "stockade.service"
    target.write_text(unit.replace("/usr/local/bin/stockade", str(stockade)))
    res = subprocess.run([analyze, "verify", str(target)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    for directive in ("Type=notify", "EnvironmentFile=/etc/stockade/stockade.env", "Restart=on-failure",
                      "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                      "SystemCallArchitectures=native", "RestrictAddressFamilies="):
        assert directive in unit
