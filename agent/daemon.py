"""The daemon: one reconcile loop fed by source events, debounced, with periodic resync.

The debounce is on the leading edge: an isolated event is applied at once; only events
that keep arriving (during a sync, or within `debounce` of its end) are gathered for
`debounce` seconds into one sync, so a burst costs a few syncs and a lone change none.

Kernel state is left in place on exit and on start until the first successful sync
replaces it, so a restart never opens a window.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from agent.dataplane.base import ApplyStats, Dataplane, DataplaneError
from agent.drops import DropRecorder
from agent.inventory import IPAddress, Problem
from agent.ir import Program
from agent.metrics import AgentMetrics, EventLatency, KernelCollector, SourceErrorsCollector
from agent.pipeline import Pipeline, PipelineError, Snapshot, gc_paused
from agent.strict import stale_flows
from agent.systemd import notify

log = logging.getLogger(__name__)

STRICT_PASSES = 3
# Python's cyclic GC walks every tracked object in a full (generation 2) collection: with
# a 10k-pod inventory and its compiled program that was 100-300 ms, landing on whichever
# event happened to trigger it (the p99 of one label change). After the first sync the
# long-lived heap is frozen (gc.freeze: moved where collections never look; instant), so
# collections walk only what later events allocate. Every REFREEZE seconds it is thawed,
# collected once (cycles that died meanwhile are freed: a bounded leak) and frozen again.
REFREEZE = 600.0


class Heap:
    """When to freeze the long-lived heap (see REFREEZE)."""

    def __init__(self, every: float = REFREEZE) -> None:
        self.every = every
        self.frozen_at: float | None = None

    def after_sync(self) -> None:
        now = time.monotonic()
        if self.frozen_at is not None:
            if now - self.frozen_at < self.every:
                return
            gc.unfreeze()
            gc.collect()
        gc.freeze()
        self.frozen_at = time.monotonic()
        log.debug("heap frozen (%.0f ms)", (self.frozen_at - now) * 1000)


def enforce(dataplane: Dataplane, program: Program, strict: bool = True) -> tuple[ApplyStats, int]:
    """Apply a program; in strict mode then cut established flows it no longer allows."""
    stats = dataplane.apply(program)
    cut = 0
    if strict:
        try:
            # A flow table dumped while flows come and go is no snapshot: after a cut, look
            # again (one more dump) until a dump finds nothing stale.
            node: list[IPAddress] | None = None  # read only when there are flows (a cold start has none)
            for _ in range(STRICT_PASSES):
                flows = dataplane.established()
                if not flows:
                    break
                if node is None:
                    node = dataplane.node_addresses()
                stale = stale_flows(program, flows, node)
                if not stale:
                    break
                cut += dataplane.forget(stale)
        except Exception as e:  # netlink errors included: the policy is in force, only re-judging failed
            log.warning("strict mode: could not re-judge established flows: %s", e)
        if cut:
            log.info("strict mode: cut %d established flows the new policy denies", cut)
    return stats, cut


class Daemon:
    """Keeps the kernel in step with one pipeline: syncs on its changes and periodically.

    Metrics: the agent's own, the kernel's counters, the source's faults and the event ->
    kernel latency (`event_latency`, fed by every snapshot's `events`).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        dataplane: Dataplane,
        debounce: float = 0.1,
        resync: float = 60.0,
        registry: CollectorRegistry | None = None,
        strict: bool = True,
    ) -> None:
        self.strict = strict
        self.pipeline = pipeline
        self.dataplane = dataplane
        self.debounce = debounce
        self.resync = resync
        self.registry = registry or CollectorRegistry()
        self.metrics = AgentMetrics(self.registry)
        self.program: Program | None = None  # what the kernel enforces now
        self.registry.register(KernelCollector(dataplane, lambda: self.program))
        self.registry.register(SourceErrorsCollector(lambda: pipeline.errors))
        self._notified = False
        self.ready = threading.Event()
        self._pending_since: float | None = None  # first source event not yet in the kernel
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._busy_until = float("-inf")  # monotonic end of the last sync (inf during one)
        self._reported: set[str] = set()
        self.event_latency = EventLatency(self.registry)
        self.on_synced: list[Callable[[Snapshot], None]] = [self.event_latency.observe]
        self.drops: DropRecorder | None = None
        # What the kernel gets is transform(snapshot's program) -- the DNS egress learner's
        # addresses (agent.dns.egress) -- and `reapply` redoes it between syncs, serialised
        # with them by `apply_lock`.
        self.transform: Callable[[Program], Program] | None = None
        self.apply_lock = threading.Lock()
        self._base: Program | None = None  # the last synced snapshot's program, untransformed
        self.last_stats: ApplyStats | None = None  # what the last successful sync's apply did
        self.heap = Heap()
        self._applied: Callable[[], None] | None = None  # the synced snapshot's `applied` (sync_once)

    def trigger(self) -> None:
        """A source saw a change (called from any thread)."""
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        self._wake.set()

    def sync_once(self) -> bool:
        """One sync: snapshot, kernel, readiness; then what the pipeline put off until the
        kernel had it (the state file: read on a restart, written on a cold start)."""
        self._applied = None
        try:
            return self._sync_once()
        finally:
            if self._applied is not None:
                try:
                    self._applied()
                except Exception:  # the state file is the pipeline's business: never the loop's end
                    log.exception("after-sync work of the pipeline failed")

    def _sync_once(self) -> bool:
        started = time.monotonic()
        pending, self._pending_since = self._pending_since, None
        try:
            snap = self.pipeline.snapshot()
            self._applied = snap.applied
            self._report(snap.problems)
            with self.apply_lock:
                program = snap.program if self.transform is None else self.transform(snap.program)
                stats, cut = enforce(self.dataplane, program, self.strict)
                self.program, self._base = program, snap.program
                self.last_stats = stats
        except Exception as e:
            if isinstance(e, PipelineError) and e.transient:  # e.g. the initial lists are still arriving
                log.info("%s", e)
            elif isinstance(e, (PipelineError, DataplaneError)):
                log.error("sync failed, previous kernel state stays in force: %s", e)
            else:  # a bug must not take enforcement down: the kernel keeps the last state
                log.exception("sync failed unexpectedly, previous kernel state stays in force")
            self.metrics.syncs.labels("error").inc()
            for name, ratio in self.dataplane.map_fill().items():  # a map that cannot grow: ratio > 1
                self.metrics.map_fill.labels(name).set(ratio)
            if pending is not None and self._pending_since is None:
                self._pending_since = pending  # still not in the kernel
            return False
        done = time.monotonic()
        m = self.metrics
        m.sync_duration.observe(done - started)
        if pending is not None:
            m.latency.observe(done - pending)
        m.syncs.labels("success").inc()
        m.flows_cut.inc(cut)
        m.last_success.set_to_current_time()
        m.invalid.set(len(snap.problems))
        m.endpoints.set(len(snap.program.endpoints))
        m.policies.set(len(snap.inventory.policies))
        for kind, n in self.dataplane.objects().items():
            m.dataplane_objects.labels(kind).set(n)
        for name, ratio in self.dataplane.map_fill().items():
            m.map_fill.labels(name).set(ratio)
        log.info(
            "synced %d endpoints (%s, %d commands, +%d/-%d elements)",
            len(snap.program.endpoints),
            "full" if stats.full else "diff",
            stats.commands,
            stats.elements_added,
            stats.elements_removed,
        )
        self.ready.set()
        if self.is_ready() and not self._notified:
            self._notified = notify("READY=1") or True  # systemd Type=notify; no-op elsewhere
        for cb in self.on_synced:
            cb(snap)
        return True

    def reapply(self) -> bool:
        """Apply transform(the last synced program) now, between syncs (no strict cut: a
        learned address expiring ends new connections only). False: nothing applied."""
        with self.apply_lock:
            if self._base is None or self.transform is None:
                return False
            program = self.transform(self._base)
            try:
                self.dataplane.apply(program)
            except Exception as e:
                log.error("applying learned DNS addresses failed, previous kernel state stays: %s", e)
                return False
            self.program = program
            return True

    def is_ready(self) -> bool:
        """The kernel enforces what the source says (not just a bootstrap program).

        A pipeline may hold readiness back (NetBird before its first good poll, Kubernetes
        before its initial lists): the kernel then enforces a bootstrap program only.
        """
        return self.ready.is_set() and self.pipeline.ready.is_set()

    def _report(self, problems: list[Problem]) -> None:
        """Log each problem once while it persists, not on every resync."""
        now = {str(p): p for p in problems}
        for text in sorted(set(now) - self._reported):
            log.warning("invalid input (last good version kept, else read fail-closed): %s", text)
            self.metrics.rejected.labels(now[text].ref.kind).inc()
        self._reported = set(now)

    def start_drop_log(self) -> None:
        try:
            drop_log = self.dataplane.drop_log()
        except OSError as e:
            log.warning("drop sampling unavailable (%s): `stockade drops` will show nothing", e)
            return
        if drop_log is not None:
            self.drops = DropRecorder(drop_log, lambda: self.program).start()

    def run(self) -> None:
        stop_watch = self.pipeline.watch(self.trigger)
        self.start_drop_log()
        try:
            next_resync = 0.0
            while not self.stopping.is_set():
                timeout = max(0.0, next_resync - time.monotonic())
                woke = self._wake.wait(timeout)
                if self.stopping.is_set():
                    break
                if woke and self.in_burst():
                    # Events keep coming (editors write in steps, a rollout moves many pods):
                    # gather them. A lone event goes straight through.
                    self.stopping.wait(self.debounce)
                    if self.stopping.is_set():
                        break
                self._wake.clear()
                self._busy_until = float("inf")  # an event from now on is part of a burst
                # No cyclic collection during the whole sync, the kernel's part included: the
                # pipeline pauses it for the snapshot only, and re-enabled before the apply the
                # collector walked everything the snapshot had built, again and again as the
                # apply allocated (a cold 10k eBPF start: ~1,000 young and 2 full collections,
                # 0.3-1 s of the way to ready). The heap is frozen before they resume.
                with gc_paused():
                    ok = self.sync_once()
                    if ok:
                        self.heap.after_sync()
                self._busy_until = time.monotonic()
                # Retry soon after a failure; otherwise resync periodically to repair drift.
                next_resync = time.monotonic() + (self.resync if ok else min(5.0, self.resync))
        finally:
            stop_watch()
            if self.drops:
                self.drops.stop()

    def in_burst(self) -> bool:
        """The pending event came during the last sync or within `debounce` of its end."""
        pending = self._pending_since
        return pending is not None and pending - self._busy_until < self.debounce

    def stop(self, *_: object) -> None:
        self.stopping.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
