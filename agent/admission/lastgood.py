"""The last good version of every object, optionally kept on disk (agent.statefile)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent.inventory import ObjectRef, Problem
from agent.policy.errors import Invalid, Partial
from agent.sources.kubeobjects import RawObject
from agent.statefile import write_json

log = logging.getLogger(__name__)
T = TypeVar("T")
_NOT_PARSED = object()


class LastGood:
    """Last valid body of each object by (kind, namespace, name); optionally on disk."""

    def __init__(self, path: Path | None = None, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly  # the simulator reads the state but never writes it
        self._bodies: dict[str, Mapping[str, Any]] = {}
        self._saved = True  # False after a failed write: retried on the next sync
        # key -> (body, parsed value): an object delivered again as the same body object
        # (sources keep unchanged objects) is not parsed again.
        self._parsed: dict[str, tuple[Mapping[str, Any], Any]] = {}
        if path is not None and path.exists():
            try:
                loaded = json.loads(path.read_text())
                if not isinstance(loaded, dict):
                    raise ValueError(f"not an object but {type(loaded).__name__}")
                self._bodies = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, dict)}
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable state file %s: %s", path, e)

    @staticmethod
    def _key(ref: ObjectRef) -> str:
        return f"{ref.source}|{ref.kind}|{ref.namespace}|{ref.name}"

    def get(self, ref: ObjectRef) -> Mapping[str, Any] | None:
        return self._bodies.get(self._key(ref))

    def replace(self, good: dict[str, Mapping[str, Any]]) -> None:
        """Keep exactly `good` (objects gone from the source are forgotten) and save it.

        The write is atomic (temp file, then rename); the temp file is removed on every
        error path. A failed write is logged, not raised: enforcement must not stall on
        the state disk; it is retried on the next call.
        """
        changed = good != self._bodies or not self._saved
        self._bodies = good
        if not changed or self.path is None or self.readonly:
            return
        try:
            write_json(self.path, good, default=str)  # YAML timestamps in fields no one reads
            self._saved = True
        except (OSError, TypeError, ValueError) as e:
            self._saved = False
            log.error("cannot save state file %s: %s", self.path, e)

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
        parsed: dict[str, tuple[Mapping[str, Any], Any]] = {}
        for obj in objects:
            key = self._key(obj.ref)
            fallback: Any = _NOT_PARSED
            try:
                hit = self._parsed.get(key)
                value = hit[1] if hit is not None and hit[0] is obj.body else parse(obj)
                parsed[key] = (obj.body, value)
                good[key] = obj.body
                out.append((obj, value))
                continue
            except Partial as e:
                fallback = e.value
                problems.extend(Problem(obj.ref, i.field, i.message) for i in e.issues)
            except Invalid as e:
                problems.append(Problem(obj.ref, e.field, e.message))
            except (TypeError, AttributeError, ValueError, KeyError) as e:  # shapes no validator foresaw
                problems.append(Problem(obj.ref, "(object)", f"malformed: {e}"))
            previous = self._parse_previous(obj, parse, problems)
            if previous is not None:
                good[key] = previous[0].body
                out.append(previous)
            elif fallback is not _NOT_PARSED:
                out.append((obj, fallback))  # enforced, but never saved as good
        self._parsed = parsed
        self.replace(good)
        return out
