"""A fake Kubernetes API server speaking the real list/watch protocol over HTTP/1.1.

Serves Namespaces, Pods, networking.k8s.io/v1 NetworkPolicies, Nodes (also by name) and
the policy.networking.k8s.io custom resources (ClusterNetworkPolicy v1alpha2,
AdminNetworkPolicy and BaselineAdminNetworkPolicy v1alpha1) cluster-wide, on 127.0.0.1
(stdlib ThreadingHTTPServer):

- lists honour `limit` / `continue` (a consistent snapshot per continue chain) and
  carry `metadata.resourceVersion`;
- `?watch=true` streams chunked JSON event lines (ADDED, MODIFIED, DELETED, BOOKMARK
  when `allowWatchBookmarks=true`, ERROR) from `resourceVersion` on, and ends after
  `timeoutSeconds`;
- faults on demand: 5xx (or any status) for the next N matching requests, slow
  responses, watches cut in the middle of an event line, 410 Gone as an ERROR event
  on open watches and for watches from a compacted resourceVersion, expired
  continue tokens (HTTP 410), changes that no watch is told about (drift);
- CRDs can be uninstalled (`uninstall_crd`: its objects are deleted, open watches end,
  list and watch answer 404 as a real server does for an unknown resource) and installed
  again (`install_crd`).

Every request is recorded (time, path, query, headers) for assertions.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

CNP = "policy.networking.k8s.io"
PATHS = {
    "/api/v1/namespaces": "Namespace",
    "/api/v1/pods": "Pod",
    "/apis/networking.k8s.io/v1/networkpolicies": "NetworkPolicy",
    "/api/v1/nodes": "Node",
    f"/apis/{CNP}/v1alpha2/clusternetworkpolicies": "ClusterNetworkPolicy",
    f"/apis/{CNP}/v1alpha1/adminnetworkpolicies": "AdminNetworkPolicy",
    f"/apis/{CNP}/v1alpha1/baselineadminnetworkpolicies": "BaselineAdminNetworkPolicy",
}
API_VERSION = {"Namespace": "v1", "Pod": "v1", "NetworkPolicy": "networking.k8s.io/v1", "Node": "v1",
               "ClusterNetworkPolicy": f"{CNP}/v1alpha2", "AdminNetworkPolicy": f"{CNP}/v1alpha1",
               "BaselineAdminNetworkPolicy": f"{CNP}/v1alpha1"}
CRDS = ("ClusterNetworkPolicy", "AdminNetworkPolicy", "BaselineAdminNetworkPolicy")  # kinds a CRD serves
CLUSTER_SCOPED = {"Namespace", "Node", *CRDS}
TOKEN = "fake-token"


def key_of(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj["metadata"]
    ns = "" if obj["kind"] in CLUSTER_SCOPED else meta.get("namespace", "default")
    return (ns, meta["name"])


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


@dataclass
class Request:
    at: float
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]

    @property
    def kind(self) -> str | None:
        return PATHS.get(self.path)

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1", "True")

    @property
    def verb(self) -> str:
        """The RBAC verb this request needs."""
        return "watch" if self.watch else "list" if self.path in PATHS else "get"

    @property
    def resource(self) -> tuple[str, str]:
        """(API group, resource): /api/v1/<resource>[/name] or /apis/<group>/<version>/<resource>[/name]."""
        parts = self.path.strip("/").split("/")
        return ("", parts[2]) if parts[0] == "api" else (parts[1], parts[3])


@dataclass
class Fault:
    match: Callable[[Request], bool]
    times: int
    status: int = 500
    delay: float = 0.0  # slow response: sleep this long first (then answer normally if status == 0)


@dataclass
class FakeKubeAPI:
    rv: int = 1000
    objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = field(
        default_factory=lambda: {k: {} for k in PATHS.values()})
    missing: set[str] = field(default_factory=set)  # CRD kinds not installed: 404
    # (rv, kind, type, object) in rv order; watches replay from here.
    log: list[tuple[int, str, str, dict[str, Any]]] = field(default_factory=list)
    compacted: dict[str, int] = field(default_factory=dict)  # watch from rv below: 410
    requests: list[Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    expire_continue: int = 0  # the next N continue tokens presented get an HTTP 410
    hang_watches: int = 0  # the next N watches never end by themselves (a dead connection)
    noise: bool = True  # add managedFields, annotations, uid... as a real server does

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self._snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._tokens = itertools.count(1)
        self._cut_gen = 0  # bump: every open watch cuts its stream mid-event
        self._gone_gen = 0  # bump: every open watch gets an ERROR 410 and ends
        self.open_watches = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api._serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-kube-api", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeKubeAPI:
        self.thread.start()
        return self

    def close(self) -> None:
        with self.cond:
            self._cut_gen += 1
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "agent", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
        }))
        return path

    # ------------------------------------------------------------------ state changes

    def _decorate(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", API_VERSION[obj["kind"]])
        meta = obj.setdefault("metadata", {})
        if obj["kind"] not in CLUSTER_SCOPED:
            meta.setdefault("namespace", "default")
        if self.noise:
            meta.setdefault("uid", f"uid-{meta['name']}")
            meta.setdefault("creationTimestamp", "2024-01-01T00:00:00Z")
            meta.setdefault("annotations", {}).setdefault(
                "kubectl.kubernetes.io/last-applied-configuration", json.dumps(obj))
            meta.setdefault("managedFields", [{"manager": "kubectl", "operation": "Update",
                                               "fieldsV1": {"f:metadata": {}}}])
            if obj["kind"] in ("Pod", "Node"):
                st = obj.setdefault("status", {})
                st.setdefault("conditions", [{"type": "Ready", "status": "True"}])
                if obj["kind"] == "Pod":
                    st.setdefault("hostIP", "192.0.2.1")
                else:
                    st.setdefault("nodeInfo", {"kubeletVersion": "v1.35.0"})
            if obj["kind"] in CRDS:
                obj.setdefault("status", {"conditions": [{"type": "Accepted", "status": "True"}]})
        return obj

    def put(self, obj: dict[str, Any], silent: bool = False) -> int:
        """Create or replace an object; its watch event unless `silent` (drift)."""
        with self.cond:
            obj = self._decorate(obj)
            kind = obj["kind"]
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            key = key_of(obj)
            etype = "MODIFIED" if key in self.objects[kind] else "ADDED"
            self.objects[kind][key] = obj
            if not silent:
                self.log.append((self.rv, kind, etype, copy.deepcopy(obj)))
            self.cond.notify_all()
            return self.rv

    def delete(self, kind: str, ns: str, name: str, silent: bool = False) -> int:
        with self.cond:
            obj = self.objects[kind].pop((ns, name))
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            if not silent:
                self.log.append((self.rv, kind, "DELETED", obj))
            self.cond.notify_all()
            return self.rv

    def uninstall_crd(self, kind: str) -> None:
        """Delete the CRD of `kind`: its objects go (DELETED events), then 404 for it."""
        with self.cond:
            for key in list(self.objects[kind]):
                self.delete(kind, *key)
            self.missing.add(kind)
            self.cond.notify_all()

    def install_crd(self, kind: str) -> None:
        with self.cond:
            self.missing.discard(kind)
            self.cond.notify_all()

    def set_state(self, objects: list[dict[str, Any]]) -> None:
        """Make the stored objects exactly `objects` (events for what differs)."""
        want: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in PATHS.values()}
        for o in objects:
            want[o["kind"]][key_of({**o, "metadata": {**o["metadata"]}})] = o
        for kind, objs in want.items():
            for key in list(self.objects[kind]):
                if key not in objs:
                    self.delete(kind, *key)
            for key, o in objs.items():
                cur = self.objects[kind].get(key)
                if cur is None or _strip(cur) != _strip(self._decorate(o)):
                    self.put(o)

    def bookmark(self) -> int:
        """A BOOKMARK at the current resourceVersion to every open watch (that asked)."""
        with self.cond:
            self.rv += 1
            for kind in PATHS.values():
                self.log.append((self.rv, kind, "BOOKMARK", {
                    "kind": kind, "apiVersion": API_VERSION[kind],
                    "metadata": {"resourceVersion": str(self.rv)}}))
            self.cond.notify_all()
            return self.rv

    def compact(self, gone: bool = True) -> None:
        """Forget history: watches from before now get 410; open ones get an ERROR 410 if `gone`."""
        with self.cond:
            for kind in PATHS.values():
                self.compacted[kind] = self.rv
            self.log.clear()
            if gone:
                self._gone_gen += 1
            self.cond.notify_all()

    def cut_watches(self) -> None:
        """Every open watch writes half an event line and drops the connection."""
        with self.cond:
            self._cut_gen += 1
            self.cond.notify_all()

    def fail(self, match: Callable[[Request], bool], times: int = 1, status: int = 500,
             delay: float = 0.0) -> None:
        with self.cond:
            self.faults.append(Fault(match, times, status, delay))

    def watches(self, kind: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.watch and (kind is None or r.kind == kind)]

    def lists(self, kind: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.kind and not r.watch and (kind is None or r.kind == kind)]

    # ------------------------------------------------------------------ HTTP

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        req = Request(time.monotonic(), "GET", url.path, query, {k.lower(): v for k, v in h.headers.items()})
        with self.cond:
            self.requests.append(req)
            fault = next((f for f in self.faults if f.times > 0 and f.match(req)), None)
            if fault:
                fault.times -= 1
        if h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._json(h, 401, status(401, "Unauthorized", "Unauthorized"))
        if fault:
            time.sleep(fault.delay)
            if fault.status:
                return self._json(h, fault.status, status(fault.status, "InternalError", "injected fault"))
        if url.path.startswith("/api/v1/nodes/"):
            with self.cond:
                node = copy.deepcopy(self.objects["Node"].get(("", url.path.rsplit("/", 1)[1])))
            if node is None:
                return self._json(h, 404, status(404, "NotFound", "node not found"))
            return self._json(h, 200, node)
        kind = PATHS.get(url.path)
        if kind is None or kind in self.missing:  # what a server says for a resource it does not serve
            return self._json(h, 404, status(404, "NotFound", "the server could not find the requested resource"))
        if req.watch:
            return self._watch(h, kind, query)
        return self._list(h, kind, query)

    def _json(self, h: BaseHTTPRequestHandler, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _list(self, h: BaseHTTPRequestHandler, kind: str, query: dict[str, str]) -> None:
        limit = int(query.get("limit") or 0)
        token = query.get("continue")
        with self.cond:
            if token:
                if self.expire_continue > 0 or token not in self._snapshots:
                    self.expire_continue = max(0, self.expire_continue - 1)
                    return self._json(h, 410, status(
                        410, "Expired", "The provided continue parameter is too old to display a "
                        "consistent list result. You can start a new list without the continue parameter."))
                rv, items = self._snapshots.pop(token)
            else:
                rv = self.rv
                items = [copy.deepcopy(o) for _, o in sorted(self.objects[kind].items())]
            page, rest = (items[:limit], items[limit:]) if limit else (items, [])
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if rest:
                nxt = f"{kind}-{next(self._tokens)}"
                self._snapshots[nxt] = (rv, rest)
                meta["continue"] = nxt
                meta["remainingItemCount"] = len(rest)
        for o in page:  # lists carry no kind/apiVersion per item, like the real server
            o.pop("kind", None)
            o.pop("apiVersion", None)
        self._json(h, 200, {"kind": f"{kind}List", "apiVersion": API_VERSION[kind], "metadata": meta,
                            "items": page})

    def _watch(self, h: BaseHTTPRequestHandler, kind: str, query: dict[str, str]) -> None:
        start_rv = int(query.get("resourceVersion") or 0)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1", "True")
        timeout = float(query.get("timeoutSeconds") or 1800)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(data: bytes) -> None:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        def send(etype: str, obj: dict[str, Any]) -> None:
            chunk(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

        with self.cond:
            hang = self.hang_watches > 0
            self.hang_watches = max(0, self.hang_watches - 1)
            cut_gen, gone_gen = self._cut_gen, self._gone_gen
            self.open_watches += 1
        deadline = time.monotonic() + (3600 if hang else timeout)
        sent = start_rv
        try:
            if start_rv < self.compacted.get(kind, 0):
                send("ERROR", status(410, "Expired", f"too old resource version: {start_rv}"))
                return self._end(h)
            while True:
                with self.cond:
                    pending = [e for e in self.log if e[0] > sent and e[1] == kind]
                    cut = self._cut_gen != cut_gen
                    gone = self._gone_gen != gone_gen
                    uninstalled = kind in self.missing
                    left = deadline - time.monotonic()
                    if not (pending or cut or gone or uninstalled) and left > 0:
                        self.cond.wait(min(left, 0.5))
                        continue
                if cut:
                    if hang:
                        pass  # a dead connection: say nothing, just go away
                    else:  # half an event, then the connection drops without the last chunk
                        chunk(b'{"type": "MODIFIED", "object": {"kind": "' + kind.encode())
                    h.close_connection = True
                    h.wfile.flush()
                    h.connection.shutdown(2)
                    return
                if gone:
                    send("ERROR", status(410, "Expired", "The resourceVersion for the provided watch "
                                         "is too old."))
                    return self._end(h)
                if (left <= 0 or uninstalled) and not pending:
                    return self._end(h)  # a CRD's deletion ends its watches after their last events
                for rv, _, etype, obj in pending:
                    sent = rv
                    if etype == "BOOKMARK" and not bookmarks:
                        continue
                    send(etype, obj)
        except (BrokenPipeError, ConnectionResetError, OSError):
            h.close_connection = True
        finally:
            with self.cond:
                self.open_watches -= 1

    @staticmethod
    def _end(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()


def _strip(obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["metadata"].pop("resourceVersion", None)
    return out
