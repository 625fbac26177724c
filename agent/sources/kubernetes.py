"""The Kubernetes API source: cluster-wide list+watch of Namespaces, Pods, NetworkPolicies,
Nodes and the ClusterNetworkPolicy kinds (CNP v1alpha2; AdminNetworkPolicy and
BaselineAdminNetworkPolicy v1alpha1), the last three through their CRDs.

(Over 500 lines: reflector, cache, pod CIDRs and client setup are one source; parts would reach into each other.)

One reflector thread per resource keeps an in-memory cache of trimmed objects:

- a paginated list (`limit` / `continue`) fills the cache and gives a resourceVersion;
  the new cache replaces the old one in one step, so a reader never sees half a list;
- a watch resumes from that resourceVersion with `allowWatchBookmarks`; every event
  updates the cache, bookmarks only advance the resourceVersion;
- 410 Gone (an ERROR event, or an expired `continue` token) means the resourceVersion is
  too old: list again and diff against the cache, which repairs whatever was missed;
- disconnects, cut streams, timeouts and 5xx reconnect with jittered exponential backoff
  from the last resourceVersion that was fully processed;
- every `resync` seconds the list is repeated anyway and diffed against the cache, which
  repairs any drift a buggy watch could have caused;
- a kind served by a CRD that the cluster does not have (404 on list) is "not served":
  logged once at warning level (it is not enforced), counted once (`crd_missing`), its
  cache emptied, and listed again every `crd_retry` seconds, so a CRD installed later is
  picked up. Readiness does not wait for it.

Objects are trimmed to the fields the semantics read (kubeobjects.trim, then the
resourceVersion is dropped too) so memory follows what matters, and an event that
changes nothing the semantics read (a pod's status heartbeat) does not wake the loop.

`read()` is a snapshot of the caches; `watch(on_change)` starts the threads; `synced`
is set once every initial list has answered (with objects, or "not served") and the
node's pod CIDRs, when asked for, are in.
Each change is stamped with the monotonic time it was read off the wire, so the
pipeline can tell the daemon how long an event took to reach the kernel.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.inventory import ObjectRef, Problem
from agent.sources.backoff import Backoff
from agent.sources.kubeobjects import KINDS, RawObject, interned, ref_of, trim

log = logging.getLogger(__name__)

SOURCE = "kubernetes"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Key = tuple[str, str, str]


@dataclass(frozen=True)
class Resource:
    """How to list and watch one kind cluster-wide (and what deploy/base/rbac.yaml grants)."""

    api_version: str
    plural: str  # the resource name (RBAC, URL path)
    api_class: str = "CustomObjectsApi"  # in kubernetes.client
    method: str = "list_cluster_custom_object"

    @property
    def crd(self) -> bool:
        """A custom resource: served only when its CRD is installed."""
        return self.api_class == "CustomObjectsApi"

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]  # "" for the core group


CNP_GROUP = "policy.networking.k8s.io"
RESOURCES: dict[str, Resource] = {
    "Namespace": Resource("v1", "namespaces", "CoreV1Api", "list_namespace"),
    "Pod": Resource("v1", "pods", "CoreV1Api", "list_pod_for_all_namespaces"),
    "NetworkPolicy": Resource("networking.k8s.io/v1", "networkpolicies", "NetworkingV1Api",
                              "list_network_policy_for_all_namespaces"),
    "Node": Resource("v1", "nodes", "CoreV1Api", "list_node"),
    "ClusterNetworkPolicy": Resource(f"{CNP_GROUP}/v1alpha2", "clusternetworkpolicies"),
    "AdminNetworkPolicy": Resource(f"{CNP_GROUP}/v1alpha1", "adminnetworkpolicies"),
    "BaselineAdminNetworkPolicy": Resource(f"{CNP_GROUP}/v1alpha1", "baselineadminnetworkpolicies"),
}


class SourceError(RuntimeError):
    """The API server cannot be reached or configured."""


class Gone(Exception):
    """410: the resourceVersion (or continue token) is too old; list again."""


class WatchError(Exception):
    """An ERROR event other than 410 (the server's Status: code, reason, message)."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        self.code = status.get("code")
        super().__init__(f"{status.get('code')} {status.get('reason')}: {status.get('message')}")


@dataclass(frozen=True)
class Observed:
    """One change to the cache, stamped when it was read off the wire (time.monotonic())."""

    ref: ObjectRef
    type: str  # ADDED | MODIFIED | DELETED (watch) or LIST (found by a list / relist)
    at: float
    new_ips: tuple[str, ...] = ()  # pod IPs this pod did not have before (start-up window)


def api_client(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """An ApiClient: --kubeconfig, else $KUBECONFIG, else in-cluster, else ~/.kube/config.

    urllib3's own retries are off: every retry goes through our jittered backoff.
    """
    from kubernetes import client, config

    cfg = client.Configuration()
    env = os.environ.get("KUBECONFIG")
    default = Path("~/.kube/config").expanduser()
    try:
        if kubeconfig or env:
            # A colon-separated $KUBECONFIG is merged, as kubectl does.
            config.load_kube_config(config_file=kubeconfig or env, context=context,
                                    client_configuration=cfg, persist_config=False)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)  # refreshes rotated tokens
        elif default.exists():
            config.load_kube_config(config_file=str(default), context=context, client_configuration=cfg,
                                    persist_config=False)
        else:
            raise SourceError("no kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) "
                              "and not running in a cluster ($KUBERNETES_SERVICE_HOST unset)")
    except config.ConfigException as e:
        raise SourceError(f"kubernetes client configuration: {e}") from e
    cfg.retries = False
    return client.ApiClient(cfg)


def _pod_ips(body: Mapping[str, Any] | None) -> set[str]:
    if not body:
        return set()
    status = body.get("status") or {}
    ips = {str(p.get("ip")) for p in status.get("podIPs") or [] if isinstance(p, Mapping) and p.get("ip")}
    if status.get("podIP"):
        ips.add(str(status["podIP"]))
    return ips


class KubernetesSource:
    """List+watch of every kind the Kubernetes semantics read (kubeobjects.KINDS), cluster-wide."""

    name = SOURCE

    def __init__(
        self,
        client: Any = None,
        *,
        kubeconfig: str | None = None,
        node: str | None = None,
        pod_cidrs: list[str] | None = None,
        want_pod_cidrs: bool = False,
        page_size: int = 500,
        resync: float = 300.0,
        watch_timeout: int = 300,
        connect_timeout: float = 10.0,
        read_slack: float = 30.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_observed: int = 10000,
        crd_retry: float = 60.0,
    ) -> None:
        self._client = client
        self._kubeconfig = kubeconfig
        self.node = node
        self.page_size = page_size
        self.resync = resync
        self.watch_timeout = watch_timeout
        self.connect_timeout = connect_timeout
        self.read_slack = read_slack  # client read timeout beyond the server's timeoutSeconds
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.crd_retry = crd_retry  # how often a kind whose CRD is missing is listed again

        self.synced = threading.Event()  # all initial lists in (and pod CIDRs, if wanted)
        self.listed = {k: threading.Event() for k in KINDS}  # listed, or known not served
        self.unserved: set[str] = set()  # kinds whose CRD the cluster does not have (404)
        self.stats: collections.Counter[tuple[str, str]] = collections.Counter()
        # Faults by cause, for stockade_source_errors{cause} (read by the daemon at scrape time).
        self.errors: collections.Counter[str] = collections.Counter()

        self._lock = threading.Lock()
        self._objects: dict[str, dict[Key, RawObject]] = {k: {} for k in KINDS}
        self._rv: dict[str, str | None] = dict.fromkeys(KINDS)
        self._observed: collections.deque[Observed] = collections.deque(maxlen=max_observed)
        self._ever_seen_ips: dict[Key, tuple[str, ...]] = {}
        # Keys changed since the last read_changes (None: never read; every key is new).
        self._changed: set[Key] | None = None
        self._on_change: Callable[[], None] | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: dict[str, Any] = {}
        self.watching = False

        # Pod CIDRs of this node, for --unknown-endpoints=deny: from a flag, or node.spec.podCIDRs.
        self.pod_cidrs: tuple[IPNetwork, ...] | None = None
        if pod_cidrs:
            self.pod_cidrs = tuple(ipaddress.ip_network(c, strict=False) for c in pod_cidrs)
        self._want_node = want_pod_cidrs and self.pod_cidrs is None
        if self._want_node and not node:
            raise SourceError("the node's pod CIDRs need the node name (--node or $NODE_NAME) or --pod-cidr")

    # ------------------------------------------------------------------ reading

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = api_client(self._kubeconfig)
        return self._client

    def resource_version(self, kind: str) -> str | None:
        return self._rv[kind]

    def read(self) -> tuple[list[RawObject], list[Problem]]:
        """A snapshot of the caches (every kind in KINDS), sorted by key."""
        objects, problems, _ = self._snapshot(drain=False)
        return objects, problems

    def read_with_events(self) -> tuple[list[RawObject], list[Problem], list[Observed]]:
        """As read(), plus (atomically) every change observed since the previous call."""
        return self._snapshot(drain=True)

    def read_changes(self) -> tuple[dict[Key, RawObject], set[Key] | None, list[Observed]]:
        """Every object by key, the keys changed since the previous call (None: every key,
        on the first call) and (as read_with_events) the changes observed, atomically. An
        unchanged object is the same RawObject as before: a call costs what changed."""
        with self._lock:
            objects: dict[Key, RawObject] = {}
            for k in KINDS:
                objects.update(self._objects[k])
            changed, self._changed = self._changed, set()
            events = list(self._observed)
            self._observed.clear()
        return objects, changed, events

    def _snapshot(self, drain: bool) -> tuple[list[RawObject], list[Problem], list[Observed]]:
        with self._lock:
            objects = [o for k in KINDS for _, o in sorted(self._objects[k].items())]
            events: list[Observed] = []
            if drain:
                events = list(self._observed)
                self._observed.clear()
        return objects, [], events

    def sync(self, timeout: float = 30.0) -> None:
        """List everything once, without watching (one-shot commands); retries with backoff."""
        deadline = time.monotonic() + timeout
        self._fetch_pod_cidrs_once(deadline)
        for kind in KINDS:
            backoff = Backoff(self.backoff_base, self.backoff_cap)
            while True:
                try:
                    self._list(kind)
                    break
                except Exception as e:
                    delay = backoff.next()
                    if time.monotonic() + delay > deadline:
                        raise SourceError(f"cannot list {kind}s: {_describe(e)}") from e
                    log.warning("listing %ss failed (%s); retrying in %.1fs", kind, _describe(e), delay)
                    time.sleep(delay)

    # ------------------------------------------------------------------ watching

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        """Start one list+watch thread per kind; `on_change` is called for each change."""
        self._on_change = on_change
        self._stopping.clear()
        self.watching = True
        self.client  # noqa: B018 - configuration errors surface here, in the caller's thread
        targets: list[tuple[str, Callable[[], None]]] = [
            (f"k8s-{k.lower()}", lambda k=k: self._reflect(k)) for k in KINDS
        ]
        if self._want_node:
            targets.append(("k8s-node", self._node_loop))
        for name, target in targets:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

        def stop() -> None:
            self._stopping.set()
            for resp in list(self._responses.values()):
                _abort(resp)
            for t in self._threads:
                t.join(timeout=5)
            self._threads.clear()
            self.watching = False

        return stop

    def _reflect(self, kind: str) -> None:
        backoff = Backoff(self.backoff_base, self.backoff_cap)
        need_list = True
        last_list = 0.0
        gone_streak = 0  # 410s in a row without a watch that made progress
        while not self._stopping.is_set():
            try:
                if need_list or time.monotonic() - last_list >= self.resync:
                    if not need_list:
                        self.stats[(kind, "resyncs")] += 1
                    self._list(kind)
                    last_list = time.monotonic()
                    need_list = False
                if kind in self.unserved:  # no CRD: nothing to watch; ask again later
                    self._stopping.wait(self.crd_retry)
                    need_list = True
                    continue
                started = time.monotonic()
                events = self._watch(kind, until=last_list + self.resync)
                if events:
                    backoff.reset()
                    gone_streak = 0
                elif time.monotonic() - started < 1.0 and not self._stopping.is_set():
                    # The server ended an empty watch at once: do not spin on it.
                    self._stopping.wait(backoff.next())
            except Gone:
                self.stats[(kind, "gone")] += 1
                self.errors["watch_expired"] += 1
                log.info("%s watch: resourceVersion %s expired (410 Gone); listing again",
                         kind, self._rv[kind])
                need_list = True
                if gone_streak:  # 410 again right after a relist: slow down
                    self._stopping.wait(backoff.next())
                gone_streak += 1
            except Exception as e:
                if self._stopping.is_set():
                    break
                self.stats[(kind, "errors")] += 1
                self.errors[_cause(e, "list" if need_list else "watch")] += 1
                delay = backoff.next()
                level = logging.WARNING if backoff.failures > 1 else logging.INFO
                log.log(level, "%s %s failed (%s); reconnecting from resourceVersion %s in %.2fs", kind,
                        "list" if need_list else "watch", _describe(e), self._rv[kind], delay)
                if not isinstance(e, _retry_same_rv()) or (_status(e) == 404 and RESOURCES[kind].crd):
                    # An unexpected failure: the cache may have missed something. A 404 on a
                    # CRD's watch: the CRD went away; the list says so (not served).
                    need_list = True
                self._stopping.wait(delay)

    def _lister(self, kind: str) -> Callable[..., Any]:
        from kubernetes import client

        res = RESOURCES[kind]
        method = getattr(getattr(client, res.api_class)(self.client), res.method)
        if res.crd:
            return functools.partial(method, res.group, res.api_version.rpartition("/")[2], res.plural)
        return method

    def _raw(self, kind: str, obj: Mapping[str, Any]) -> RawObject:
        body = trim({**obj, "kind": kind, "apiVersion": RESOURCES[kind].api_version})  # list items carry neither
        body["metadata"].pop("resourceVersion", None)  # changes on every write; semantics ignore it
        body = interned(body)  # kept until the object changes: share its repeated strings
        return RawObject(ref_of(body, SOURCE), body)

    def _list(self, kind: str) -> None:
        """Paginated list; replaces the cache in one step and records what changed."""
        fn = self._lister(kind)
        restarts = 0
        while True:
            items: dict[Key, RawObject] = {}
            token: str | None = None
            rv: str | None = None
            pages = 0
            try:
                while True:
                    kwargs: dict[str, Any] = {"limit": self.page_size}
                    if token:
                        kwargs["_continue"] = token
                    resp = fn(**kwargs, _preload_content=False,
                              _request_timeout=(self.connect_timeout, self.connect_timeout + self.read_slack))
                    try:
                        data = json.loads(resp.data)
                    finally:
                        resp.release_conn()
                    pages += 1
                    for item in data.get("items") or []:
                        if isinstance(item, Mapping):
                            obj = self._raw(kind, item)
                            items[obj.ref.key] = obj
                    meta = data.get("metadata") or {}
                    rv = meta.get("resourceVersion") or rv
                    token = meta.get("continue") or None
                    if not token or self._stopping.is_set():
                        break
            except Exception as e:
                if _status(e) == 404 and RESOURCES[kind].crd:
                    self._not_served(kind)
                    return
                if token and _status(e) == 410 and restarts < 3:
                    restarts += 1  # the continue token expired mid-list: start over, consistently
                    self.stats[(kind, "list_restarts")] += 1
                    self.errors["continue_expired"] += 1
                    log.info("%s list: continue token expired (410); listing again from the start", kind)
                    continue
                raise
            break
        if self._stopping.is_set() and token:
            return
        now = time.monotonic()
        with self._lock:
            old = self._objects[kind]
            changed = []
            for k, o in items.items():
                was = old.get(k)
                if was is None or was.body != o.body:
                    changed.append(k)
                else:
                    items[k] = was  # unchanged: the same object as before (admission's identity check)
            removed = [k for k in old if k not in items]
            self._objects[kind] = items
            self._rv[kind] = rv
            for k in changed:
                self._stamp("LIST", items[k], old.get(k), now)
            for k in removed:
                self._stamp("DELETED", old[k], old[k], now)
        if kind in self.unserved:
            self.unserved.discard(kind)
            log.info("%s is served now (its CRD was installed): enforcing %d of them", kind, len(items))
        self.stats[(kind, "lists")] += 1
        self.stats[(kind, "list_pages")] += pages
        log.debug("listed %d %ss in %d pages at resourceVersion %s (%d changed, %d gone)",
                  len(items), kind, pages, rv, len(changed), len(removed))
        self.listed[kind].set()
        self._check_synced()
        if (changed or removed) and self._on_change:
            self._on_change()

    def _not_served(self, kind: str) -> None:
        """404 listing a CRD's kind: the cluster has no such resource. Nothing of that kind
        exists (deleting a CRD deletes its objects), so the cache empties; said once."""
        now = time.monotonic()
        with self._lock:
            old = self._objects[kind]
            self._objects[kind] = {}
            self._rv[kind] = None
            for obj in old.values():
                self._stamp("DELETED", obj, obj, now)
        if kind not in self.unserved:
            self.unserved.add(kind)
            self.errors["crd_missing"] += 1
            log.warning("%s (%s/%s) is not served by this cluster (CRD not installed): none are "
                        "enforced; asking again every %.0fs", kind, RESOURCES[kind].api_version,
                        RESOURCES[kind].plural, self.crd_retry)
        self.stats[(kind, "not_served")] += 1
        self.listed[kind].set()
        self._check_synced()
        if old and self._on_change:
            self._on_change()

    def _watch(self, kind: str, until: float) -> int:
        """One watch request, until the server ends it or the next resync; returns events seen."""
        from kubernetes.watch.watch import iter_resp_lines

        timeout = max(1, int(min(self.watch_timeout, until - time.monotonic())))
        resp = self._lister(kind)(
            watch=True, resource_version=self._rv[kind], allow_watch_bookmarks=True,
            timeout_seconds=timeout, _preload_content=False,
            _request_timeout=(self.connect_timeout, timeout + self.read_slack),
        )
        self._responses[kind] = resp
        self.stats[(kind, "watches")] += 1
        seen = 0
        try:
            if self._stopping.is_set():  # stop() ran before it could see this response
                return seen
            for line in iter_resp_lines(resp):
                if self._stopping.is_set():
                    break
                if line.strip():
                    self._event(kind, json.loads(line))
                    seen += 1
        finally:
            self._responses.pop(kind, None)
            resp.release_conn()
        return seen

    def _event(self, kind: str, event: Mapping[str, Any]) -> None:
        now = time.monotonic()
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message"))
            raise WatchError(obj)
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype == "BOOKMARK":
            self.stats[(kind, "bookmarks")] += 1
            if rv:
                self._rv[kind] = rv
            return
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            log.debug("%s watch: ignoring event type %r", kind, etype)
            return
        raw = self._raw(kind, obj)
        with self._lock:
            cache = self._objects[kind]
            old = cache.get(raw.ref.key)
            if etype == "DELETED":
                changed = cache.pop(raw.ref.key, None) is not None
            else:
                changed = old is None or old.body != raw.body
                if changed:  # else the object stays the same one
                    cache[raw.ref.key] = raw
            if rv:
                self._rv[kind] = rv
            if changed:
                self._stamp(etype, raw, old, now)
        self.stats[(kind, "events")] += 1
        if changed and self._on_change:
            self._on_change()

    def _stamp(self, etype: str, obj: RawObject, old: RawObject | None, at: float) -> None:
        """Record a change (under the lock); remember pod IPs to spot a pod's first address."""
        new_ips: tuple[str, ...] = ()
        if obj.ref.kind == "Pod":
            if etype == "DELETED":
                self._ever_seen_ips.pop(obj.ref.key, None)
            else:
                key = obj.ref.key
                seen = self._ever_seen_ips.get(key, ())
                new_ips = tuple(sorted(_pod_ips(obj.body).difference(seen)))
                if new_ips:  # a tuple, not a set: a pod has one or two addresses (56 bytes, not 216)
                    self._ever_seen_ips[key] = (*seen, *new_ips)
        self._observed.append(Observed(obj.ref, etype, at, new_ips))
        if self._changed is not None:
            self._changed.add(obj.ref.key)

    # ------------------------------------------------------------------ node

    def _node_loop(self) -> None:
        backoff = Backoff(self.backoff_base, self.backoff_cap)
        while not self._stopping.is_set() and self.pod_cidrs is None:
            try:
                if self._fetch_pod_cidrs():
                    break
                delay = backoff.next()
                log.info("node %s has no spec.podCIDRs yet; asking again in %.1fs", self.node, delay)
            except Exception as e:
                delay = backoff.next()
                log.warning("reading node %s failed (%s); retrying in %.1fs", self.node, _describe(e), delay)
            self._stopping.wait(delay)

    def _fetch_pod_cidrs_once(self, deadline: float) -> None:
        backoff = Backoff(self.backoff_base, self.backoff_cap)
        while self._want_node and self.pod_cidrs is None:
            try:
                if self._fetch_pod_cidrs():
                    return
                reason = "no spec.podCIDRs"
            except Exception as e:
                reason = _describe(e)
            delay = backoff.next()
            if time.monotonic() + delay > deadline:
                raise SourceError(f"cannot read pod CIDRs of node {self.node}: {reason}")
            time.sleep(delay)

    def _fetch_pod_cidrs(self) -> bool:
        from kubernetes import client

        resp = client.CoreV1Api(self.client).read_node(
            self.node, _preload_content=False, _request_timeout=(self.connect_timeout, self.read_slack))
        try:
            spec = json.loads(resp.data).get("spec") or {}
        finally:
            resp.release_conn()
        cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
        if not cidrs:
            return False
        self.pod_cidrs = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        log.info("node %s pod CIDRs: %s", self.node, ", ".join(map(str, self.pod_cidrs)))
        self._check_synced()
        if self._on_change:
            self._on_change()
        return True

    def _check_synced(self) -> None:
        if all(e.is_set() for e in self.listed.values()) and (not self._want_node or self.pod_cidrs):
            if not self.synced.is_set():
                log.info("initial lists complete: %s", ", ".join(
                    f"{k}s not served" if k in self.unserved else f"{len(self._objects[k])} {k}s" for k in KINDS))
            self.synced.set()


def _status(e: BaseException) -> int | None:
    status = getattr(e, "status", None)
    return status if isinstance(status, int) else None


def _cause(e: BaseException, what: str) -> str:
    """A short, bounded label for a failure: list_http_5xx, watch_disconnected, ..."""
    status = _status(e)
    if status is not None:
        return f"{what}_http_{status // 100}xx"
    if isinstance(e, WatchError):
        return f"{what}_error_event"
    if isinstance(e, json.JSONDecodeError):
        return f"{what}_bad_json"
    name = type(e).__name__
    if "Timeout" in name:
        return f"{what}_timeout"
    return f"{what}_disconnected"


def _describe(e: BaseException) -> str:
    status = _status(e)
    if status is not None:
        return f"HTTP {status} {getattr(e, 'reason', '') or ''}".strip()
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _abort(resp: Any) -> None:
    """Unblock a thread reading a watch stream (used by stop())."""
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        else:
            resp.shutdown()  # urllib3 >= 2.3
    except Exception:  # already closed or released
        pass


def _retry_same_rv() -> tuple[type[BaseException], ...]:
    """Failures after which the watch resumes from the same resourceVersion."""
    import urllib3.exceptions
    from kubernetes.client.exceptions import ApiException

    return (ApiException, WatchError, urllib3.exceptions.HTTPError, OSError, json.JSONDecodeError)

