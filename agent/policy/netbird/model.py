"""NetBird account model: policies, rules, groups, peers, posture checks. Pure."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.inventory import IPAddress, ObjectRef
from agent.ir import (
    Network,
    Verdict,
)
from agent.policy.errors import Invalid

SOURCE = "netbird"
DEFAULT_INTERFACE = "wt0"
DEFAULT_RANGES: tuple[Network, ...] = (ipaddress.ip_network("100.64.0.0/10"),)
ALL_GROUP = "All"
NETBIRD_PROTOCOLS = ("all", "tcp", "udp", "icmp", "netbird-ssh")
ACTIONS = ("accept", "drop")
# Inventory.context keys account_inventory fills in (the pipeline reads the local peer).
CTX_ACCOUNT = "netbird.account"
CTX_LOCAL_PEER = "netbird.local_peer"
# A peer address outside the configured ranges still counts as inside the NetBird
# network, with this prefix length (the network around it, for IPv6).
_INSIDE_PREFIX = {4: 32, 6: 64}
_VERSION = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?$")


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class ResourceRef:
    id: str
    type: str


@dataclass(frozen=True)
class NbRule:
    index: int
    id: str
    name: str
    enabled: bool
    action: Verdict
    bidirectional: bool
    protocol: str  # one of NETBIRD_PROTOCOLS
    ports: tuple[int, ...]
    port_ranges: tuple[tuple[int, int], ...]
    sources: tuple[str, ...] | None  # group ids; None when the API sent null / nothing
    destinations: tuple[str, ...] | None
    source_resource: ResourceRef | None = None
    destination_resource: ResourceRef | None = None
    # Fail-closed resolution of invalid parts (see read_policy): "sources"/"destinations"
    # that mean every peer (a drop) or nobody (an accept); `void`: the rule matches nothing.
    any_sides: frozenset[str] = frozenset()
    void_sides: frozenset[str] = frozenset()
    void: bool = False
    invalid: bool = False  # some part was invalid (already reported)


@dataclass(frozen=True)
class Policy:
    ref: ObjectRef
    id: str
    name: str
    enabled: bool
    posture_checks: tuple[str, ...]
    rules: tuple[NbRule, ...]
    # An invalid posture-check reference: its outcome is unknown (stricter side).
    posture_unknown: bool = False
    # Every invalid part found, in order; the rules above are already resolved fail-closed.
    problems: tuple[Invalid, ...] = ()
    # Appended to rule keys: the drops of an invalid version enforced next to the last good
    # version of the same policy need peer-set keys of their own.
    variant: str = ""

    def drops_only(self, variant: str) -> Policy:
        """This policy reduced to its drop rules (the stricter half of an invalid version)."""
        return dataclasses.replace(self, rules=tuple(r for r in self.rules if r.action is Verdict.DROP),
                                   variant=variant)


@dataclass(frozen=True)
class Group:
    id: str
    name: str
    peers: tuple[str, ...]  # peer ids
    peers_count: int | None = None


@dataclass(frozen=True)
class Peer:
    id: str
    name: str
    ip: IPAddress
    ipv6: IPAddress | None = None
    version: str = ""
    country_code: str = ""
    city_name: str = ""

    @property
    def ips(self) -> tuple[IPAddress, ...]:
        return (self.ip,) if self.ipv6 is None else (self.ip, self.ipv6)


@dataclass(frozen=True)
class VersionCheck:
    min_version: tuple[int, int, int]


@dataclass(frozen=True)
class GeoCheck:
    locations: tuple[tuple[str, str], ...]  # (country_code, city_name or "")
    action: str  # allow | deny


@dataclass(frozen=True)
class UnevaluableCheck:
    kind: str  # needs data the REST API does not expose


Check = VersionCheck | GeoCheck | UnevaluableCheck


@dataclass(frozen=True)
class PostureCheck:
    id: str
    name: str
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Account:
    """Everything the semantics need, already validated (and last-good substituted)."""

    policies: tuple[Policy, ...] = ()
    groups: Mapping[str, Group] = field(default_factory=dict)
    peers: Mapping[str, Peer] = field(default_factory=dict)
    posture_checks: Mapping[str, PostureCheck] = field(default_factory=dict)
    # Referenced objects that exist but are invalid with no last good version: their
    # content is unknown, so they resolve to the stricter side (see module doc).
    unknown_groups: frozenset[str] = frozenset()
    unknown_posture_checks: frozenset[str] = frozenset()
