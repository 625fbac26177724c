"""Helper processes die with the agent: an orphan must not program the kernel later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.kit import ROOT, until

PARENT = """
from agent.dataplane import child
child.run(["sh", "-c", "echo $$ > %s; exec sleep 60"])
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has finished
    except FileNotFoundError:
        return False


def test_child_is_killed_when_the_agent_is(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT % pidfile], cwd=ROOT)
    try:
        assert until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", 10)
        pid = int(pidfile.read_text())
        assert _alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert until(lambda: not _alive(pid), 10), "the child outlived the agent"
    finally:
        parent.kill()
        if pidfile.exists() and pidfile.read_text().strip() and _alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
