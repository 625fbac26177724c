"""The last good version of every object, optionally kept on disk (agent.statefile).

An event costs what it changed: an object delivered again as the same body (the same
object, or an equal one, e.g. after a relist) is not validated again, and the state file
is re-joined from each object's cached JSON text rather than re-encoded whole.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from agent.inventory import ObjectRef, Problem
from agent.policy.errors import Invalid, Partial
from agent.sources.kubeobjects import RawObject
from agent.statefile import write_text

log = logging.getLogger(__name__)
T = TypeVar("T")
_NOT_PARSED = object()


@dataclass(frozen=True, slots=True)
class _Admitted:
    """What admission made of one delivered version: reused while the source delivers an
    equal body, and (when it fell back) the last good version it fell back to is unchanged."""

    key: str
    obj: RawObject  # as delivered
    body: Mapping[str, Any]
    previous: Mapping[str, Any] | None  # the last good body it was admitted against
    entry: tuple[RawObject, Any] | None  # what is enforced (None: left out)
    good: Mapping[str, Any] | None  # what is kept as the last good version
    problems: tuple[Problem, ...]


class LastGood:
    """Last valid body of each object by (kind, namespace, name); optionally on disk."""

    # Reuse what admission made of a body delivered again (same or equal). Only sound when
    # `parse` is a pure function of the object; a caller whose parse reads or records
    # anything else (NetBird's records invalid policies for their drops) turns it off.
    reuse = True

    def __init__(self, path: Path | None = None, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly  # the simulator reads the state but never writes it
        self._bodies: dict[str, Mapping[str, Any]] = {}
        self._saved = True  # False after a failed write: retried on the next sync
        self._dirty = False  # a kept body changed since the last write (admit_key / forget)
        # key -> what admission made of the body last delivered (see _Admitted); and the same
        # by the delivered RawObject's id (held by the _Admitted, so never reused meanwhile):
        # a source handing over the very same object costs one lookup
        self._admitted: dict[str, _Admitted] = {}
        self._by_id: dict[int, _Admitted] = {}
        # key -> `"key": body` as JSON, and the body each encodes: the state file is joined
        # from these; keys whose body changed (admit_key, forget) wait in _unencoded
        self._texts: dict[str, str] = {}
        self._encoded: dict[str, Mapping[str, Any]] = {}
        self._unencoded: set[str] = set()
        self._complete = False  # _texts holds every body but those in _unencoded (after a _write)
        self.background = False  # save() hands the state to a writer thread (see save)
        self._writer: _Writer | None = None
        self._gate = threading.Event()  # set: background writes may go (see hold)
        self._gate.set()
        # The state file is read when first needed (see _load), not here: a restart whose
        # objects all validate needs no last good version to become ready, and reading it
        # (5.8 MB of JSON at 10k pods, ~0.1 s) then waits until the kernel has the program
        # (release). Until it is read, _bodies holds only what this process decided
        # (_decided: kept or forgotten) and _retained what `retain` allowed of the rest.
        self._unread: Path | None = path if path is not None and path.exists() else None
        self._decided: set[str] = set()
        self._retained: set[str] | None = None
        self._save_deferred = False  # a save met a held gate before the file was read

    def _load(self) -> None:
        """Read the state file (once); what this process decided since wins over it, and a
        decided body that differs from the file's, or a file body `retain` dropped, is
        written at the next save -- exactly what reading it at start would have done."""
        path, self._unread = self._unread, None
        if path is None:
            return
        file: dict[str, Mapping[str, Any]] = {}
        try:
            loaded = json.loads(path.read_text())
            if not isinstance(loaded, dict):
                raise ValueError(f"not an object but {type(loaded).__name__}")
            file = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, dict)}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable state file %s: %s", path, e)
        decided, retained, self._decided, self._retained = self._decided, self._retained, set(), None
        merged: dict[str, Mapping[str, Any]] = {}
        for k, body in file.items():  # in the file's order, as a load at start kept them
            if k in decided:
                if k in self._bodies:
                    merged[k] = self._bodies[k]
            elif retained is None or k in retained:
                merged[k] = body
        for k, body in self._bodies.items():
            merged.setdefault(k, body)
        changed = {k for k in decided if merged.get(k) != file.get(k)}
        changed.update(k for k in file if k not in merged)
        if changed:
            self._unencoded |= changed
            self._dirty = True
        self._bodies.clear()  # in place: admit() holds it
        self._bodies.update(merged)

    @staticmethod
    def _key(ref: ObjectRef) -> str:
        return f"{ref.source}|{ref.kind}|{ref.namespace}|{ref.name}"

    def get(self, ref: ObjectRef) -> Mapping[str, Any] | None:
        if self._unread is not None:
            self._load()
        return self._bodies.get(self._key(ref))

    def replace(self, good: dict[str, Mapping[str, Any]]) -> None:
        """Keep exactly `good` (objects gone from the source are forgotten) and save it.

        The write is atomic (temp file, then rename); the temp file is removed on every
        error path. A failed write is logged, not raised: enforcement must not stall on
        the state disk; it is retried on the next call.
        """
        if self._unread is not None:
            self._load()
        changed = good != self._bodies or not self._saved
        self._bodies = good
        if not changed or self.path is None or self.readonly:
            return
        try:
            write_text(self.path, self._write)
            self._saved = True
        except (OSError, TypeError, ValueError) as e:
            self._saved = False
            log.error("cannot save state file %s: %s", self.path, e)

    def _write(self, f: TextIO) -> None:
        """The bodies as one JSON object, each object's text encoded once per version."""
        texts: dict[str, str] = {}
        for key, body in self._bodies.items():
            text = self._texts.get(key)
            if text is None or self._encoded.get(key) is not body:
                text = _encode(key, body)
            texts[key] = text
        f.write("{" + ", ".join(texts.values()) + "}")
        self._texts, self._encoded, self._unencoded = texts, dict(self._bodies), set()
        self._complete = True

    def _parse_previous(
        self, obj: RawObject, parse: Callable[[RawObject], T], problems: list[Problem]
    ) -> tuple[RawObject, T] | None:
        """The last good version of `obj`, parsed; None when there is none or it no longer
        validates (say, after an upgrade made validation stricter): then it is forgotten,
        reported, and the current version is read fail-closed instead."""
        previous = self.get(obj.ref)
        if previous is None:
            return None
        prev = RawObject(obj.ref, previous)
        try:
            return prev, parse(prev)
        except Invalid as e:
            why = f"{e.field}: {e.message}"
        except (TypeError, AttributeError, ValueError, KeyError) as e:
            why = f"malformed: {e}"
        problems.append(Problem(obj.ref, "(last good version)", f"no longer valid, forgotten ({why})"))
        return None

    def admit(
        self,
        objects: Iterable[RawObject],
        parse: Callable[[RawObject], T],
        problems: list[Problem],
    ) -> list[tuple[RawObject, T]]:
        """Parse each object; an invalid one falls back to its last good body, if any, else
        to what `parse` read fail-closed (raised as `Partial`), else it is left out."""
        out: list[tuple[RawObject, T]] = []
        good: dict[str, Mapping[str, Any]] = {}
        admitted: dict[str, _Admitted] = {}
        by_id: dict[int, _Admitted] = {}
        bodies = self._bodies
        for obj in objects:
            hit = self._by_id.get(id(obj)) if self.reuse else None
            if not self.reuse:
                hit = self._admit_one(self._key(obj.ref), obj, parse)
            elif hit is None or hit.obj is not obj:
                hit = self._again(obj, parse)
            elif hit.previous is not None and hit.previous is not bodies.get(hit.key):
                hit = self._admit_one(hit.key, obj, parse)
            admitted[hit.key] = by_id[id(obj)] = hit
            if hit.problems:
                problems.extend(hit.problems)
            if hit.entry is not None:
                out.append(hit.entry)
            if hit.good is not None:
                good[hit.key] = hit.good
        self._admitted, self._by_id = admitted, by_id
        self.replace(good)
        return out

    # ---------------------------------------------------------------- one key at a time
    # For a caller that keeps what it admitted between events (KubernetesAdmission): the
    # same bookkeeping as `admit`, per changed object, and the state file written only when
    # a kept body changed, re-encoding only that object's text.

    def admit_key(self, obj: RawObject, parse: Callable[[RawObject], T]) -> _Admitted:
        """Admit one delivered object (new or changed), as `admit` would; call `save` after."""
        key = self._key(obj.ref)
        hit = self._again(obj, parse, key) if self.reuse else self._admit_one(key, obj, parse)
        old = self._admitted.get(key)
        if old is not None:
            self._by_id.pop(id(old.obj), None)
        self._admitted[key] = self._by_id[id(obj)] = hit
        self._keep(key, hit.good)
        return hit

    def forget(self, ref: ObjectRef) -> None:
        """The object is gone from the source: its last good version is forgotten."""
        key = self._key(ref)
        old = self._admitted.pop(key, None)
        if old is not None:
            self._by_id.pop(id(old.obj), None)
        self._keep(key, None)

    def retain(self, refs: Iterable[ObjectRef]) -> None:
        """Forget every kept body but those of `refs` (after a complete delivery: bodies
        loaded from the state file for objects the source no longer has)."""
        keep = {self._key(r) for r in refs}
        if self._unread is not None:  # the file's other bodies: dropped when it is read
            self._retained = keep if self._retained is None else self._retained & keep
        for key in [k for k in self._bodies if k not in keep]:
            self._admitted.pop(key, None)
            self._keep(key, None)

    def _keep(self, key: str, good: Mapping[str, Any] | None) -> None:
        if self._unread is not None:  # compared with the file's body when it is read
            self._decided.add(key)
            if good is None:
                self._bodies.pop(key, None)
            else:
                self._bodies[key] = good
            return
        was = self._bodies.get(key)
        if was is good:
            return
        if was is not None and good is not None and was == good:
            # Equal to what the state file holds (a restart re-admits every loaded body as
            # an equal new object): keep the new object, but nothing needs writing.
            self._bodies[key] = good
            return
        if good is None:
            del self._bodies[key]
        else:
            self._bodies[key] = good
        self._unencoded.add(key)  # encoded again at the next write
        self._dirty = True

    def save(self) -> None:
        """Write the state file when a kept body changed since the last write (or it failed).

        With `background` set (a watching pipeline: the daemon) the state is handed to a
        writer thread, which writes the newest state handed to it WRITE_DELAY seconds later,
        off the event path. Each write is one complete admitted state, so a restart still
        loads only admitted bodies; a crash may lose the newest event's, which the source
        delivers again.
        """
        if self.path is None or self.readonly:
            return
        if self._unread is not None:
            if self.background and not self._gate.is_set():
                self._save_deferred = True  # the daemon's sync: read and compared at release
                return
            self._load()
        unsaved, self._dirty = self._dirty or not self._saved, False
        if not unsaved:
            return
        if not self._complete and self._writer is not None:
            self._adopt(self._writer.encoded())
        if self._complete:
            self._encode_changed()
            pieces = list(self._texts.values())
            if self.background:
                self._saved = True  # until the writer says otherwise (then retried next time)
                self._background_writer().submit(pieces)
                return
            writer: Callable[[TextIO], Any] = lambda f: _write_pieces(f, pieces)  # noqa: E731
        elif self.background:
            # The first write encodes every body (~0.1 s at 10k pods): in the writer thread,
            # from a copy of this state, after the kernel holds it (see hold).
            self._saved = True
            self._background_writer().submit(dict(self._bodies))
            return
        else:  # the first write: every text encoded
            writer = self._write
        try:
            write_text(self.path, writer)
            self._saved = True
        except (OSError, TypeError, ValueError) as e:
            self._failed(e)

    def _background_writer(self) -> _Writer:
        if self._writer is None:
            self._writer = _Writer(self.path, self._failed, self._gate)
        return self._writer

    def _adopt(self, done: tuple[dict[str, Mapping[str, Any]], dict[str, str]] | None) -> None:
        """Take the texts the writer encoded for its first write (of the bodies `done[0]`):
        from then on only the bodies that changed since are encoded again."""
        if done is None:
            return
        encoded, texts = done
        self._texts, self._encoded = dict(texts), dict(encoded)
        self._unencoded = {k for k, body in self._bodies.items() if encoded.get(k) is not body}
        self._unencoded.update(k for k in texts if k not in self._bodies)
        self._complete = True

    def hold(self) -> None:
        """Background writes wait (at most HOLD_MAX seconds) until `release`: the daemon
        holds them from a sync's start until the kernel has its program, so the writer's
        encoding never competes with the way to the kernel (at a cold start, ~0.1 s)."""
        self._gate.clear()

    def release(self) -> None:
        """Background writes may go; a save put off while the state file was unread is done
        now (on the caller's thread: the file is read here, after the kernel's part)."""
        self._gate.set()
        if self._save_deferred:
            self._save_deferred = False
            self.save()

    def _failed(self, e: Exception) -> None:
        self._saved = False
        log.error("cannot save state file %s: %s", self.path, e)

    def flush(self) -> None:
        """Wait for the background writer to write what it was handed."""
        self.release()
        if self._writer is not None:
            self._writer.flush()

    def _encode_changed(self) -> None:
        """Encode the texts of the bodies `_keep` changed (the others are kept)."""
        for key in self._unencoded:
            body = self._bodies.get(key)
            if body is None:
                self._texts.pop(key, None)
                self._encoded.pop(key, None)
            else:
                self._texts[key], self._encoded[key] = _encode(key, body), body
        self._unencoded.clear()

    def _again(self, obj: RawObject, parse: Callable[[RawObject], T], key: str | None = None) -> _Admitted:
        """A delivered object seen before as another object: reused when equal. `key`: its
        key, if the caller has it (one string per object kept, not two)."""
        if key is None:
            key = self._key(obj.ref)
        hit = self._admitted.get(key)
        if hit is None or hit.obj.ref != obj.ref or not (hit.body is obj.body or hit.body == obj.body) or (
                hit.previous is not None and hit.previous is not self._bodies.get(key)):
            return self._admit_one(key, obj, parse)
        if hit.entry is not None and hit.good is not None and hit.good is hit.body:
            # valid: enforce and keep the object as delivered. (Not an invalid one read
            # fail-closed, which has no previous version either: never kept as good.)
            return _Admitted(key, obj, obj.body, None, (obj, hit.entry[1]), obj.body, hit.problems)
        return _Admitted(key, obj, obj.body, hit.previous, hit.entry, hit.good, hit.problems)

    def _admit_one(self, key: str, obj: RawObject, parse: Callable[[RawObject], T]) -> _Admitted:
        found: list[Problem] = []
        fallback: Any = _NOT_PARSED
        try:
            value = parse(obj)
            return _Admitted(key, obj, obj.body, None, (obj, value), obj.body, ())
        except Partial as e:
            fallback = e.value
            found.extend(Problem(obj.ref, i.field, i.message) for i in e.issues)
        except Invalid as e:
            found.append(Problem(obj.ref, e.field, e.message))
        except (TypeError, AttributeError, ValueError, KeyError) as e:  # shapes no validator foresaw
            found.append(Problem(obj.ref, "(object)", f"malformed: {e}"))
        was = self.get(obj.ref)
        previous = self._parse_previous(obj, parse, found)
        if previous is not None:
            return _Admitted(key, obj, obj.body, was, previous, previous[0].body, tuple(found))
        # enforced fail-closed (or left out), never saved as good
        entry = None if fallback is _NOT_PARSED else (obj, fallback)
        return _Admitted(key, obj, obj.body, was, entry, None, tuple(found))


def _encode(key: str, body: Mapping[str, Any]) -> str:
    """`"key": body` as the state file holds it (default=str: YAML timestamps in fields no one reads)."""
    return f"{json.dumps(key)}: {json.dumps(body, default=str)}"


def _write_pieces(f: TextIO, pieces: list[str]) -> None:
    f.write("{")
    f.write(", ".join(pieces))
    f.write("}")


# Seconds between handing the state to the writer and its write: the sync that handed it
# over (compile, kernel) runs first, and events arriving meanwhile share the write.
WRITE_DELAY = 0.05
# At most this long a held write waits for the kernel (a sync stuck in the kernel must not
# keep the admitted state off the disk).
HOLD_MAX = 60.0  # a 50k cold start takes ~10 s

# What the writer is handed: the pieces of the file (`"key": body` texts), or, for a first
# write, the bodies themselves (encoded in the writer thread).
_Job = list[str] | dict[str, Mapping[str, Any]]


class _Writer:
    """Writes the newest state handed to it, WRITE_DELAY after it was handed over and once
    `gate` is set (at most HOLD_MAX later), in a thread of its own. The thread runs while
    there is something to write; it is not a daemon thread, so a process exiting normally
    finishes the write first."""

    def __init__(self, path: Path, failed: Callable[[Exception], None], gate: threading.Event) -> None:
        self.path = path
        self.failed = failed
        self.gate = gate
        self._lock = threading.Lock()
        self._pending: _Job | None = None
        self._thread: threading.Thread | None = None
        self._encoded: tuple[dict[str, Mapping[str, Any]], dict[str, str]] | None = None

    def submit(self, job: _Job) -> None:
        with self._lock:
            self._pending = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="state-writer")
                self._thread.start()

    def encoded(self) -> tuple[dict[str, Mapping[str, Any]], dict[str, str]] | None:
        """The bodies of the last first write written and their texts (taken once)."""
        with self._lock:
            done, self._encoded = self._encoded, None
            return done

    def _run(self) -> None:
        while True:
            time.sleep(WRITE_DELAY)
            self.gate.wait(HOLD_MAX)
            with self._lock:
                job, self._pending = self._pending, None
                if job is None:
                    self._thread = None
                    return
            texts: dict[str, str] = {}
            try:
                if isinstance(job, dict):
                    texts = {k: _encode(k, body) for k, body in job.items()}
                pieces = list(texts.values()) if isinstance(job, dict) else job
                write_text(self.path, lambda f, p=pieces: _write_pieces(f, p))  # type: ignore[misc]
            except (OSError, TypeError, ValueError) as e:
                self.failed(e)
                continue
            if isinstance(job, dict):
                with self._lock:
                    self._encoded = (job, texts)

    def flush(self) -> None:
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                return
            thread.join()
