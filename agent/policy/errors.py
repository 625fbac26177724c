"""The one exception semantics raise for bad input: it names the offending field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Invalid(ValueError):
    """An object failed validation; `field` is a JSON-path-like locator (spec.ingress[0]...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def as_list(obj: Any, field: str) -> list[Any]:
    """A JSON list; `null` reads as empty (APIs send it for empty lists)."""
    if obj is None:
        return []
    if not isinstance(obj, list):
        raise Invalid(field, f"must be a list, got {type(obj).__name__}")
    return obj


def as_map(obj: Any, field: str, *, required: bool = False) -> Mapping[str, Any]:
    """A JSON object; `null` reads as empty unless the object is required."""
    if obj is None and not required:
        return {}
    if not isinstance(obj, Mapping):
        raise Invalid(field, f"must be an object, got {type(obj).__name__}")
    return obj
