"""Kubernetes label selectors (metav1.LabelSelector): parse, validate, match."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.policy.errors import Invalid

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
# Label values: empty, or <= 63 chars of [A-Za-z0-9_.-] starting and ending alphanumeric.
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _check_key(key: Any, field: str) -> str:
    if not isinstance(key, str):
        raise Invalid(field, f"label key must be a string, got {key!r}")
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not _PREFIX.match(prefix))) or (
        len(name) > 63 or not _NAME.match(name)
    ):
        raise Invalid(field, f"invalid label key {key!r}")
    return key


def _check_value(value: Any, field: str) -> str:
    if not isinstance(value, str) or len(value) > 63 or not _VALUE.match(value):
        raise Invalid(field, f"invalid label value {value!r}")
    return value


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
    """A parsed selector; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


def parse_selector(obj: Any, field: str) -> Selector:
    """Parse a LabelSelector; `matchLabels` and `matchExpressions` are AND'd."""
    if obj is None:
        return Selector()
    if not isinstance(obj, Mapping):
        raise Invalid(field, f"must be an object, got {type(obj).__name__}")
    unknown = set(obj) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise Invalid(f"{field}.{sorted(unknown)[0]}", "unknown selector field")
    reqs: list[Requirement] = []
    match_labels = obj.get("matchLabels") or {}
    if not isinstance(match_labels, Mapping):
        raise Invalid(f"{field}.matchLabels", "must be a map of strings")
    for k, v in match_labels.items():
        f = f"{field}.matchLabels[{k}]"
        reqs.append(Requirement(_check_key(k, f), "In", frozenset([_check_value(v, f)])))
    exprs = obj.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise Invalid(f"{field}.matchExpressions", "must be a list")
    for i, e in enumerate(exprs):
        f = f"{field}.matchExpressions[{i}]"
        if not isinstance(e, Mapping):
            raise Invalid(f, "must be an object")
        key = _check_key(e.get("key"), f"{f}.key")
        op = e.get("operator")
        if op not in OPERATORS:
            raise Invalid(f"{f}.operator", f"must be one of {', '.join(OPERATORS)}, got {op!r}")
        values = e.get("values") or []
        if not isinstance(values, list):
            raise Invalid(f"{f}.values", "must be a list")
        if op in ("In", "NotIn") and not values:
            raise Invalid(f"{f}.values", f"must be non-empty for operator {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise Invalid(f"{f}.values", f"must be empty for operator {op}")
        vals = frozenset(_check_value(v, f"{f}.values[{j}]") for j, v in enumerate(values))
        reqs.append(Requirement(key, op, vals))
    return Selector(tuple(reqs))
