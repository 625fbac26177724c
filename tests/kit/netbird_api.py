"""A NetBird management-API server for tests: the seed's response shapes, token checks,
and faults on demand (5xx, garbage, slow answers, redirects, 403, a restricted token).

Shared by the source tests (tests/unit/test_netbird_source.py) and the packet
tests (tests/integration/test_netbird_packets.py), which serve it inside a lab namespace.
"""

from __future__ import annotations

import contextlib
import copy
import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.kit.netns import call_in

TOKEN = "nbp_FullAccessTokenForTheTest0123456789"
RESTRICTED = "nbp_RestrictedTokenSeesTwoPeers987654321"
LOCAL, A, B = "100.64.0.1", "100.64.0.2", "100.64.0.3"

DEVS = {"id": "ch8i4ug6lnn4g9hqv7m0", "name": "devs", "peers_count": 2, "issued": "api"}
ALL = {"id": "ch8i4ug6lnn4g9hqv7a1", "name": "All", "peers_count": 3, "issued": "integration"}


def peer(pid: str, name: str, ip: str, version: str = "0.77.1", **kw: Any) -> dict[str, Any]:
    return {"id": pid, "name": name, "ip": ip, "connected": True, "os": "Linux", "version": version,
            "kernel_version": "6.1", "groups": [], "hostname": name, "dns_label": name,
            "country_code": "DE", "city_name": "Berlin", "login_expired": False, **kw}


def account() -> dict[str, Any]:
    return {
        "policies": [
            # The seed's example, verbatim shape: ports as strings plus port_ranges, a
            # posture check, bidirectional devs <-> devs.
            {
                "id": "ch8i4ug6lnn4g9hqv7mg",
                "name": "ch8i4ug6lnn4g9hqv7mg",
                "description": "This is a default policy that allows connections between all the resources",
                "enabled": True,
                "source_posture_checks": ["chacdk86lnnboviihd70"],
                "rules": [{
                    "id": "ch8i4ug6lnn4g9hqv7mg", "name": "Default",
                    "description": "This is a default rule that allows connections between all the resources",
                    "enabled": True, "action": "accept", "bidirectional": True, "protocol": "tcp",
                    "ports": ["80"], "port_ranges": [{"start": 80, "end": 320}],
                    "sources": [DEVS], "destinations": [DEVS],
                }],
            },
            # NetBird issue #3583: multi-rule policy, rule ids == policy id, later rule
            # comes back with sources: null; null lists elsewhere.
            {
                "id": "multi", "name": "ops", "description": "", "enabled": True,
                "source_posture_checks": None,
                "rules": [
                    {"id": "multi", "name": "icmp-from-all", "enabled": True, "action": "accept",
                     "bidirectional": False, "protocol": "icmp", "ports": None, "port_ranges": None,
                     "sources": [ALL], "destinations": [DEVS]},
                    {"id": "multi", "name": "ssh", "enabled": True, "action": "accept",
                     "bidirectional": False, "protocol": "tcp", "ports": ["22"], "port_ranges": None,
                     "sources": None, "destinations": [DEVS]},
                ],
            },
        ],
        "groups": [
            {**ALL, "resources_count": 0, "peers": [{"id": "pL", "name": "local"}, {"id": "pA", "name": "alice"},
                                                    {"id": "pB", "name": "bob"}], "resources": None},
            {**DEVS, "resources_count": 0, "peers": [{"id": "pL", "name": "local"}, {"id": "pA", "name": "alice"}],
             "resources": []},
            {"id": "nobody", "name": "nobody", "peers_count": 0, "resources_count": 0, "issued": "api",
             "peers": None, "resources": None},
        ],
        "peers": [
            peer("pL", "local", LOCAL, ipv6="fd00:4e42::1"),
            peer("pA", "alice", A),
            peer("pB", "bob", B, version="development"),
        ],
        "posture-checks": [
            {"id": "chacdk86lnnboviihd70", "name": "recent", "description": "",
             "checks": {"nb_version_check": {"min_version": "0.70.0"}}},
        ],
    }


class ManagementApi:
    """Mutable behaviour of the test server."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data = account() if data is None else data
        self.fault: str | None = None  # None | "500" | "garbage" | "notlist" | "slow" | "redirect"
        self.fault_paths: tuple[str, ...] = ()  # () = every path
        self.slow = 1.0
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def answer(self, path: str, auth: str | None) -> tuple[int, bytes, dict[str, str]]:
        with self.lock:
            self.requests.append(path)
        token = auth[len("Token "):] if auth and auth.startswith("Token ") else None
        if token not in (TOKEN, RESTRICTED):
            return 401, b'{"message":"token invalid","code":401}', {}
        name = path.removeprefix("/api/")
        if name not in self.data:
            return 404, b'{"message":"not found"}', {}
        if self.fault and (not self.fault_paths or name in self.fault_paths):
            if self.fault == "500":
                return 502, b"<html>bad gateway</html>", {}
            if self.fault == "garbage":
                return 200, b'[{"id": "trunc', {}
            if self.fault == "notlist":
                return 200, b'{"message": "surprise"}', {}
            if self.fault == "slow":
                time.sleep(self.slow)
            if self.fault == "redirect":
                return 302, b"", {"Location": "http://127.0.0.2:9/steal"}
            if self.fault == "forbidden":
                return 403, b'{"message":"forbidden"}', {}
        body = copy.deepcopy(self.data[name])
        if token == RESTRICTED and name == "peers":
            body = [p for p in body if p["id"] != "pB"]  # a user who may see only some peers
        return 200, json.dumps(body).encode(), {}


@contextlib.contextmanager
def serve(state: ManagementApi, cert: tuple[Path, Path] | None = None,
          netns: str | None = None) -> Iterator[str]:
    """Serve `state` on 127.0.0.1 (an ephemeral port) until the block ends.

    With `netns` (a name under /run/netns) the listening socket is created inside that
    network namespace, so an agent running there reaches it on its own loopback; the
    server threads stay in this process and `state` can be changed as the test goes.
    """
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code, body, headers = state.answer(self.path, self.headers.get("Authorization"))
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, val in headers.items():
                    self.send_header(k, val)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out first

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = call_in(netns, lambda: ThreadingHTTPServer(("127.0.0.1", 0), Handler))
    server.daemon_threads = True
    scheme = "http"
    if cert is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert[0], cert[1])
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
