"""What sources produce: one immutable snapshot of endpoints, namespaces and policies.

Sources know nothing about the kernel; semantics know nothing about where the
objects came from beyond the `Origin` they carry for error messages and metrics.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class ContainerPort:
    """A named or numbered container port, used to resolve named ports."""

    port: int
    protocol: str  # "TCP" | "UDP" | "SCTP"
    name: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """A workload with addresses: a pod, or a NetBird peer."""

    namespace: str
    name: str
    ips: tuple[IPAddress, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    node: str = ""
    ports: tuple[ContainerPort, ...] = ()
    # Set by a source whose endpoints live behind one known device (NetBird's wt0);
    # None means "find the host-side device from the routing table".
    interface: str | None = None
    # The source's labels did not all validate (`labels` holds the valid ones). Fail
    # closed: every isolation of its namespace selects it, no accept peer matches it.
    labels_invalid: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def named_port(self, name: str, protocol: str) -> int | None:
        for p in self.ports:
            if p.name == name and p.protocol == protocol:
                return p.port
        return None


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    # Labels (or name) did not validate: no namespaceSelector matches it, not even NotIn.
    labels_invalid: bool = False


@dataclass(frozen=True)
class Node:
    """A cluster node: ClusterNetworkPolicy `nodes` egress peers select nodes by labels and
    match their addresses (status.addresses of type InternalIP and ExternalIP)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ips: tuple[IPAddress, ...] = ()
    labels_invalid: bool = False  # matched by no node selector (fail closed)


@dataclass(frozen=True)
class ObjectRef:
    """Where an object came from, for error messages and metric labels."""

    kind: str
    namespace: str
    name: str
    source: str = "file"  # file | kubernetes | netbird
    location: str = ""  # file path, API URL, ...

    def __str__(self) -> str:
        nsname = f"{self.namespace}/{self.name}" if self.namespace else self.name
        nsname = nsname if nsname.isprintable() else repr(nsname)  # no hostile line breaks in logs
        where = f"{self.location}: " if self.location else ""
        return f"{where}{self.kind} {nsname}"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)


@dataclass(frozen=True)
class RawObject:
    """One object as its source delivered it (ref: where from; body: its JSON), for every
    source and kind; admission validates it, semantics read it."""

    ref: ObjectRef
    body: Mapping[str, Any]
    # What admission made of it (e.g. a partially valid NetworkPolicy), so semantics
    # need not parse it again; None: not parsed yet.
    parsed: Any = field(default=None, compare=False)


RawPolicy = RawObject  # a policy's raw object, as Inventory.policies holds it


@dataclass(frozen=True)
class Problem:
    """An invalid object or part: reported; its last good version kept, else read fail-closed."""

    ref: ObjectRef
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.ref}: field {self.field}: {self.message}"


@dataclass
class Inventory:
    """A complete snapshot of the world as one source sees it."""

    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    # Every kind of policy by ObjectRef.key: NetworkPolicy, ClusterNetworkPolicy (namespace
    # ""), AdminNetworkPolicy / BaselineAdminNetworkPolicy (v1alpha1), NetBird policies.
    policies: dict[tuple[str, str, str], RawPolicy] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # Free-form settings a policy language needs (e.g. NetBird's local peer id).
    context: dict[str, Any] = field(default_factory=dict)

    def namespace(self, name: str) -> Namespace:
        """A namespace referenced but never seen exists with only its name label."""
        ns = self.namespaces.get(name)
        if ns is None:
            return Namespace(name, {NAMESPACE_NAME_LABEL: name})
        return ns

    def endpoint_by_ip(self, ip: IPAddress) -> Endpoint | None:
        for ep in self.endpoints.values():
            if ip in ep.ips:
                return ep
        return None
