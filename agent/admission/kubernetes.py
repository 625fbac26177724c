"""Admission: validate raw objects into an Inventory, keeping each object's last good version.

Fail closed. An invalid object is reported (object and field path). Then:
(a) if a version of it validated before (its last good version), that version stays in
    force, as long as it still validates today;
(b) otherwise the object is read fail-closed: its invalid parts match nothing in accept
    rules and everything in deny rules and isolations (see `parse_policy`,
    `parse_cluster_policy`, `parse_pod`, `parse_namespace`, `parse_node`), so it never
    allows more than any valid reading of it would.
Cluster-scoped kinds (ClusterNetworkPolicy, AdminNetworkPolicy, BaselineAdminNetworkPolicy,
Node) are keyed with namespace "" whatever the source's reference says.
One bad object never blocks the others. The store of last good versions can be persisted
(only bodies that validated are written), so a restart, or a one-shot `apply`, admits
exactly what the running agent admitted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from agent.admission.lastgood import LastGood
from agent.inventory import (
    NAMESPACE_NAME_LABEL,
    ContainerPort,
    Endpoint,
    Inventory,
    IPAddress,
    Namespace,
    Node,
    Problem,
    RawPolicy,
)
from agent.policy.cluster import KINDS as CLUSTER_KINDS
from agent.policy.cluster import parse_cluster_policy, unreadable
from agent.policy.errors import Invalid, Partial, is_dns_label, is_dns_subdomain, safe_name, valid_port_name
from agent.policy.kubernetes import API_PROTOCOLS, isolation_only, parse_policy
from agent.policy.kubernetes.incremental import Touched
from agent.policy.selectors import parse_labels
from agent.sources.kubeobjects import RawObject

T = TypeVar("T")
CLUSTER_SCOPED = (*CLUSTER_KINDS, "Node", "Namespace")
KINDS = ("Namespace", "Pod", "Node", "NetworkPolicy", *CLUSTER_KINDS)  # what admission reads
NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")


def _meta(body: Mapping[str, Any], issues: list[Invalid]) -> Mapping[str, Any]:
    meta = body.get("metadata")
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        issues.append(Invalid("metadata", f"must be an object, got {type(meta).__name__}"))
        return {}
    return meta


def _name_and_labels(
    meta: Mapping[str, Any], valid: Callable[[str], bool], what: str, issues: list[Invalid]
) -> tuple[str, bool, dict[str, str], bool]:
    """A cluster-scoped object's name (raises `Invalid` when missing; `valid` judges it,
    `what` names the rule it breaks) and its labels, each with whether it validated."""
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise Invalid("metadata.name", "missing")
    name_ok = valid(name)
    if not name_ok:
        issues.append(Invalid("metadata.name", f"{name!r} is not a {what}"))
    labels, labels_ok = parse_labels(meta.get("labels"), "metadata.labels", issues)
    return name, name_ok, labels, labels_ok


def parse_namespace(body: Mapping[str, Any], issues: list[Invalid]) -> Namespace:
    """The namespace; bad parts are appended to `issues` and read fail-closed.

    A namespace whose name or labels do not validate is kept (its pods and policies still
    work by name) but flagged so that no namespaceSelector matches it. Raises `Invalid`
    only when it has no name at all.
    """
    name, name_ok, labels, labels_ok = _name_and_labels(
        _meta(body, issues), is_dns_label, "DNS-1123 label", issues)
    name = safe_name(name, name_ok)
    labels[NAMESPACE_NAME_LABEL] = name  # the API server always sets it
    return Namespace(name, labels, labels_invalid=not (name_ok and labels_ok))


# Address text -> address (None: not an address). Parsing costs ~10 us, a lookup ~0.1 us;
# a pod's address is read twice (podIP, podIPs) and again on every change to the pod.
_IPS: dict[str, IPAddress | None] = {}
_IPS_MAX = 1 << 17


def _ip(text: Any, field: str) -> IPAddress:
    if type(text) is str:  # (a str subclass could compare equal to a key yet read otherwise)
        ip = _IPS.get(text, False)
        if ip is False:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                ip = None
            if len(_IPS) >= _IPS_MAX:
                _IPS.clear()
            _IPS[text] = ip
        if ip is not None:
            return ip
    raise Invalid(field, f"invalid IP address {text!r}")


# (number, protocol, name) -> the ContainerPort: pods of one workload repeat the same few
# ports; sharing the immutable value skips building and validating it again.
_PORTS: dict[tuple[int, str, str | None], ContainerPort] = {}
_PORTS_MAX = 1 << 14


def _is_map(value: Any) -> bool:
    return type(value) is dict or isinstance(value, Mapping)  # (the ABC check costs ~5x)


def _container_ports(spec: Mapping[str, Any], issues: list[Invalid]) -> tuple[ContainerPort, ...]:
    """Named ports; an invalid entry is left out (a policy naming it then matches nothing)."""
    out = []
    containers = spec.get("containers")
    if containers is None:
        containers = []
    if not isinstance(containers, list):
        issues.append(Invalid("spec.containers", "must be a list"))
        return ()
    for i, c in enumerate(containers):
        ports = c.get("ports") if _is_map(c) else None
        if ports is None:
            continue
        if not isinstance(ports, list):
            issues.append(Invalid(f"spec.containers[{i}].ports", "must be a list"))
            continue
        for j, p in enumerate(ports):
            if not _is_map(p):
                issues.append(Invalid(f"spec.containers[{i}].ports[{j}]", "must be an object"))
                continue
            num, proto, name = p.get("containerPort"), p.get("protocol"), p.get("name")
            if proto is None:
                proto = "TCP"
            # exact types only: a key equal to another of another type (True == 1) is not
            plain = type(num) is int and type(proto) is str and (name is None or type(name) is str)
            known = _PORTS.get((num, proto, name)) if plain else None  # validated before
            if known is not None:
                out.append(known)
                continue
            field = f"spec.containers[{i}].ports[{j}]"
            if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= 65535:
                issues.append(Invalid(f"{field}.containerPort", f"invalid port {num!r}"))
                continue
            if not isinstance(proto, str) or proto not in API_PROTOCOLS:
                issues.append(Invalid(f"{field}.protocol", f"must be TCP, UDP or SCTP, got {proto!r}"))
                continue
            if name is not None and not valid_port_name(name):
                issues.append(Invalid(f"{field}.name", f"invalid port name {name!r}"))
                continue
            port = ContainerPort(num, proto, name or None)
            if plain:
                if len(_PORTS) >= _PORTS_MAX:
                    _PORTS.clear()
                _PORTS[num, proto, name] = port
            out.append(port)
    return tuple(out)


def _section(body: Mapping[str, Any], key: str, issues: list[Invalid]) -> Mapping[str, Any]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        issues.append(Invalid(key, f"must be an object, got {type(value).__name__}"))
        return {}
    return value


def parse_pod(body: Mapping[str, Any], issues: list[Invalid]) -> Endpoint | None:
    """The pod as an endpoint, or None when it is not one (no IP, finished, hostNetwork).

    Bad parts are appended to `issues` and read fail-closed: a pod whose name, namespace
    or labels do not validate stays an endpoint (so it stays isolated), flagged
    `labels_invalid`; a bad name never travels further (see `safe_name`); a bad address
    or container port is left out.
    """
    meta = _meta(body, issues)
    spec = _section(body, "spec", issues)
    status = _section(body, "status", issues)
    name = meta.get("name")
    namespace = str(meta.get("namespace") or "default")  # as ref_of reads it, like policies
    name_ok = is_dns_subdomain(name)
    if not name_ok:
        issues.append(Invalid("metadata.name", "missing" if name in (None, "") else
                              f"{name!r} is not a DNS-1123 subdomain"))
    namespace_ok = is_dns_label(namespace)
    if not namespace_ok:
        issues.append(Invalid("metadata.namespace", f"{namespace!r} is not a DNS-1123 label"))
    labels, labels_ok = parse_labels(meta.get("labels"), "metadata.labels", issues)
    ports = _container_ports(spec, issues)
    host_network = spec.get("hostNetwork")
    if host_network is True:
        return None
    if host_network is not None and host_network is not False:  # unknown: enforced as a pod
        issues.append(Invalid("spec.hostNetwork", f"must be a boolean, got {host_network!r}"))
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    ips: list[IPAddress] = []
    pod_ips = status.get("podIPs")
    if pod_ips is None:
        pod_ips = []
    if not isinstance(pod_ips, list):
        issues.append(Invalid("status.podIPs", "must be a list"))
        pod_ips = []
    for i, entry in enumerate(pod_ips):
        try:
            ip = _ip(entry.get("ip") if isinstance(entry, Mapping) else None, f"status.podIPs[{i}].ip")
        except Invalid as e:
            issues.append(e)
            continue
        if ip not in ips:
            ips.append(ip)
    if status.get("podIP") is not None:
        try:
            primary = _ip(status["podIP"], "status.podIP")
            if primary in ips:
                ips.remove(primary)
            ips.insert(0, primary)  # podIP is the primary address
        except Invalid as e:
            issues.append(e)
    if not ips:
        return None
    return Endpoint(
        namespace=safe_name(namespace, namespace_ok),  # as parse_policy does
        # Unnamed: a stand-in per address set, so two unnamed pods stay two endpoints.
        name=safe_name(name or ("unnamed", tuple(map(str, ips))), name_ok),
        ips=tuple(ips),
        labels=labels,
        node=str(spec.get("nodeName") or ""),
        ports=ports,
        labels_invalid=not (labels_ok and name_ok and namespace_ok),
    )



def _strict(parse: Callable[[Any, list[Invalid]], T], fallback: Callable[[], T]) -> Callable[[Any], T]:
    """A fail-closed parser as admission wants it: the value when valid, else `Partial`.
    A shape no validator foresaw still yields the fail-closed `fallback`."""

    def run(body: Any) -> T:
        issues: list[Invalid] = []
        try:
            value = parse(body, issues)
        except Partial:
            raise
        except Invalid as e:
            raise Partial(fallback(), [*issues, e]) from None
        except (TypeError, AttributeError, ValueError, KeyError) as e:
            raise Partial(fallback(), [*issues, Invalid("(object)", f"malformed: {e}")]) from None
        if issues:
            raise Partial(value, issues)
        return value

    return run


def parse_node(body: Mapping[str, Any], issues: list[Invalid]) -> Node:
    """A Node: its name, labels and addresses (status.addresses of type InternalIP or
    ExternalIP: what a ClusterNetworkPolicy `nodes` peer matches). Labels that do not
    validate leave it matched by no non-empty node selector for certain (a Deny still
    matches it); a bad address is left out."""
    name, name_ok, labels, labels_ok = _name_and_labels(
        _meta(body, issues), is_dns_subdomain, "DNS-1123 subdomain", issues)
    status = _section(body, "status", issues)
    addresses = status.get("addresses")
    if addresses is None:
        addresses = []
    if not isinstance(addresses, list):
        issues.append(Invalid("status.addresses", "must be a list"))
        addresses = []
    ips: list[IPAddress] = []
    for i, entry in enumerate(addresses):
        if not isinstance(entry, Mapping):
            issues.append(Invalid(f"status.addresses[{i}]", "must be an object"))
            continue
        if entry.get("type") not in NODE_ADDRESS_TYPES:
            continue  # Hostname, InternalDNS, ...: not addresses a packet carries
        try:
            ip = _ip(entry.get("address"), f"status.addresses[{i}].address")
        except Invalid as e:
            issues.append(e)
            continue
        if ip not in ips:
            ips.append(ip)
    return Node(safe_name(name, name_ok), labels, tuple(ips), labels_invalid=not (labels_ok and name_ok))


def _cluster_scoped(obj: RawObject) -> RawObject:
    """Cluster-scoped kinds have no namespace, whatever the source's reference says (a
    source that defaults it to "default" must not make two keys for one object)."""
    if obj.ref.kind in CLUSTER_SCOPED and obj.ref.namespace:
        return RawObject(replace(obj.ref, namespace=""), obj.body)
    return obj


def _parse(obj: RawObject) -> Any:
    """One object as admission reads it (see the module docstring): the value, else
    `Partial` (read fail-closed) or `Invalid` (left out)."""
    ref = obj.ref
    if not isinstance(obj.body, Mapping):
        raise Invalid("(object)", "must be an object")
    if ref.kind == "Namespace":
        # Unreadable: kept by name, matched by no namespaceSelector; without a name
        # nothing can refer to it.
        return _strict(parse_namespace, lambda: Namespace(
            safe_name(ref.name, is_dns_label(ref.name)), {}, labels_invalid=True) if ref.name else None,
        )(obj.body)
    if ref.kind == "Pod":
        # A pod that cannot be read has no address we could isolate: left out.
        return _strict(parse_pod, lambda: None)(obj.body)
    if ref.kind == "Node":
        # Unreadable: kept by name with no address and unknown labels.
        return _strict(parse_node, lambda: Node(safe_name(ref.name, is_dns_subdomain(ref.name)), {},
                                                labels_invalid=True) if ref.name else None)(obj.body)
    if ref.kind in CLUSTER_KINDS:
        return _strict(
            lambda body, issues: parse_cluster_policy(RawPolicy(ref, body), issues),
            lambda: unreadable(ref.kind, safe_name(ref.name, is_dns_subdomain(ref.name)), ref.source),
        )(obj.body)
    return _strict(
        lambda body, issues: parse_policy(RawPolicy(ref, body), issues),
        lambda: isolation_only(safe_name(ref.namespace, is_dns_label(ref.namespace)),
                               safe_name(ref.name, is_dns_subdomain(ref.name)), ref.source),
    )(obj.body)


def _placement(inv: Inventory, obj: RawObject, value: Any) -> tuple[dict[Any, Any], Any, Any]:
    """Where an admitted value goes in the Inventory: (table, key, what it holds)."""
    kind = obj.ref.kind
    if kind == "Namespace":
        return inv.namespaces, value.name, value
    if kind == "Pod":
        return inv.endpoints, value.key, value
    if kind == "Node":
        return inv.nodes, value.name, value
    return inv.policies, obj.ref.key, RawPolicy(obj.ref, obj.body, parsed=value)


def kubernetes_inventory(
    objects: Iterable[RawObject], store: LastGood, problems: list[Problem] | None = None
) -> Inventory:
    """Namespaces, Pods, Nodes, NetworkPolicies and the cluster policies (ClusterNetworkPolicy,
    AdminNetworkPolicy, BaselineAdminNetworkPolicy) into an Inventory, invalid objects
    reported and read fail-closed (see the module docstring). Admits every object: the
    reference `KubernetesAdmission` (what the pipelines keep between events) must equal."""
    inv = Inventory(problems=list(problems or []))
    # Kinds no semantics reads (a StatefulSet beside the policies) are not admitted: read as
    # a NetworkPolicy, a spec without podSelector would isolate a whole namespace.
    ours = (_cluster_scoped(o) for o in objects if o.ref.kind in KINDS)
    for obj, value in store.admit(ours, _parse, inv.problems):
        if value is None:
            continue
        table, key, held = _placement(inv, obj, value)
        table[key] = held
    return inv


Key = tuple[str, str, str]


class KubernetesAdmission:
    """Admission kept between events: an event costs what it changed.

    `update(objects, changed)` re-admits only the objects whose keys are in `changed`
    (the source's delta since the previous call; None: every object, as on the first
    call) and edits the Inventory it keeps by their entries; every other object keeps
    its admitted value, its Inventory entry (the same object, so the incremental
    compiler's diff is an identity check) and its problems. The store's state file is
    written only when a kept (valid) body changed. The result equals
    `kubernetes_inventory(objects.values(), store)` (tests/unit/test_incremental.py).
    Two objects that map to one Inventory entry (unnamed pods with equal addresses never
    do: the source keys them apart) keep the one admitted last.
    """

    def __init__(self, store: LastGood) -> None:
        self.store = store
        self._clear()

    def _clear(self) -> None:
        self._inv = Inventory()
        self._delivered: dict[Key, RawObject] = {}  # by the source's key, ours only
        self._placed: dict[Key, tuple[dict[Any, Any], Any, Any]] = {}
        self._problems: dict[Key, tuple[Problem, ...]] = {}
        # The Inventory keys the last update touched, for the incremental compiler's diff
        # (None: unknown, compare everything: a first or complete delivery, or after a failure).
        self.touched: Touched | None = None
        self._touched: dict[int, set[Any]] = {}
        self._fresh = True  # nothing admitted yet: the next update admits every object

    def update(self, objects: Mapping[Key, RawObject], changed: Iterable[Key] | None,
               problems: Iterable[Problem] = ()) -> Inventory:
        """The Inventory of `objects` (by source key) after re-admitting `changed`."""
        self.touched = None
        if self._fresh:
            changed = None
        try:
            inv = self._update(objects, changed, problems)
        except BaseException:
            # Half applied: start afresh (the source's delta is spent), everything admitted
            # again next time (cheap for bodies the store has seen: see LastGood.admit_key).
            self._clear()
            raise
        if changed is not None:
            t = self._touched
            self.touched = Touched(*(frozenset(t.get(id(table), ())) for table in (
                self._inv.endpoints, self._inv.namespaces, self._inv.policies, self._inv.nodes)))
        self._touched = {}
        self._fresh = False
        return inv

    def _update(self, objects: Mapping[Key, RawObject], changed: Iterable[Key] | None,
                problems: Iterable[Problem]) -> Inventory:
        if changed is None:
            keys: Iterable[Key] = set(self._delivered) | set(objects)
        else:
            keys = changed
        for key in keys:
            obj = objects.get(key)
            if obj is not None and obj.ref.kind not in KINDS:
                obj = None  # a kind no semantics reads: never admitted (see kubernetes_inventory)
            was = self._delivered.get(key)
            if obj is was:
                continue
            self._unplace(key)
            if obj is None:
                del self._delivered[key]
                if was is not None:
                    self.store.forget(_cluster_scoped(was).ref)
                continue
            self._delivered[key] = obj
            hit = self.store.admit_key(_cluster_scoped(obj), _parse)
            if hit.problems:
                self._problems[key] = hit.problems
            if hit.entry is not None and hit.entry[1] is not None:
                entry_obj, value = hit.entry
                table, ikey, held = _placement(self._inv, entry_obj, value)
                old = self._inv.policies.get(ikey) if table is self._inv.policies else None
                if old is not None and old.ref == held.ref and old.body is held.body and old.parsed is held.parsed:
                    held = old  # readmitted as it was: the same object for the compiler's diff
                table[ikey] = held
                self._placed[key] = (table, ikey, held)
                self._touched.setdefault(id(table), set()).add(ikey)
        if changed is None:  # a complete delivery: bodies kept for objects gone meanwhile go
            self.store.retain(_cluster_scoped(o).ref for o in self._delivered.values())
        self.store.save()
        inv = self._inv
        out = Inventory(dict(inv.endpoints), dict(inv.namespaces), dict(inv.policies), dict(inv.nodes),
                        problems=list(problems))
        for found in self._problems.values():
            out.problems.extend(found)
        return out

    def _unplace(self, key: Key) -> None:
        self._problems.pop(key, None)
        placed = self._placed.pop(key, None)
        if placed is not None:
            table, ikey, held = placed
            if table.get(ikey) is held:
                del table[ikey]
            self._touched.setdefault(id(table), set()).add(ikey)
