"""Admission: validate raw objects into an Inventory, keeping each object's last good version.

An invalid object is reported (object and field), and the version of it that last
validated stays in force; every other object is used as delivered. The store of
last good versions can be persisted so a one-shot `apply` honours it too.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent.inventory import Inventory, ObjectRef, Problem, RawPolicy
from agent.policy.errors import Invalid
from agent.policy.kubernetes import parse_policy
from agent.sources.kubeobjects import RawObject, parse_namespace, parse_pod

log = logging.getLogger(__name__)
T = TypeVar("T")


class LastGood:
    """Last valid body of each object by (kind, namespace, name); optionally on disk."""

    def __init__(self, path: Path | None = None, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly  # the simulator reads the state but never writes it
        self._bodies: dict[str, Mapping[str, Any]] = {}
        # key -> (body, parsed value): an object delivered again as the same body object
        # (sources keep unchanged objects) is not parsed again.
        self._parsed: dict[str, tuple[Mapping[str, Any], Any]] = {}
        if path is not None and path.exists():
            try:
                self._bodies = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable state file %s: %s", path, e)

    @staticmethod
    def _key(ref: ObjectRef) -> str:
        return f"{ref.source}|{ref.kind}|{ref.namespace}|{ref.name}"

    def get(self, ref: ObjectRef) -> Mapping[str, Any] | None:
        return self._bodies.get(self._key(ref))

    def replace(self, good: dict[str, Mapping[str, Any]]) -> None:
        """Keep exactly `good` (objects gone from the source are forgotten)."""
        changed = good != self._bodies
        self._bodies = good
        if changed and self.path is not None and not self.readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
            with os.fdopen(fd, "w") as f:
                json.dump(good, f)
            os.replace(tmp, self.path)

    def admit(
        self,
        objects: Iterable[RawObject],
        parse: Callable[[RawObject], T],
        problems: list[Problem],
    ) -> list[tuple[RawObject, T]]:
        """Parse each object; on failure fall back to its last good body, if any."""
        out: list[tuple[RawObject, T]] = []
        good: dict[str, Mapping[str, Any]] = {}
        parsed: dict[str, tuple[Mapping[str, Any], Any]] = {}
        for obj in objects:
            key = self._key(obj.ref)
            try:
                hit = self._parsed.get(key)
                value = hit[1] if hit is not None and hit[0] is obj.body else parse(obj)
                parsed[key] = (obj.body, value)
                good[key] = obj.body
                out.append((obj, value))
                continue
            except Invalid as e:
                problems.append(Problem(obj.ref, e.field, e.message))
            except (TypeError, AttributeError, ValueError) as e:  # shapes no validator foresaw
                problems.append(Problem(obj.ref, "(object)", f"malformed: {e}"))
            previous = self.get(obj.ref)
            if previous is not None:
                prev_obj = RawObject(obj.ref, previous)
                good[key] = previous
                out.append((prev_obj, parse(prev_obj)))
        self._parsed = parsed
        self.replace(good)
        return out


def kubernetes_inventory(
    objects: Iterable[RawObject], store: LastGood, problems: list[Problem] | None = None
) -> Inventory:
    """Namespaces, pods and NetworkPolicies into an Inventory, invalid objects reported."""
    inv = Inventory(problems=list(problems or []))

    def parse(obj: RawObject) -> Any:
        if obj.ref.kind == "Namespace":
            return parse_namespace(obj.body)
        if obj.ref.kind == "Pod":
            return parse_pod(obj.body)
        if not obj.ref.name:
            raise Invalid("metadata.name", "missing")
        return parse_policy(RawPolicy(obj.ref, obj.body))

    for obj, value in store.admit(objects, parse, inv.problems):
        if obj.ref.kind == "Namespace":
            inv.namespaces[value.name] = value
        elif obj.ref.kind == "Pod":
            if value is not None:
                inv.endpoints[value.key] = value
        else:
            inv.policies[obj.ref.key] = RawPolicy(obj.ref, obj.body)
    return inv
