"""The manifest-directory source: Kubernetes YAML/JSON files under one directory.

Reads every *.yaml, *.yml and *.json file (multi-document YAML and `kind: List`
included). A file that cannot be parsed keeps the objects it held the last time it
parsed, so a half-written file never removes a policy; a file being written (changed
in the last `settle` seconds, or, while watched, written and not yet closed) keeps its
previous version. `watch` calls back on change.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from agent.inventory import ObjectRef, Problem
from agent.sources.kubeobjects import KINDS, RawObject, expand, ref_of

log = logging.getLogger(__name__)
SUFFIXES = (".yaml", ".yml", ".json")
OPEN_WRITE_MAX = 10.0  # s: a writer that keeps a file open longer is read anyway


class DirectorySource:
    name = "file"

    def __init__(self, path: str | os.PathLike[str], settle: float = 0.1) -> None:
        self.path = Path(path)
        # A file changed less than `settle` seconds ago may be mid-write (in place) and
        # still parse as a shorter, possibly wider, policy: its previous version stays
        # until it has been quiet that long. `unsettled` says how long to wait.
        self.settle = settle
        self.unsettled = 0.0
        # Per file: (inode, mtime_ns, size) and the objects it held when it last parsed.
        self._cache: dict[Path, tuple[tuple[int, int, int], list[RawObject]]] = {}
        self._failed: dict[Path, tuple[int, int, int] | None] = {}  # stamp of each file's last failure
        # Paths the watcher saw deleted, created or renamed since the last read: a file there
        # now is another file, even if the filesystem gave it the old inode number again.
        self._replaced: set[str] = set()  # absolute paths
        # Paths written to (IN_MODIFY) and not yet closed (IN_CLOSE_WRITE), with the time of
        # the last write: a writer holding the file open may pause for any length of time,
        # so its content stays the previous version until it closes (or for OPEN_WRITE_MAX).
        self._writing: dict[str, float] = {}
        self._lock = threading.Lock()
        self.errors: Counter[str] = Counter()  # fault cause -> occurrences, for metrics

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        out = []
        for root, dirs, names in os.walk(self.path, followlinks=True):
            # Hidden entries are editor temp files or ConfigMap's ..data twins.
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            out.extend(
                Path(root, n) for n in sorted(names) if n.endswith(SUFFIXES) and not n.startswith(".")
            )
        return out

    def _parse_file(self, path: Path) -> list[RawObject]:
        text = path.read_text(encoding="utf-8")
        docs = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
        objs = []
        for doc in docs:
            for body in expand(doc):
                kind = body.get("kind")
                if kind not in KINDS:
                    log.debug("%s: ignoring kind %r", path, kind)
                    continue
                objs.append(RawObject(ref_of(body, "file", str(path)), body))
        return objs

    def read(self) -> tuple[list[RawObject], list[Problem]]:
        """All objects now in the directory, plus problems with unparsable files."""
        problems: list[Problem] = []
        objects: list[RawObject] = []
        seen: dict[tuple[str, str, str], ObjectRef] = {}
        current = self.files()
        self.unsettled = 0.0
        with self._lock:
            replaced = set(self._replaced)
            self._replaced.clear()
        for path, (stamp, objs) in list(self._cache.items()):
            if os.path.abspath(path) in replaced:
                self._cache[path] = ((-1, *stamp[1:]), objs)  # never "the same file" again
        for path in current:
            stamp = None
            try:
                st = path.stat()
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                cached = self._cache.get(path)
                changed = cached is None or cached[0] != stamp
                age = time.time() - st.st_mtime_ns / 1e9
                fresh = 0 <= age < self.settle
                if changed and (fresh or self._open_for_write(path)):
                    if fresh:
                        self.unsettled = max(self.unsettled, self.settle - age)
                    if cached is None:
                        continue  # new and still being written: read it once it is done
                elif changed:
                    if st.st_size == 0 and cached is not None and cached[1] and cached[0][0] == st.st_ino:
                        # An in-place writer has truncated it and not written yet: keep
                        # what it held. A new file (renamed over it, or deleted and
                        # created again) that is empty is just empty.
                        raise OSError("empty file (being written?)")
                    self._cache[path] = (stamp, self._parse_file(path))
            except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
                ref = ObjectRef("File", "", path.name, "file", str(path))
                problems.append(Problem(ref, "(file)", f"cannot parse: {_one_line(e)}"))
                if self._failed.get(path, ()) != stamp:  # count each bad version once
                    self._failed[path] = stamp
                    self.errors["unparsable_file"] += 1
                if path not in self._cache:
                    continue  # never parsed: nothing to keep
            for obj in self._cache[path][1]:
                if obj.ref.key in seen:
                    problems.append(
                        Problem(obj.ref, "metadata.name", f"duplicate of {seen[obj.ref.key]}; ignored")
                    )
                    continue
                seen[obj.ref.key] = obj.ref
                objects.append(obj)
        for gone in set(self._cache) - set(current):
            del self._cache[gone]
        return objects, problems

    def _open_for_write(self, path: Path) -> bool:
        with self._lock:
            since = self._writing.get(os.path.abspath(path))
        return since is not None and time.monotonic() - since < OPEN_WRITE_MAX

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        """Call `on_change` (from another thread) whenever the directory changes."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        replaced, writing, lock = self._replaced, self._writing, self._lock

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                kind = event.event_type
                if kind in ("opened", "closed_no_write"):
                    return
                if not event.is_directory:
                    src = os.path.abspath(os.fsdecode(event.src_path))
                    dest = os.path.abspath(os.fsdecode(event.dest_path)) if getattr(event, "dest_path", "") else ""
                    with lock:
                        if kind == "modified":
                            writing[src] = time.monotonic()
                        elif kind in ("closed", "deleted", "created", "moved"):
                            writing.pop(src, None)
                            if dest:
                                writing.pop(dest, None)
                        if kind in ("deleted", "created", "moved"):
                            replaced.update(p for p in (src, dest) if p)
                on_change()

        observer = Observer()
        target = self.path if self.path.is_dir() else self.path.parent
        observer.schedule(Handler(), str(target), recursive=True)
        observer.daemon = True
        observer.start()
        stopped = threading.Event()

        def stop() -> None:
            if not stopped.is_set():
                stopped.set()
                observer.stop()

        return stop


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
