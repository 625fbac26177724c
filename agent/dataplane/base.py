"""The one interface every dataplane implements. Dataplanes render the IR; they never
interpret policy."""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.ir import Direction, IPAddress, Program


@dataclass(frozen=True)
class Flow:
    """A tracked connection in its original direction (the side that opened it first)."""

    protocol: str  # tcp | udp | sctp
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int

    @classmethod
    def of(cls, protocol: str, src: str, dst: str, sport: int, dport: int) -> Flow:
        return cls(protocol, ipaddress.ip_address(src), ipaddress.ip_address(dst), sport, dport)


class DataplaneError(RuntimeError):
    """The kernel refused a change; the previous state is still in force."""


@dataclass(frozen=True)
class Count:
    packets: int = 0
    bytes: int = 0

    def __add__(self, other: Count) -> Count:
        return Count(self.packets + other.packets, self.bytes + other.bytes)


@dataclass
class Counters:
    """Kernel counters, keyed by IR identities so metrics can label them."""

    rules: dict[tuple[str, str, Direction], Count] = field(default_factory=dict)
    """(endpoint key, rule id, direction) -> matches."""
    drops: dict[tuple[str, Direction], Count] = field(default_factory=dict)
    """(endpoint key, direction) -> default-deny drops."""

    def add_rule(self, key: tuple[str, str, Direction], c: Count) -> None:
        self.rules[key] = self.rules.get(key, Count()) + c

    def add_drop(self, key: tuple[str, Direction], c: Count) -> None:
        self.drops[key] = self.drops.get(key, Count()) + c


@dataclass(frozen=True)
class DropEvent:
    """One sampled packet the kernel dropped (or, in audit mode, would have dropped)."""

    endpoint: str
    direction: Direction
    rule_id: str | None  # None: the direction's default deny
    protocol: str
    src: str
    dst: str
    sport: int | None
    dport: int | None
    audit: bool = False


class DropLog(ABC):
    @abstractmethod
    def read(self, timeout: float) -> list[DropEvent]:
        """Events since the last call; waits up to `timeout` seconds for the first."""

    def close(self) -> None:  # noqa: B027 - optional for implementations
        """Release kernel resources."""


@dataclass(frozen=True)
class ApplyStats:
    """What one sync changed, for logs, metrics and tests of incrementality."""

    full: bool  # True: whole table (re)built; False: a diff
    commands: int  # kernel commands in the transaction
    elements_added: int = 0
    elements_removed: int = 0
    chains_written: int = 0


@dataclass(frozen=True)
class LearnedEntry:
    """One address a pod learned from a DNS answer under one domainNames rule."""

    rule: str  # the IR rule key (`Rule.learned`; the endpoint is part of it)
    address: IPAddress
    expires: float  # time.monotonic() seconds: CLOCK_MONOTONIC, as bpf_ktime_get_ns()


class Dataplane(ABC):
    name: str
    # True: `learn` keeps learned addresses in kernel sets/maps with per-element expiry,
    # and `apply` renders every `Rule.learned` rule against them (its `peers` ignored).
    # False: the learner puts learned addresses into `peers` and re-applies.
    learns_in_kernel: bool = False

    @abstractmethod
    def render(self, program: Program) -> str:
        """What `apply` would program, human-readable; touches nothing."""

    @abstractmethod
    def apply(self, program: Program) -> ApplyStats:
        """Make the kernel enforce `program` in one atomic step; raise DataplaneError."""

    @abstractmethod
    def counters(self, program: Program | None = None) -> Counters:
        """Current kernel counters for `program` (default: what the last `apply` programmed;
        a fresh process passes the program it computed)."""

    def established(self) -> list[Flow]:
        """Flows the dataplane currently lets through without judging (its flow table)."""
        return []

    def forget(self, flows: list[Flow]) -> int:
        """Drop these flows' state so their next packet is judged again; returns how many."""
        return 0

    def node_addresses(self) -> list[IPAddress]:
        """This network namespace's own addresses (node -> pod traffic is always allowed)."""
        from agent.dataplane.netaddr import addresses  # raw rtnetlink: no pyroute2 import on the way to ready

        return addresses()

    def drop_log(self) -> DropLog | None:
        """A reader of sampled drops, or None when this dataplane cannot log them."""
        return None

    def objects(self) -> dict[str, int]:
        """What is programmed, by kind (sets, elements, chains, map entries, ...)."""
        return {}

    def map_fill(self) -> dict[str, float]:
        """Fill ratio (entries / capacity) of every fixed-size kernel map, by map name."""
        return {}

    def learn(self, add: Sequence[LearnedEntry], remove: Sequence[LearnedEntry] = ()) -> None:
        """Add (or give a new expiry to) and remove learned addresses in one kernel update,
        touching nothing else; an entry of a rule the kernel does not hold is ignored.
        Raise DataplaneError (the previous kernel state stays)."""
        raise NotImplementedError(f"{self.name} does not learn in the kernel")

    @abstractmethod
    def cleanup(self) -> None:
        """Remove everything this dataplane owns from the kernel."""
