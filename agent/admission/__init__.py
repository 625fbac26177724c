"""Admission: validate raw objects into an Inventory, keeping each object's last good version.

Fail closed. An invalid object is reported (object and field path). Then:
(a) if a version of it validated before (its last good version), that version stays in
    force, as long as it still validates today;
(b) otherwise the object is read fail-closed: its invalid parts match nothing in accept
    rules and everything in isolations (see `parse_policy`, `parse_pod`,
    `parse_namespace`), so it never allows more than any valid reading of it would.
One bad object never blocks the others. The store of last good versions can be persisted
(only bodies that validated are written), so a restart, or a one-shot `apply`, admits
exactly what the running agent admitted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent.inventory import Inventory, Namespace, ObjectRef, Problem, RawPolicy
from agent.policy.errors import Invalid, Partial, is_dns_label, is_dns_subdomain, safe_name
from agent.policy.kubernetes import isolation_only, parse_policy
from agent.sources.kubeobjects import RawObject, parse_namespace, parse_pod

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
        tmp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
            with os.fdopen(fd, "w") as f:
                json.dump(good, f, default=str)  # YAML timestamps in fields no one reads
            os.replace(tmp, self.path)
            tmp = None
            self._saved = True
        except (OSError, TypeError, ValueError) as e:
            self._saved = False
            log.error("cannot save state file %s: %s", self.path, e)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

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


def _strict(parse: Callable[[Any, list[Invalid]], T], fallback: Callable[[], T]) -> Callable[[Any], T]:
    """A fail-closed parser as admission wants it: the value when valid, else `Partial`.
    A shape no validator foresaw still yields the fail-closed `fallback`."""

    def run(body: Any) -> T:
        issues: list[Invalid] = []
        try:
            value = parse(body, issues)
        except Partial:
            raise
        except Invalid as e:
            raise Partial(fallback(), [*issues, e]) from None
        except (TypeError, AttributeError, ValueError, KeyError) as e:
            raise Partial(fallback(), [*issues, Invalid("(object)", f"malformed: {e}")]) from None
        if issues:
            raise Partial(value, issues)
        return value

    return run


def kubernetes_inventory(
    objects: Iterable[RawObject], store: LastGood, problems: list[Problem] | None = None
) -> Inventory:
    """Namespaces, pods and NetworkPolicies into an Inventory, invalid objects reported
    and read fail-closed (see the module docstring)."""
    inv = Inventory(problems=list(problems or []))

    def parse(obj: RawObject) -> Any:
        ref = obj.ref
        if not isinstance(obj.body, Mapping):
            raise Invalid("(object)", "must be an object")
        if ref.kind == "Namespace":
            # Unreadable: kept by name, matched by no namespaceSelector; without a name
            # nothing can refer to it.
            return _strict(parse_namespace, lambda: Namespace(
                safe_name(ref.name, is_dns_label(ref.name)), {}, labels_invalid=True) if ref.name else None,
            )(obj.body)
        if ref.kind == "Pod":
            # A pod that cannot be read has no address we could isolate: left out.
            return _strict(parse_pod, lambda: None)(obj.body)
        return _strict(
            lambda body, issues: parse_policy(RawPolicy(ref, body), issues),
            lambda: isolation_only(safe_name(ref.namespace, is_dns_label(ref.namespace)),
                                   safe_name(ref.name, is_dns_subdomain(ref.name)), ref.source),
        )(obj.body)

    for obj, value in store.admit(objects, parse, inv.problems):
        if value is None:
            continue
        if obj.ref.kind == "Namespace":
            inv.namespaces[value.name] = value
        elif obj.ref.kind == "Pod":
            inv.endpoints[value.key] = value
        else:
            inv.policies[obj.ref.key] = RawPolicy(obj.ref, obj.body, parsed=value)
    return inv
