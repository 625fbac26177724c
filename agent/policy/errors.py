"""The one exception semantics raise for bad input: it names the offending field."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any


class Invalid(ValueError):
    """An object failed validation; `field` is a JSON-path-like locator (spec.ingress[0]...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def unknown_field(field: str, keys: set[Any]) -> str:
    """The path of the first unknown key; a hostile key is quoted, never printed raw."""
    key = sorted(map(str, keys))[0]
    return f"{field}.{key}" if key.isidentifier() else f"{field}.{key!r}"


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


# Object names as the API server validates them (k8s.io/apimachinery validation).
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def is_dns_label(text: Any) -> bool:
    """RFC 1123 label (namespace names): <= 63 chars of [a-z0-9-], alphanumeric at both ends."""
    return isinstance(text, str) and len(text) <= 63 and _DNS_LABEL.fullmatch(text) is not None


def is_dns_subdomain(text: Any) -> bool:
    """RFC 1123 subdomain (pod and NetworkPolicy names): <= 253 chars, dot-separated labels."""
    return isinstance(text, str) and len(text) <= 253 and _DNS_SUBDOMAIN.fullmatch(text) is not None


# IANA_SVC_NAME, as the API server validates named ports: <= 15 chars of [a-z0-9-], at
# least one letter, no leading, trailing or doubled '-'.
_PORT_NAME = re.compile(r"(?=.{1,15}\Z)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*")


def valid_port_name(name: Any) -> bool:
    return isinstance(name, str) and _PORT_NAME.fullmatch(name) is not None


def safe_name(text: Any, valid: bool) -> str:
    """`text` when it is a valid name, else a stand-in no valid name can equal ('_' is never
    valid in one) and that is safe in kernel text: a hostile name never travels further."""
    if valid:
        return str(text)
    return "_invalid_" + hashlib.blake2s(repr(text).encode(), digest_size=6).hexdigest()


class Partial(Invalid):
    """An object with bad parts that is still enforced, read fail-closed.

    `value` is the object with its invalid parts matching nothing in accept rules and
    everything in isolations; `issues` names every bad field. Admission prefers the
    object's last good version and enforces `value` only when there is none.
    """

    def __init__(self, value: Any, issues: list[Invalid]) -> None:
        first = issues[0] if issues else Invalid("(object)", "invalid")
        super().__init__(first.field, first.message)
        self.value = value
        self.issues = tuple(issues) or (first,)
