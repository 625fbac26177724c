"""Readiness for systemd (Type=notify), through Debian's python3-systemd bindings."""

from __future__ import annotations

import os


def notify(state: str) -> bool:
    """Send e.g. "READY=1" or "STATUS=..." to $NOTIFY_SOCKET; False when not under systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    from systemd import daemon  # python3-systemd: only needed under systemd

    return bool(daemon.notify(state))
