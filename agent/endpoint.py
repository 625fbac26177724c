"""The HTTP endpoint: /metrics, /healthz, /readyz, /drops and /dns.

Anything that reaches the node can connect, so no client may stall the endpoint (the
liveness probe would then restart the agent) and the endpoint may never hold up
enforcement: a thread per connection, a deadline for the request head, bounded sizes,
bounded connections per peer, and a bind that is retried in the background.
"""

from __future__ import annotations

import collections
import io
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from agent.daemon import Daemon

log = logging.getLogger(__name__)

HEAD_DEADLINE = 5.0  # seconds a client has to send its request line and headers
IO_TIMEOUT = 10.0  # any one send or receive on an accepted connection
MAX_REQUEST_LINE = 4096
MAX_HEAD = 16384  # request line and headers; no body is ever read
MAX_CONNECTIONS = 128  # open connections of remote peers (threads)
MAX_PER_PEER = 8  # open connections of one remote address
BIND_RETRY = (1.0, 10.0)  # first and longest wait between bind attempts


@dataclass(frozen=True)
class ListenAddress:
    """HOST:PORT with an IP address as HOST (IPv6 in brackets)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        expect = f"expected HOST:PORT with an IP address as HOST (IPv6 as [::1]:9754), got {text!r}"
        m = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:(?P<p6>\d{1,5})|(?P<v4>[^:\[\]]+):(?P<p4>\d{1,5})", text.strip())
        if m is None:
            raise ValueError(expect)
        host, port = (m["v6"], m["p6"]) if m["v6"] is not None else (m["v4"], m["p4"])
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{expect}: {host!r} is not an IP address") from None
        if (ip.version == 6) != (m["v6"] is not None):
            raise ValueError(f"{expect}: only IPv6 addresses go in brackets")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"{expect}: port must be 1-65535")
        return cls(str(ip), int(port))

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def client(self) -> ListenAddress:
        """Where a local client reaches a listener on this address (wildcard -> loopback)."""
        if ipaddress.ip_address(self.host.split("%")[0]).is_unspecified:
            return ListenAddress("::1" if self.family == socket.AF_INET6 else "127.0.0.1", self.port)
        return self

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
    return mapped or ip


def is_loopback(peer: str) -> bool:
    ip = _ip(peer)
    return ip is not None and ip.is_loopback


class _Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class _ServerHandler(ServerHandler):
    def log_exception(self, exc_info: Any) -> None:
        # The app answers its own errors; what remains is a client going away or too slow.
        log.debug("http: response failed", exc_info=exc_info)


class _Handler(WSGIRequestHandler):
    """One request per connection (HTTP/1.0), read under a deadline, never a body."""

    timeout = IO_TIMEOUT  # StreamRequestHandler.setup puts it on the socket
    default_request_version = "HTTP/1.0"  # errors get a status line (HTTP/0.9 answers have none)
    server: HttpServer

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http: " + format, *args)

    def handle(self) -> None:
        self.requestline, self.request_version, self.command = "", "", ""
        try:
            head = self._read_head()
        except _Refused as e:
            return self._refuse(e.code, e.reason)
        except (EOFError, OSError):
            return  # the client went away
        self.connection.settimeout(IO_TIMEOUT)
        self.raw_rfile, self.rfile = self.rfile, io.BytesIO(head)
        self.raw_requestline = self.rfile.readline()
        if not self.parse_request():  # it answered 400 itself
            self.server.rejected("bad_request")
            return self._linger()
        if self.command not in ("GET", "HEAD"):
            return self._refuse(405, "method")
        if self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers:
            return self._refuse(413, "too_large", "no request body accepted")
        handler = _ServerHandler(self.rfile, self.wfile, self.get_stderr(), self.get_environ(), multithread=True)
        handler.request_handler = self
        handler.run(self.server.get_app())

    def _refuse(self, code: int, reason: str, message: str | None = None) -> None:
        self.server.rejected(reason)
        self.send_error(code, message)
        self._linger()

    def _linger(self) -> None:
        """Read a little of what the client still sends before closing: closing with
        unread input resets the connection, and the client would lose the answer."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            end = time.monotonic() + 1.0
            for _ in range(16):  # at most 64 KiB and one second
                self.connection.settimeout(max(0.01, end - time.monotonic()))
                if not self.connection.recv(4096) or time.monotonic() >= end:
                    break
        except OSError:
            pass

    def _read_head(self) -> bytes:
        """The request line and headers, within HEAD_DEADLINE in all (a client sending one
        byte a second is cut like an idle one) and MAX_HEAD bytes."""
        sock = self.connection
        deadline = time.monotonic() + HEAD_DEADLINE
        buf = bytearray()
        while True:
            line_end = buf.find(b"\n")
            if line_end > MAX_REQUEST_LINE or (line_end < 0 and len(buf) > MAX_REQUEST_LINE):
                raise _Refused(414, "too_large")
            for sep in (b"\r\n\r\n", b"\n\n"):
                end = buf.find(sep)
                if end >= 0:
                    if end > MAX_HEAD:
                        raise _Refused(431, "too_large")
                    return bytes(buf[:end + len(sep)])
            if len(buf) > MAX_HEAD:
                raise _Refused(431, "too_large")
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Refused(408, "timeout")
            sock.settimeout(min(left, IO_TIMEOUT))
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                raise _Refused(408, "timeout") from None
            if not chunk:
                raise EOFError
            buf += chunk

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            raw = getattr(self, "raw_rfile", None)
            if raw is not None:
                raw.close()


class HttpServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most MAX_PER_PEER per remote address and
    MAX_CONNECTIONS in all. Local peers (loopback, or the node itself, as the kubelet's
    probes come from) are never turned away: a pod cannot spoof those addresses."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: ListenAddress, on_reject: Callable[[str], None]) -> None:
        self.address_family = address.family
        self.rejected = on_reject
        self._lock = threading.Lock()
        self._per_peer: collections.Counter[str] = collections.Counter()
        super().__init__((address.host, address.port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        peer = str(client_address[0])
        try:
            local = is_loopback(peer) or _ip(peer) == _ip(str(request.getsockname()[0]))
        except OSError:  # reset already
            local = False
        key = "" if local else peer
        with self._lock:
            if key and (self._per_peer[key] >= MAX_PER_PEER or self._per_peer.total() >= MAX_CONNECTIONS):
                busy = True
            else:
                busy = False
                if key:
                    self._per_peer[key] += 1
        if busy:
            self.rejected("busy")
            self.shutdown_request(request)
            return
        try:
            threading.Thread(target=self._serve, args=(request, client_address, key), daemon=True).start()
        except RuntimeError:  # no thread to spare: refuse, never wait
            self._release(key)
            self.shutdown_request(request)

    def _serve(self, request: Any, client_address: Any, key: str) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._release(key)

    def _release(self, key: str) -> None:
        if key:
            with self._lock:
                self._per_peer[key] -= 1
                if self._per_peer[key] <= 0:
                    del self._per_peer[key]

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("http: connection from %s failed", client_address, exc_info=True)


def _text(start_response: StartResponse, status: str, text: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [text.encode()]


def _since(query: str) -> int:
    """The `since` parameter of /drops: a sequence number (digits only)."""
    values = parse_qs(query, keep_blank_values=True, max_num_fields=10).get("since", ["0"])
    text = values[-1] or "0"
    if not (text.isascii() and text.isdigit() and len(text) <= 19):
        raise ValueError("since must be a non-negative integer")
    return int(text)


def http_app(daemon: Daemon, drops_public: bool = False) -> WSGIApplication:
    """/metrics, /healthz (the loop is alive), /readyz (the source's state is in the kernel)
    and /drops (flows and pod names: loopback peers only unless `drops_public`)."""
    metrics_app = make_wsgi_app(daemon.registry)
    scrape = threading.Lock()  # one scrape at a time reads the kernel; others wait their turn

    def route(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            ok = not daemon.stopping.is_set()
            return _text(start_response, "200 OK" if ok else "503 Service Unavailable",
                         "ok\n" if ok else "stopping\n")
        if path == "/readyz":
            ok = daemon.is_ready()
            return _text(start_response, "200 OK" if ok else "503 Service Unavailable",
                         "ok\n" if ok else "not ready\n")
        if path == "/metrics":
            with scrape:
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/drops":
            if not drops_public and not is_loopback(environ.get("REMOTE_ADDR", "")):
                daemon.metrics.http_rejected.labels("forbidden").inc()
                return _text(start_response, "403 Forbidden",
                             "/drops answers loopback clients only (agent flag --drops-public)\n")
            try:
                since = _since(environ.get("QUERY_STRING", ""))
            except ValueError as e:
                daemon.metrics.http_rejected.labels("bad_request").inc()
                return _text(start_response, "400 Bad Request", f"{e}\n")
            body = json.dumps(daemon.drops.since(since) if daemon.drops else []).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        if path == "/dns":  # pod names and the addresses they resolved: as private as /drops
            if not drops_public and not is_loopback(environ.get("REMOTE_ADDR", "")):
                daemon.metrics.http_rejected.labels("forbidden").inc()
                return _text(start_response, "403 Forbidden",
                             "/dns answers loopback clients only (agent flag --drops-public)\n")
            dns = getattr(daemon, "dns", None)  # set by agent.dns.egress.DnsEgress (--dns-egress)
            body = json.dumps(dns.view() if dns is not None else {"enabled": False, "pods": []}).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        return _text(start_response, "404 Not Found", "not found: try /metrics, /healthz, /readyz, /drops, /dns\n")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            return route(environ, start_response)
        except Exception:  # a bug: logged with its traceback here, never sent to the client
            log.exception("http: %s failed", environ.get("PATH_INFO", "?"))
            return _text(start_response, "500 Internal Server Error", "internal error\n")

    return app


class HttpEndpoint:
    """The HTTP endpoint, bound now or, if the address is taken, retried in the
    background with backoff; enforcement never waits for it."""

    def __init__(self, daemon: Daemon, address: ListenAddress, drops_public: bool = False) -> None:
        self.address = address
        self.metrics = daemon.metrics
        self.app = http_app(daemon, drops_public)
        self.server: HttpServer | None = None
        self.error = ""  # the last bind error
        self._stop = threading.Event()
        self._retry: threading.Thread | None = None

    def start(self) -> HttpEndpoint:
        if not self._bind(first=True):
            self._retry = threading.Thread(target=self._retry_loop, name="http-bind", daemon=True)
            self._retry.start()
        return self

    def _bind(self, first: bool = False, last_error: str = "") -> bool:
        try:
            server = HttpServer(self.address, lambda reason: self.metrics.http_rejected.labels(reason).inc())
        except OSError as e:
            self.metrics.http_bind_failures.inc()
            self.error = str(e)
            if first or self.error != last_error:
                log.warning("http: cannot listen on %s (%s); enforcing anyway, retrying in the background",
                            self.address, e)
            return False
        server.set_app(self.app)
        self.server = server
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        if not first:
            log.info("http: listening on %s", self.address)
        return True

    def _retry_loop(self) -> None:
        delay = BIND_RETRY[0]
        while not self._stop.wait(delay):
            if self._bind(last_error=self.error):
                return
            delay = min(delay * 2, BIND_RETRY[1])

    def close(self) -> None:
        self._stop.set()
        if self._retry is not None:
            self._retry.join()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def serve_http(daemon: Daemon, address: ListenAddress, drops_public: bool = False) -> HttpEndpoint:
    """Start the HTTP endpoint; a taken address is retried in the background."""
    return HttpEndpoint(daemon, address, drops_public).start()
