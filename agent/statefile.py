"""The one atomic writer of the agent's JSON state files (last good versions, file index, NetBird)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO


def write_json(path: Path, data: Any, prefix: str = ".state-", default: Callable[[Any], Any] | None = None) -> None:
    """Write `data` as JSON to `path` atomically: a temp file in the same directory, then
    os.replace (no fsync: a crash loses at most the newest state, never corrupts one).

    The directory is created if needed; the temp file (mode 0600) is removed on every
    error path. Raises OSError (disk), TypeError/ValueError (not JSON-serialisable): each
    caller decides how loud a failed write is.
    """
    write_text(path, lambda f: json.dump(data, f, default=default), prefix)


def write_text(path: Path, write: Callable[[TextIO], Any], prefix: str = ".state-") -> None:
    """`write_json` for a caller that writes the text itself (e.g. from cached pieces)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
    try:
        with os.fdopen(fd, "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
