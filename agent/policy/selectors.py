"""Kubernetes label selectors (metav1.LabelSelector) and labels: parse, validate, match.

Validation follows the API server (apimachinery `IsQualifiedName`, `IsValidLabelValue`,
`ValidateLabelSelector`); regexes use fullmatch, so a trailing newline is never accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.policy.errors import Invalid, unknown_field

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
# Label values and key names: <= 63 chars of [A-Za-z0-9_.-], alphanumeric at both ends
# (values may also be empty); key prefixes are DNS subdomains (<= 253).
_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def valid_key(key: Any) -> bool:
    """A qualified name: optional `prefix/` (DNS subdomain, <= 253) + name (<= 63)."""
    if not isinstance(key, str):
        return False
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _PREFIX.fullmatch(prefix)):
        return False
    return len(name) <= 63 and _NAME.fullmatch(name) is not None


def valid_value(value: Any) -> bool:
    return isinstance(value, str) and (value == "" or (len(value) <= 63 and _NAME.fullmatch(value) is not None))


def _check_key(key: Any, field: str) -> str:
    if not valid_key(key):
        raise Invalid(field, f"invalid label key {key!r}")
    return key


def _check_value(value: Any, field: str) -> str:
    if not valid_value(value):
        raise Invalid(field, f"invalid label value {value!r}")
    return value


# Label keys and values that validated, remembered: validating costs ~1 us each, and
# every pod of a workload carries the same few.
_GOOD_KEYS: set[str] = set()
_GOOD_VALUES: set[str] = set()
_GOOD_MAX = 1 << 16


def parse_labels(obj: Any, field: str, issues: list[Invalid]) -> tuple[dict[str, str], bool]:
    """An object's labels: (the valid entries, whether every entry was valid).

    Each bad entry is reported in `issues`. Callers must treat an object whose labels
    are not all valid as matched by no selector of an accept peer: its real labels are
    unknown, so a NotIn or DoesNotExist must not match it either.
    """
    if obj is None:
        return {}, True
    if not isinstance(obj, Mapping):
        issues.append(Invalid(field, f"must be a map of strings to strings, got {type(obj).__name__}"))
        return {}, False
    out: dict[str, str] = {}
    ok = True
    for k, v in obj.items():
        if type(k) is str and type(v) is str and k in _GOOD_KEYS and v in _GOOD_VALUES:
            out[k] = v  # validated before (most pods repeat a few keys and values)
            continue
        if not valid_key(k):
            issues.append(Invalid(f"{field}[{k!r}]", f"invalid label key {k!r}"))
            ok = False
        elif not valid_value(v):
            issues.append(Invalid(f"{field}[{k}]", f"invalid label value {v!r}"))
            ok = False
        else:
            out[k] = v
            if type(k) is str and type(v) is str:  # (a str subclass may read otherwise)
                if len(_GOOD_KEYS) + len(_GOOD_VALUES) >= _GOOD_MAX:
                    _GOOD_KEYS.clear()
                    _GOOD_VALUES.clear()
                _GOOD_KEYS.add(k)
                _GOOD_VALUES.add(v)
    return out, ok


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True)
class Selector:
    """A parsed selector; the empty selector matches everything.

    `invalid` marks a selector that did not parse: it matches nothing (so as a peer it
    allows nothing); a policy's podSelector that is invalid is read by the compiler as
    selecting every pod of the namespace for isolation only.
    """

    requirements: tuple[Requirement, ...] = ()
    invalid: bool = False

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.invalid:
            return False
        for r in self.requirements:  # noqa: SIM110  (a loop, not all(...): runs per pod and peer)
            if not r.matches(labels):
                return False
        return True

    @property
    def empty(self) -> bool:
        return not self.invalid and not self.requirements


INVALID = Selector(invalid=True)


def parse_selector(obj: Any, field: str) -> Selector:
    """Parse a LabelSelector; `matchLabels` and `matchExpressions` are AND'd.

    Raises `Invalid` naming the first bad field. `null` (or absent) parts are empty;
    any other non-map / non-list (`matchLabels: 0`, `""`, `[]`) is invalid, never empty.
    """
    if obj is None:
        return Selector()
    if not isinstance(obj, Mapping):
        raise Invalid(field, f"must be an object, got {type(obj).__name__}")
    unknown = set(obj) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise Invalid(unknown_field(field, unknown), "unknown selector field")
    reqs: list[Requirement] = []
    match_labels = obj.get("matchLabels")
    if match_labels is None:
        match_labels = {}
    if not isinstance(match_labels, Mapping):
        raise Invalid(f"{field}.matchLabels", f"must be a map of strings, got {type(match_labels).__name__}")
    for k, v in match_labels.items():
        f = f"{field}.matchLabels[{k}]" if valid_key(k) else f"{field}.matchLabels[{k!r}]"
        reqs.append(Requirement(_check_key(k, f), "In", frozenset([_check_value(v, f)])))
    exprs = obj.get("matchExpressions")
    if exprs is None:
        exprs = []
    if not isinstance(exprs, list):
        raise Invalid(f"{field}.matchExpressions", f"must be a list, got {type(exprs).__name__}")
    for i, e in enumerate(exprs):
        f = f"{field}.matchExpressions[{i}]"
        if not isinstance(e, Mapping):
            raise Invalid(f, "must be an object")
        unknown = set(e) - {"key", "operator", "values"}
        if unknown:
            raise Invalid(unknown_field(f, unknown), "unknown field")
        key = _check_key(e.get("key"), f"{f}.key")
        op = e.get("operator")
        if not isinstance(op, str) or op not in OPERATORS:
            raise Invalid(f"{f}.operator", f"must be one of {', '.join(OPERATORS)}, got {op!r}")
        values = e.get("values")
        if values is None:
            values = []
        if not isinstance(values, list):
            raise Invalid(f"{f}.values", f"must be a list, got {type(values).__name__}")
        if op in ("In", "NotIn") and not values:
            raise Invalid(f"{f}.values", f"must be non-empty for operator {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise Invalid(f"{f}.values", f"must be empty for operator {op}")
        vals = frozenset(_check_value(v, f"{f}.values[{j}]") for j, v in enumerate(values))
        reqs.append(Requirement(key, op, vals))
    return Selector(tuple(reqs))
