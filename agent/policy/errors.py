"""The one exception semantics raise for bad input: it names the offending field."""

from __future__ import annotations


class Invalid(ValueError):
    """An object failed validation; `field` is a JSON-path-like locator (spec.ingress[0]...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
