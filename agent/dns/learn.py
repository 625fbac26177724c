"""The learner (pure): a DNS answer delivered to a pod -> `Learned` entries for the
domainNames rules that apply to that pod.

- The answer is parsed with dnspython. Anything that is not a well-formed response to one
  IN-class query with rcode NOERROR learns nothing (and is never an error: the hold passes
  it on unchanged).
- Only records on the chain from the question's name are used: the name, then CNAME targets
  inside the answer section (a loop, or more than `MAX_CHAIN` hops, learns nothing), then the A and AAAA
  records of the chain's last name. Records for other owners (which a resolver has no reason
  to send) are ignored, so an answer cannot slip in addresses for a name nobody asked.
- The addresses are learned under every rule one of whose patterns matches ANY name on the
  chain (the question or a CNAME target): they are that name's addresses.
- Expiry = now + max(TTL, `TTL_FLOOR`), TTL being the smallest along the chain (a CNAME
  expiring sooner ends the chain sooner). The floor covers clients that reuse an answer a
  little longer than its TTL (and answers with TTL 0).
- Per pod at most `MAX_PER_POD` (endpoint, rule, address) entries: beyond that the entries
  expiring soonest go first, so a pod resolving very many names evicts only its own oldest
  learnings, never another pod's. 4096 leaves room for NPEP-133's 100 addresses per name for
  40 names at once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from agent.inventory import IPAddress
from agent.policy.cluster import DomainRule, Learned

TTL_FLOOR = 60  # seconds
MAX_PER_POD = 4096
MAX_CHAIN = 16


@dataclass(frozen=True)
class Resolved:
    """One address an answer gives, with the names leading to it and the chain's TTL."""

    names: tuple[tuple[str, ...], ...]  # label tuples, lower-case, question first
    address: IPAddress
    ttl: int

    @property
    def question(self) -> str:
        return ".".join(self.names[0])

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(".".join(n) for n in self.names)


def _labels(name: dns.name.Name) -> tuple[str, ...]:
    # bytes.lower() folds ASCII only (DNS case-insensitivity); latin-1 keeps every byte
    return tuple(lab.lower().decode("latin-1") for lab in name.labels if lab)


def resolved(wire: bytes) -> list[Resolved]:
    """The addresses an answer gives for its question, or [] for anything else."""
    try:
        msg = dns.message.from_wire(wire, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError):
        return []
    if (not msg.flags & dns.flags.QR or msg.opcode() != dns.opcode.QUERY or msg.rcode() != dns.rcode.NOERROR
            or len(msg.question) != 1 or msg.question[0].rdclass != dns.rdataclass.IN):
        return []
    cnames: dict[dns.name.Name, tuple[dns.name.Name, int]] = {}
    addrs: dict[dns.name.Name, list[tuple[IPAddress, int]]] = {}
    for rrset in msg.answer:
        if rrset.rdclass != dns.rdataclass.IN:
            continue
        if rrset.rdtype == dns.rdatatype.CNAME and len(rrset) == 1:
            cnames[rrset.name] = (next(iter(rrset)).target, rrset.ttl)
        elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            addrs.setdefault(rrset.name, []).extend((ipaddress.ip_address(r.address), rrset.ttl) for r in rrset)
    name = msg.question[0].name
    chain, ttl, seen = [name], None, {name}
    while name in cnames:
        target, t = cnames[name]
        if target in seen or len(chain) > MAX_CHAIN:
            return []  # a loop, or a chain too long to follow: a broken answer learns nothing
        ttl = t if ttl is None else min(ttl, t)
        name = target
        chain.append(name)
        seen.add(name)
    names = tuple(_labels(n) for n in chain)
    out = []
    for ip, t in addrs.get(name, ()):
        out.append(Resolved(names, ip, t if ttl is None else min(ttl, t)))
    return out


def updates(
    endpoint: str, rules: Sequence[DomainRule], wire: bytes, now: float, floor: int = TTL_FLOOR
) -> list[tuple[str, str, IPAddress, float]]:
    """(endpoint, rule key, address, expiry) for every address the answer gives under a
    name some rule of this endpoint matches."""
    return [e for e, _ in named_updates(endpoint, rules, resolved(wire), now, floor)]


def named_updates(
    endpoint: str, rules: Sequence[DomainRule], answers: Iterable[Resolved], now: float, floor: int = TTL_FLOOR
) -> list[tuple[tuple[str, str, IPAddress, float], str]]:
    """`updates` of already parsed answers, each with the question's name (for `/dns` and
    `explain --to-name`: which name taught the address)."""
    out = []
    questions: dict[tuple[tuple[str, ...], ...], str] = {}  # one string per chain, not per address
    for r in answers:
        for rule in rules:
            if any(rule.matches_labels(n) for n in r.names):
                q = questions.get(r.names)
                if q is None:
                    q = questions[r.names] = r.question
                out.append(((endpoint, rule.key, r.address, now + max(r.ttl, floor)), q))
    return out


def _copy(m: Mapping[IPAddress, float]) -> dict[IPAddress, float]:
    """A mutable copy of one (endpoint, rule) map. A dict's own copy reuses its stored
    hashes: `dict(proxy)` would call IPv4Address.__hash__ (Python code) on every address, so
    an answer to a pod that learned thousands cost milliseconds."""
    return m.copy() if isinstance(m, (dict, MappingProxyType)) else dict(m)


def merge(table: Learned, new: Iterable[tuple[str, str, IPAddress, float]], cap: int = MAX_PER_POD) -> Learned:
    """`table` with `new` entries added (the later expiry wins) and each endpoint touched by
    them held to `cap` entries, dropping those expiring soonest.

    Per answer, so its cost follows what the answer touches, not the table: the untouched
    (endpoint, rule) maps are shared with `table` (immutable), only touched ones are copied
    (without hashing their addresses again: `_copy`), and an endpoint's count reads the
    sizes of its own maps."""
    touched: dict[tuple[str, str], dict[IPAddress, float]] = {}
    for ep, rule, ip, t in new:
        d = touched.get((ep, rule))
        if d is None:
            d = touched[(ep, rule)] = _copy(table.entries.get((ep, rule), {}))
        d[ip] = max(t, d.get(ip, t))
    if not touched:
        return table
    entries: dict[tuple[str, str], Mapping[IPAddress, float]] = dict(table.entries)
    entries.update(touched)
    for ep in {k[0] for k in touched}:
        mine = [k for k in entries if k[0] == ep]
        if sum(len(entries[k]) for k in mine) <= cap:
            continue
        flat = sorted(((t, k[1], ip) for k in mine for ip, t in entries[k].items()),
                      key=lambda x: (x[0], x[1], str(x[2])))
        for _, rule, ip in flat[: len(flat) - cap]:
            d = touched.get((ep, rule))
            if d is None:
                d = touched[(ep, rule)] = _copy(entries[(ep, rule)])
                entries[(ep, rule)] = d
            del d[ip]
    return Learned(MappingProxyType({k: v if k not in touched else MappingProxyType(v)
                                     for k, v in entries.items() if v}))
