"""The parsed form of ClusterNetworkPolicy (v1alpha2) and of the v1alpha1 AdminNetworkPolicy /
BaselineAdminNetworkPolicy it replaces: one shape for all three kinds."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from agent.ir import Network, Tier, Verdict
from agent.policy.selectors import Selector

CNP = "ClusterNetworkPolicy"
ANP = "AdminNetworkPolicy"
BANP = "BaselineAdminNetworkPolicy"
KINDS = (CNP, ANP, BANP)
_SHORT = {CNP: "cnp", ANP: "anp", BANP: "banp"}  # in rule keys
BANP_PRIORITY = 1001  # the v1alpha1 singleton sorts after every Baseline ClusterNetworkPolicy


_EVERY = Selector()  # the empty selector: every namespace


@dataclass(frozen=True)
class Subject:
    """Pods in namespaces matching `namespaces`, and (for `pods` subjects) matching `pods`.
    `everything` is the fail-closed reading of a subject that did not parse."""

    namespaces: Selector = _EVERY
    pods: Selector | None = None  # None: a `namespaces` subject (every pod there)
    everything: bool = False


@dataclass(frozen=True)
class ClusterPeer:
    """Exactly one kind of peer: pods (namespace AND pod selector), nodes, or networks."""

    namespaces: Selector | None = None  # pods in matching namespaces (None: not a pod peer)
    pods: Selector | None = None  # None with `namespaces`: every pod of those namespaces
    nodes: Selector | None = None  # addresses of matching Node objects
    networks: tuple[Network, ...] = ()


@dataclass(frozen=True)
class ClusterPort:
    """A destination port: a protocol and an inclusive range, or a container port name
    (resolved on each destination pod, whatever protocol that port declares)."""

    protocol: str = ""  # tcp | udp | sctp ("" for a named port)
    first: int = 0
    last: int = 0
    named: str | None = None


@dataclass(frozen=True)
class ClusterRule:
    index: int
    name: str
    verdict: Verdict  # ACCEPT | DROP | PASS
    peers: tuple[ClusterPeer, ...] | None  # None: every address (a fail-closed Deny all)
    ports: tuple[ClusterPort, ...] = ()  # (): every protocol and port


@dataclass(frozen=True)
class ClusterPolicy:
    kind: str  # CNP | ANP | BANP
    name: str
    tier: Tier  # ADMIN | BASELINE
    priority: int
    subject: Subject
    ingress: tuple[ClusterRule, ...]
    egress: tuple[ClusterRule, ...]
    source: str = "file"

    @property
    def order(self) -> tuple[int, str, str]:
        """Precedence inside the tier: ascending priority; equal priorities (which the API
        leaves to the implementation) by name, then kind, so the result is deterministic."""
        return (self.priority, self.name, self.kind)

    @property
    def shown_priority(self) -> int | None:
        return None if self.kind == BANP else self.priority

    @cached_property
    def key(self) -> str:
        return f"{self.source}:{_SHORT[self.kind]}:{self.name}"
