"""The manifest-directory source: Kubernetes YAML/JSON files under one directory.

Reads every *.yaml, *.yml and *.json file (multi-document YAML and `kind: List`
included). A file that cannot be parsed keeps the objects it held the last time it
parsed, so a half-written file never removes a policy; a file being written (changed
in the last `settle` seconds, or, while watched, written and not yet closed) keeps its
previous version. While watched, a file renamed into place (IN_MOVED_TO) or created and
closed (IN_CREATE ... IN_CLOSE_WRITE) is complete and read at once: the settle rule is
for in-place writers only. `watch` calls back on change. The source keeps what it
delivered: a read looks again only at the keys of files that changed, and `changes()`
hands over every object by key plus the keys whose object changed (unchanged objects stay
the same objects), so an event costs what it changed downstream too.

Bounds (the input boundary): a file is read only up to `max_file_bytes` (default 4 MiB,
$STOCKADE_MAX_FILE_BYTES) and each object up to `max_object_bytes` (1 MiB as compact
JSON, $STOCKADE_MAX_OBJECT_BYTES); YAML aliases (`*name`) are refused, so a few hundred
bytes can never expand into gigabytes ("billion laughs") or a cycle; nesting is limited
to MAX_DEPTH; values are JSON values only (a timestamp stays the string it was written
as). A file over any bound is a file that does not parse: its previous objects stay.
The walk follows a symbolic link (to a file or a directory) only when it resolves inside
the directory, and reads each directory once, so links to `.` or link loops cost nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import SafeConstructor
from yaml.nodes import Node
from yaml.resolver import Resolver

from agent.inventory import ObjectRef, Problem
from agent.sources.kubeobjects import KINDS, RawObject, expand, interned, ref_of

log = logging.getLogger(__name__)
SUFFIXES = (".yaml", ".yml", ".json")
OPEN_WRITE_MAX = 10.0  # s: a writer that keeps a file open longer is read anyway
MAX_FILE_BYTES = 4 << 20
MAX_OBJECT_BYTES = 1 << 20
# A NetworkPolicy is about 10 levels deep; 64 leaves room and keeps every recursive
# walker (composer, json, validators) far from Python's recursion limit.
MAX_DEPTH = 64
Key = tuple[str, str, str]  # ObjectRef.key
# The most compact JSON (ensure_ascii) can grow per character of the JSON text it was
# parsed from: a raw astral character becomes two \\uXXXX escapes (12); a raw BMP one
# or DEL 6; every escape stays as long or shrinks; a float's repr is at most 24 for at
# least 3 ("1e5"); ints, literals and structure stay; whitespace and repeated keys go. A
# typed List's item gains `,"kind":"X"`, shorter than 12x the `"kind":"XList"` it came from.
JSON_GROWTH = 12


class OutOfBounds(ValueError):
    """A file or object past a bound (size, depth, type): handled as a file that does not parse."""


class _Bounded(Composer):
    """PyYAML's composer, refusing aliases and deep nesting before any node is built."""

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:  # type: ignore[override]
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise ComposerError(None, None, f"YAML aliases are not accepted (*{event.anchor})",
                                event.start_mark)
        depth = self.__dict__.get("_depth", 0)
        if depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


try:  # libyaml's parser (C) under the Python composer above: fast, and the bounds are ours
    from yaml._yaml import CParser

    class _Parser(CParser):  # type: ignore[misc]
        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)

except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


class BoundedLoader(_Bounded, _Parser, SafeConstructor, Resolver):
    """yaml.SafeLoader's types, without aliases or deep nesting; timestamps stay strings."""

    def __init__(self, stream: str) -> None:
        _Parser.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)


def _construct_str(loader: SafeConstructor, node: Node) -> Any:
    """A string, interned: a directory of manifests repeats the same few thousand keys and
    values (kinds, label keys and values, port names) hundreds of thousands of times, and
    the source keeps every object it delivered (at 10k pods: 488k strings, 25k distinct)."""
    value = loader.construct_scalar(node)  # type: ignore[no-untyped-call]
    return sys.intern(value) if type(value) is str else value


BoundedLoader.add_constructor("tag:yaml.org,2002:str", _construct_str)
# A manifest is JSON data: `creationTimestamp: 2024-01-01` stays the string it is in the API.
BoundedLoader.add_constructor("tag:yaml.org,2002:timestamp", _construct_str)


def load_yaml(text: str, name: str = "<unicode string>") -> list[Any]:
    """Every document of `text`, under BoundedLoader's bounds; errors say `name`, line and column."""
    loader = BoundedLoader(text)
    try:
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
        return docs
    except yaml.MarkedYAMLError as e:
        for attr in ("context_mark", "problem_mark"):
            if (mark := getattr(e, attr)) is not None:  # libyaml's marks are read-only
                setattr(e, attr, yaml.Mark(name, mark.index, mark.line, mark.column, None, None))
        raise
    finally:
        loader.dispose()


def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise SystemExit(f"stockade: {name}={raw!r} is not a number of bytes") from None
    if value <= 0:
        raise SystemExit(f"stockade: {name} must be a positive number of bytes")
    return value


# What is left of JSON text to count brackets in: its ASCII brackets and quotes.
_BRACKETS_AND_QUOTES = {c: None for c in range(128) if chr(c) not in '[]{}"'}
_STRING = re.compile(r'"[^"]*"')  # a string, once escapes are gone
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _text_depth(text: str) -> int:
    """The deepest nesting of brackets in JSON text that parsed, leaving strings out: at
    least the depth of the value it parsed to (a repeated key may drop a deep value).

    Escapes go first (left to right, as a string's are read: an escaped backslash, then
    an escaped quote), so every quote left delimits a string; then everything but brackets
    and quotes; then the strings. Two adjacent quotes can go at once whichever they are
    (an empty string, or the end of one and the start of the next: nothing between them
    counts), so only strings holding brackets are left for the regex. All C loops: ~4x
    faster than walking the value."""
    text = text.replace("\\\\", "").replace('\\"', "").translate(_BRACKETS_AND_QUOTES).replace('""', "")
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))  # (non-ASCII text was in strings)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def _json_too_deep(text: str, doc: Any) -> bool:
    """Whether `doc`, parsed from JSON `text`, nests deeper than MAX_DEPTH: the text's
    bracket depth bounds it from above; only past the bound is the value itself walked."""
    return _text_depth(text) > MAX_DEPTH and _too_deep(doc)


def _too_deep(doc: Any) -> bool:
    """Whether a JSON value nests deeper than MAX_DEPTH (without recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


# Which files hold one key, in the order they were added (a file's own objects in file
# order): a bare (file, object) for the usual single holder, a list only for duplicates
# (a dict and a list per key cost ~4 MB at 10k pods).
_Held = tuple[Path, RawObject] | list[tuple[Path, RawObject]]


def _each(held: _Held) -> list[tuple[Path, RawObject]]:
    return [held] if type(held) is tuple else held  # type: ignore[list-item,return-value]


class DirectorySource:
    name = "file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        settle: float = 0.1,
        max_file_bytes: int | None = None,
        max_object_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_file_bytes = max_file_bytes or _env_bytes("STOCKADE_MAX_FILE_BYTES", MAX_FILE_BYTES)
        self.max_object_bytes = max_object_bytes or _env_bytes("STOCKADE_MAX_OBJECT_BYTES", MAX_OBJECT_BYTES)
        # Called with a file that fails before it ever parsed in this process: the objects
        # it held when it last parsed (DirectoryPipeline restores them from the state dir).
        self.fallback: Callable[[Path], list[RawObject]] | None = None
        self._walk_problems: list[Problem] = []
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
        # Paths the watcher saw complete (renamed into place, or created and then closed),
        # with their (inode, mtime_ns, size) then: while the file still has that stamp it
        # is read at once. Any later in-place write changes the stamp or drops the entry.
        self._complete: dict[str, tuple[int, int, int]] = {}
        self._created: set[str] = set()  # created (IN_CREATE) and not yet closed
        # What links in the directory point to (as of the last walk): a hidden file is read
        # only through one of them.
        self._link_targets: frozenset[str] = frozenset()
        # The delivered view, kept between reads (see _merge): the object list each file
        # delivered, which files hold each key (see _Held), the object delivered for each
        # key, the duplicates reported, and the keys changed since the last changes()
        # (None: changes() never called, nothing tracked).
        self._lists: dict[Path, list[RawObject]] = {}
        self._holders: dict[Key, _Held] = {}
        self._objects: dict[Key, RawObject] = {}
        self._duplicates: dict[Key, list[Problem]] = {}
        self._changed: set[Key] | None = None
        self._lock = threading.Lock()
        self.errors: Counter[str] = Counter()  # fault cause -> occurrences, for metrics

    def files(self) -> list[Path]:
        """Manifest files under the directory, a directory's own before its subdirectories'.

        Follows a link (to a file or a directory) only when it resolves inside the
        directory, and enters each directory (by device and inode) once: links to `.`
        or loops of links cost nothing. A link leading out is reported, not read. A
        directory that cannot be listed (or the directory itself gone) is reported and
        keeps the files it last had.
        """
        self._walk_problems = []
        if self.path.is_file():
            return [self.path]
        root = os.path.realpath(self.path)
        out: list[Path] = []
        visited: set[tuple[int, int]] = set()
        targets: set[str] = set()
        stack = [self.path]
        while stack:
            here = stack.pop()
            try:
                st = os.stat(here)
                if (st.st_dev, st.st_ino) in visited:
                    log.debug("%s: directory already read (through a link); skipped", here)
                    continue
                visited.add((st.st_dev, st.st_ino))
                with os.scandir(here) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                self._walk_problem(here, f"cannot read directory: {_one_line(e)}")
                # Its files are not known to be gone: they fail to read and keep their objects.
                gone = os.path.abspath(here)
                out.extend(p for p in self._cache if _inside(os.path.abspath(p), gone))
                continue
            subdirs = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # editor temp files, ConfigMap's ..data twins
                manifest = entry.name.endswith(SUFFIXES)
                try:
                    if entry.is_symlink():
                        targets.add(os.path.realpath(entry.path))  # dangling too: it may appear
                        real = os.path.realpath(entry.path, strict=True)
                        if not _inside(real, root):
                            if manifest or os.path.isdir(real):
                                self._walk_problem(Path(entry.path), f"links outside {self.path} (to {real}); not read")
                            continue
                    is_dir = entry.is_dir()
                except OSError as e:  # a dangling link, or a loop of links
                    if manifest:
                        self._walk_problem(Path(entry.path), f"cannot resolve: {_one_line(e)}")
                    continue
                if is_dir:
                    subdirs.append(Path(entry.path))
                elif manifest:
                    out.append(Path(entry.path))
            stack.extend(reversed(subdirs))
        self._link_targets = frozenset(targets)
        return out

    def _walk_problem(self, path: Path, message: str) -> None:
        ref = ObjectRef("File", "", path.name, "file", str(path))
        self._walk_problems.append(Problem(ref, "(file)", message))

    def _read_bounded(self, path: Path) -> str:
        # O_NONBLOCK: a FIFO named *.yaml must not stall the sync in open().
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutOfBounds("not a regular file")
            data = f.read(self.max_file_bytes + 1)
        if len(data) > self.max_file_bytes:
            raise OutOfBounds(f"larger than {self.max_file_bytes} bytes")
        return data.decode("utf-8")

    def _parse_file(self, path: Path) -> list[RawObject]:
        text = self._read_bounded(path)
        if path.suffix == ".json":
            docs = [json.loads(text)]
            if _json_too_deep(text, docs[0]):
                raise OutOfBounds(f"nested deeper than {MAX_DEPTH} levels")
            docs = [interned(docs[0])]  # (after the depth check: the walk recurses)
            # What JSON text parses to is JSON data, and no object in it is longer as compact
            # JSON than JSON_GROWTH times the text: not worth encoding each to measure it.
            measure = len(text) * JSON_GROWTH > self.max_object_bytes
        else:
            docs = load_yaml(text, str(path))
            measure = True
        objs = []
        for doc in docs:
            for body in expand(doc):
                kind = body.get("kind")
                if kind not in KINDS:
                    log.debug("%s: ignoring kind %r", path, kind)
                    continue
                ref = ref_of(body, "file", str(path))
                if not measure:
                    objs.append(RawObject(ref, body))
                    continue
                try:  # the form the state file keeps it in, which also proves it is JSON data
                    size = len(json.dumps(body, separators=(",", ":")))
                except (TypeError, ValueError) as e:
                    raise OutOfBounds(f"{ref.kind} {ref.namespace}/{ref.name}: not JSON data: {e}") from None
                if size > self.max_object_bytes:
                    raise OutOfBounds(f"{ref.kind} {ref.namespace}/{ref.name} is {size} bytes as JSON,"
                                        f" over the {self.max_object_bytes}-byte limit")
                objs.append(RawObject(ref, body))
        return objs

    def read(self) -> tuple[list[RawObject], list[Problem]]:
        """All objects now in the directory, plus problems with unparsable files."""
        problems: list[Problem] = []
        delivered: list[Path] = []  # files whose objects are delivered, in walk order
        current = self.files()
        problems.extend(self._walk_problems)
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
                if changed and not self._is_complete(path, stamp) and (fresh or self._open_for_write(path)):
                    if fresh:
                        self.unsettled = max(self.unsettled, self.settle - age)
                    if cached is None and not self._restore(path):
                        continue  # new and still being written: read it once it is done
                elif changed:
                    if st.st_size == 0 and cached is not None and cached[1] and cached[0][0] == st.st_ino:
                        # An in-place writer has truncated it and not written yet: keep
                        # what it held. A new file (renamed over it, or deleted and
                        # created again) that is empty is just empty.
                        raise OSError("empty file (being written?)")
                    self._cache[path] = (stamp, self._parse_file(path))
            # ValueError: JSON, UTF-8, digits over int()'s limit, the bounds above.
            except (OSError, ValueError, yaml.YAMLError, RecursionError) as e:
                ref = ObjectRef("File", "", path.name, "file", str(path))
                problems.append(Problem(ref, "(file)", f"cannot parse: {_one_line(e)}"))
                if self._failed.get(path, ()) != stamp:  # count each bad version once
                    self._failed[path] = stamp
                    self.errors["unparsable_file"] += 1
                if path not in self._cache and not self._restore(path):
                    continue  # never parsed: nothing to keep
            delivered.append(path)
        self._merge(delivered)
        for found in self._duplicates.values():
            problems.extend(found)
        for gone in set(self._cache) - set(current):
            del self._cache[gone]
        with self._lock:  # entries of files gone without an event seen (a directory removed)
            if len(self._complete) > len(current):
                known = {os.path.abspath(p) for p in current}
                for k in set(self._complete) - known:
                    del self._complete[k]
        return list(self._objects.values()), problems

    def changes(self) -> tuple[dict[Key, RawObject], set[Key] | None]:
        """What the reads so far delivered: every object by key (the source's own map: do
        not edit it) and the keys whose delivered object changed since the previous call
        (None: every key, on the first call). An unchanged object is the same RawObject
        as before."""
        changed, self._changed = self._changed, set()
        return self._objects, changed

    def _merge(self, delivered: list[Path]) -> None:
        """Update the delivered objects from the files whose object lists changed.

        The first file in walk order (the first object within a file) holding a key
        delivers it; every other holder is reported as a duplicate. Only the keys of
        changed files are looked at again, so a read costs what changed.
        """
        now = {p: self._cache[p][1] for p in delivered}
        touched: set[Key] = set()
        for path in self._lists.keys() | now.keys():
            old, new = self._lists.get(path), now.get(path)
            if old is new:
                continue
            for obj in old or ():
                key = obj.ref.key
                touched.add(key)
                self._release(key, path)
            for obj in new or ():
                key = obj.ref.key
                touched.add(key)
                self._hold(key, path, obj)
        self._lists = now
        if not touched:
            return
        position = {p: i for i, p in enumerate(delivered)}
        for key in touched:
            holders = self._holders.get(key)
            if not holders:
                self._duplicates.pop(key, None)
                if self._objects.pop(key, None) is not None and self._changed is not None:
                    self._changed.add(key)
                continue
            # stable: a file's own objects stay in file order
            found = [o for _, o in sorted(_each(holders), key=lambda h: position[h[0]])]
            first = found[0]
            if self._objects.get(key) is not first:
                self._objects[key] = first
                if self._changed is not None:
                    self._changed.add(key)
            if len(found) > 1:
                self._duplicates[key] = [Problem(o.ref, "metadata.name", f"duplicate of {first.ref}; ignored")
                                         for o in found[1:]]
            else:
                self._duplicates.pop(key, None)

    def _hold(self, key: Key, path: Path, obj: RawObject) -> None:
        held = self._holders.get(key)
        if held is None:
            self._holders[key] = (path, obj)
        elif type(held) is tuple:
            self._holders[key] = [held, (path, obj)]
        else:
            held.append((path, obj))

    def _release(self, key: Key, path: Path) -> None:
        """`path` holds `key` no more (each of its objects with that key)."""
        held = self._holders.get(key)
        if held is None:
            return
        rest = [h for h in _each(held) if h[0] != path]
        if not rest:
            del self._holders[key]
        elif len(rest) == 1:
            self._holders[key] = rest[0]
        else:
            self._holders[key] = rest

    def _restore(self, path: Path) -> bool:
        """Take what `fallback` says `path` held, for a file not readable now that never
        parsed in this process. Stamped -1: parsed again on the next read."""
        kept = self.fallback(path) if self.fallback is not None else []
        if kept:
            self._cache[path] = ((-1, -1, -1), kept)
        return bool(kept)

    def lists(self) -> dict[Path, list[RawObject]]:
        """The objects each file held when it last parsed: one list object per version (the
        same list while the file is unchanged). Do not edit them."""
        return {path: objs for path, (_, objs) in self._cache.items()}

    def held(self) -> dict[Path, list[ObjectRef]]:
        """The objects each file held when it last parsed (as read() delivers them)."""
        return {path: [obj.ref for obj in objs] for path, (_, objs) in self._cache.items()}

    def _is_complete(self, path: Path, stamp: tuple[int, int, int]) -> bool:
        with self._lock:
            return self._complete.get(os.path.abspath(path)) == stamp

    def _open_for_write(self, path: Path) -> bool:
        with self._lock:
            since = self._writing.get(os.path.abspath(path))
        return since is not None and time.monotonic() - since < OPEN_WRITE_MAX

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        """Call `on_change` (from another thread) whenever the directory changes."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler

        observer: Any
        try:  # full events: a file moved in from outside is a move (IN_MOVED_TO), not a creation
            from watchdog.observers.inotify import InotifyObserver

            observer = InotifyObserver(generate_full_events=True)
        except ImportError:  # pragma: no cover - no inotify: every new file settles
            from watchdog.observers import Observer

            observer = Observer()
        replaced, writing, lock = self._replaced, self._writing, self._lock
        complete, created = self._complete, self._created

        def unread(path: str) -> bool:
            """A hidden regular file (or one gone) that no link leads to: the walk never reads it."""
            if not path:  # the outside end of a move
                return True
            return (os.path.basename(path).startswith(".") and not os.path.isdir(path)
                    and not os.path.islink(path) and os.path.realpath(path) not in self._link_targets)

        def mark_complete(path: str) -> None:
            try:
                st = os.stat(path)
            except OSError:
                return
            complete[path] = (st.st_ino, st.st_mtime_ns, st.st_size)

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                kind = event.event_type
                if kind in ("opened", "closed_no_write"):
                    return
                if event.is_directory and kind == "modified":
                    return  # watchdog's companion of the file event in it, which calls back itself
                if not event.is_directory:
                    # A move from or to outside the directory has one side "" (full events).
                    src = os.path.abspath(os.fsdecode(event.src_path)) if event.src_path else ""
                    dest = os.path.abspath(os.fsdecode(event.dest_path)) if getattr(event, "dest_path", "") else ""
                    with lock:
                        if kind == "modified":
                            writing[src] = time.monotonic()
                            complete.pop(src, None)  # written in place: the settle rule again
                        elif kind in ("closed", "deleted", "created", "moved"):
                            for p in (src, dest):
                                writing.pop(p, None)
                                complete.pop(p, None)
                        if kind in ("deleted", "created", "moved"):
                            replaced.update(p for p in (src, dest) if p)
                            created.discard(src)
                        if kind == "created":
                            created.add(src)
                        elif kind == "closed" and src in created:  # created, written, closed
                            created.discard(src)
                            mark_complete(src)
                        elif kind == "moved" and dest:  # renamed into place: complete
                            mark_complete(dest)
                    if all(unread(p) for p in (src, dest)):
                        return  # e.g. an editor's or a writer's hidden temp file: no sync for it
                on_change()

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
