"""The daemon: one reconcile loop fed by source events, debounced, with periodic resync.

Kernel state is left in place on exit and on start until the first successful sync
replaces it, so a restart never opens a window.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app

from agent.dataplane.base import Dataplane, DataplaneError
from agent.inventory import Problem
from agent.pipeline import Snapshot

log = logging.getLogger(__name__)


class Pipeline(Protocol):
    def snapshot(self) -> Snapshot: ...


class Watchable(Protocol):
    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]: ...


class Metrics:
    """Agent health metrics; kernel counters are added by the metrics module."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.syncs = Counter("stockade_syncs", "Reconcile runs by result", ["result"], registry=registry)
        self.last_success = Gauge(
            "stockade_last_successful_sync_timestamp_seconds",
            "Unix time of the last sync that reached the kernel",
            registry=registry,
        )
        self.invalid = Gauge(
            "stockade_invalid_objects", "Objects rejected as invalid in the last sync", registry=registry
        )


class Daemon:
    def __init__(
        self,
        pipeline: Pipeline,
        dataplane: Dataplane,
        watch: Watchable | None = None,
        debounce: float = 0.1,
        resync: float = 60.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.dataplane = dataplane
        self.watch_source = watch
        self.debounce = debounce
        self.resync = resync
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._reported: set[str] = set()
        self.on_synced: list[Callable[[Snapshot], None]] = []

    def trigger(self) -> None:
        self._wake.set()

    def sync_once(self) -> bool:
        try:
            snap = self.pipeline.snapshot()
            self._report(snap.problems)
            stats = self.dataplane.apply(snap.program)
        except DataplaneError as e:
            log.error("sync failed, previous kernel state stays in force: %s", e)
            self.metrics.syncs.labels("error").inc()
            return False
        self.metrics.syncs.labels("success").inc()
        self.metrics.last_success.set_to_current_time()
        self.metrics.invalid.set(len(snap.problems))
        log.info(
            "synced %d endpoints (%s, %d commands, +%d/-%d elements)",
            len(snap.program.endpoints),
            "full" if stats.full else "diff",
            stats.commands,
            stats.elements_added,
            stats.elements_removed,
        )
        self.ready.set()
        for cb in self.on_synced:
            cb(snap)
        return True

    def _report(self, problems: list[Problem]) -> None:
        """Log each problem once while it persists, not on every resync."""
        now = {str(p) for p in problems}
        for text in sorted(now - self._reported):
            log.warning("invalid object skipped (last good version kept): %s", text)
        self._reported = now

    def run(self) -> None:
        stop_watch = self.watch_source.watch(self.trigger) if self.watch_source else None
        try:
            next_resync = 0.0
            while not self.stopping.is_set():
                timeout = max(0.0, next_resync - time.monotonic())
                if self._wake.wait(timeout) and not self.stopping.is_set():
                    time.sleep(self.debounce)  # coalesce bursts (editors write files in steps)
                self._wake.clear()
                if self.stopping.is_set():
                    break
                ok = self.sync_once()
                # Retry soon after a failure; otherwise resync periodically to repair drift.
                next_resync = time.monotonic() + (self.resync if ok else min(5.0, self.resync))
        finally:
            if stop_watch:
                stop_watch()

    def stop(self, *_: object) -> None:
        self.stopping.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        log.debug("http: " + format, *args)


def serve_http(daemon: Daemon, address: str) -> WSGIServer:
    """/metrics, /healthz (the loop is alive) and /readyz (first sync done) on HOST:PORT."""
    host, _, port = address.rpartition(":")
    metrics_app = make_wsgi_app(daemon.registry)

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            ok = not daemon.stopping.is_set()
        elif path == "/readyz":
            ok = daemon.ready.is_set()
        else:
            return metrics_app(environ, start_response)
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [b"ok\n" if ok else b"not ready\n"]

    server = make_server(host.strip("[]") or "0.0.0.0", int(port), app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
