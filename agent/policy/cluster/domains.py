"""ClusterNetworkPolicy egress `domainNames` (v1alpha2, experimental; NPEP-133): the name
patterns, and the `Learned` table of addresses pods were answered for them. Pure.

A pattern is an exact name or `*.` followed by a name (apis/v1alpha2 DomainName):
- an exact name matches only itself: `kubernetes.io` matches `kubernetes.io`, not
  `www.kubernetes.io`;
- `*.kubernetes.io` matches names with ONE OR MORE labels before `kubernetes.io`
  (`www.kubernetes.io`, `latest.blog.kubernetes.io`), never `kubernetes.io` itself;
- comparison ignores ASCII case and one trailing dot (`Kubernetes.IO.` is `kubernetes.io`).

Validation is the CRD's pattern, except that its `[a-zA-z0-9]` (a typo: `A-z` also spans
``[\\]^_` ``) is read as `[a-zA-Z0-9]`: a name using those characters is refused, so its
Accept rule matches nothing (the strict side). Names longer than 253 characters, which DNS
cannot answer, are refused too.

Addresses reach the IR only through `Learned`: what the agent saw answered to a pod, per
(endpoint key, rule key). With no learner the table is empty and a domainNames rule
matches nothing (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType

from agent.inventory import IPAddress
from agent.ir import LEARNED_MARK, PeerSet, Program
from agent.policy.errors import Invalid, as_list

MAX_DOMAIN_NAMES = 25  # per peer (the CRD's MaxItems)
_LABEL = r"[a-zA-Z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?"
_PATTERN = re.compile(rf"(\*\.)?({_LABEL}\.)+{_LABEL}\.?")


def normalize(name: str) -> str:
    """A DNS name as patterns compare it: lower-case ASCII, no trailing dot."""
    return name.removesuffix(".").lower()


@dataclass(frozen=True)
class DomainPattern:
    """One `domainNames` entry: `suffix` is the normalized name after any `*.`."""

    text: str  # as written, for explain and errors
    suffix: str
    wildcard: bool

    def matches(self, name: str) -> bool:
        """Does `name` (any case, trailing dot or not) match? See the module docstring."""
        n = normalize(name)
        if not self.wildcard:
            return n == self.suffix
        # One or more whole labels before the suffix: "x.suffix", never "suffix" or "xsuffix".
        return n.endswith("." + self.suffix) and len(n) > len(self.suffix) + 1

    def matches_labels(self, labels: tuple[str, ...]) -> bool:
        """The same on a name's labels (lower-case, no root label), as a DNS parser gives
        them: a label holding a '.' byte then never passes for two labels."""
        sfx = self.labels
        if not self.wildcard:
            return labels == sfx
        return len(labels) > len(sfx) and labels[-len(sfx):] == sfx

    @cached_property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.suffix.split("."))

    def __str__(self) -> str:
        return self.text


def parse_domain(text: object, field_path: str) -> DomainPattern:
    if not isinstance(text, str) or _PATTERN.fullmatch(text) is None:
        raise Invalid(field_path, f"invalid domain name {text!r}: an exact name or '*.' and a name "
                      "(letters, digits, '-', '_'; '*' only as the whole first label)")
    wildcard = text.startswith("*.")
    suffix = normalize(text[2:] if wildcard else text)
    if len(suffix) > 253:
        raise Invalid(field_path, f"domain name longer than 253 characters ({len(suffix)})")
    return DomainPattern(text, suffix, wildcard)


def parse_domains(value: object, field_path: str) -> tuple[DomainPattern, ...]:
    items = as_list(value, field_path)
    if not 1 <= len(items) <= MAX_DOMAIN_NAMES:
        raise Invalid(field_path, f"must have 1 to {MAX_DOMAIN_NAMES} entries, got {len(items)}")
    out = tuple(parse_domain(t, f"{field_path}[{i}]") for i, t in enumerate(items))
    seen: set[str] = set()
    for i, p in enumerate(out):  # listType=set: the API server refuses duplicates
        if p.text in seen:
            raise Invalid(f"{field_path}[{i}]", f"duplicate domain name {p.text!r}")
        seen.add(p.text)
    return out


@dataclass(frozen=True)
class DomainRule:
    """A domainNames Accept rule as one endpoint's learner needs it: the rule's key (what
    `Learned` is indexed by, with the endpoint) and the patterns of all its domain peers."""

    key: str
    patterns: tuple[DomainPattern, ...]

    def matches(self, name: str) -> bool:
        return any(p.matches(name) for p in self.patterns)

    def matches_labels(self, labels: tuple[str, ...]) -> bool:
        return any(p.matches_labels(labels) for p in self.patterns)


@dataclass(frozen=True)
class Learned:
    """(endpoint key, rule key) -> {address: expiry (seconds, the learner's clock)}.

    Immutable: the learner returns a new table per update. Compiling reads every entry it
    holds, so the owner calls `expire(now)` before compiling."""

    entries: Mapping[tuple[str, str], Mapping[IPAddress, float]] = field(
        default_factory=lambda: MappingProxyType({}))

    def addresses(self, endpoint: str, rule: str) -> frozenset[IPAddress]:
        return frozenset(self.entries.get((endpoint, rule), ()))

    def expire(self, now: float) -> Learned:
        """The entries still valid at `now` (an entry expiring exactly at `now` is gone)."""
        kept = {k: {ip: t for ip, t in v.items() if t > now} for k, v in self.entries.items()}
        return Learned(MappingProxyType({k: MappingProxyType(v) for k, v in kept.items() if v}))

    def expired(self, now: float) -> int:
        """How many (endpoint, rule, address) entries `expire(now)` would drop."""
        return sum(1 for v in self.entries.values() for t in v.values() if t <= now)

    def for_endpoint(self, endpoint: str) -> Iterator[tuple[str, IPAddress, float]]:
        for (ep, rule), v in self.entries.items():
            if ep == endpoint:
                for ip, t in v.items():
                    yield rule, ip, t

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    @staticmethod
    def of(items: Iterable[tuple[str, str, IPAddress, float]]) -> Learned:
        """A table from (endpoint, rule, address, expiry); the latest expiry of repeats wins."""
        out: dict[tuple[str, str], dict[IPAddress, float]] = {}
        for ep, rule, ip, t in items:
            d = out.setdefault((ep, rule), {})
            d[ip] = max(t, d.get(ip, t))
        return Learned(MappingProxyType({k: MappingProxyType(v) for k, v in out.items()}))


NO_LEARNED = Learned()


def learned_rule_key(rule: str, endpoint: str) -> str:
    return f"{rule}{LEARNED_MARK}{endpoint}"


def with_learned(program: Program, learned: Learned) -> Program:
    """`program` with the peers of every domainNames rule replaced by what `learned` holds
    for it now: the same Program compiling with `learned` gives, without recompiling (the
    agent calls this for each answer that adds an address, and when entries expire)."""
    eps = {}
    for key, ep in program.endpoints.items():
        rules = ep.egress.rules
        if not any(LEARNED_MARK in r.key for r in rules):
            eps[key] = ep
            continue
        new = []
        for r in rules:
            if LEARNED_MARK in r.key:
                rule, _, endpoint = r.key.rpartition(LEARNED_MARK)
                r = replace(r, peers=PeerSet.of(learned.addresses(endpoint, rule)))
            new.append(r)
        eps[key] = replace(ep, egress=replace(ep.egress, rules=tuple(new)))
    return replace(program, endpoints=eps)
