"""Prometheus metrics: kernel counters read at scrape time, plus the agent's own health.

Kernel counters come from the active dataplane through a custom collector, so a scrape
always sees the kernel's current values and a deleted policy's series disappear with
it. Cardinality: one rule series per (policy rule, direction) — summed over the
endpoints it applies to — and one drop series per (local endpoint, direction, reason).

Tiers: rule and drop series carry `tier` (admin | policy | baseline, ir.Tier) and `kind`
(the policy's kind where it is not the source's usual one, e.g. ClusterNetworkPolicy;
empty for NetworkPolicy and NetBird rules). A rule series' `verdict` is the rule's own
(accept | drop | pass): an Admin Pass counts the packets it passed on (nftables; the eBPF
dataplane does not count them, see docs/ebpf.md), a Baseline Pass those it allowed. A
default deny is NetworkPolicy isolation: tier "policy", kind "".
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent import __version__
from agent.dataplane.base import Count, Counters, Dataplane
from agent.ir import Direction, Program, Rule, Tier, Verdict

if TYPE_CHECKING:
    from agent.pipeline import Snapshot

log = logging.getLogger(__name__)

RULE_LABELS = ["source", "namespace", "policy", "direction", "rule", "verdict", "tier", "kind"]
DROP_LABELS = ["endpoint", "direction", "reason", "policies", "tier", "kind"]
# busy: connection limit of a peer or in all; timeout: no full request head in time;
# too_large: request line, headers or a body; forbidden: /drops from a remote peer.
HTTP_REJECT_REASONS = ("busy", "timeout", "too_large", "bad_request", "method", "forbidden")


def _label(value: str) -> str:
    """A label value the exposition can encode: prometheus_client escapes quotes, `\\` and
    newlines itself, but a lone surrogate (JSON may carry one in a name) would make the
    whole scrape fail; it is written as a `\\udXXX` escape instead."""
    return value.encode("utf-8", "backslashreplace").decode()


@dataclass(frozen=True)
class CounterRow:
    """One kernel counter with what it counts: a rule's matches or a default deny's drops."""

    endpoint: str
    direction: Direction
    rule: Rule | None  # the matching rule; None for a default deny, or a rule the program no longer has
    default_deny: bool
    isolated_by: tuple[str, ...]  # the policies isolating this direction (default deny rows)
    count: Count


def counter_rows(program: Program, counters: Counters) -> list[CounterRow]:
    """The dataplane's counters joined with the program's rules and isolations: rule rows
    in (endpoint, rule id, direction) order, then default-deny rows in (endpoint, direction)
    order. `stockade counters` prints them; KernelCollector sums them into series."""
    rules = program.rules()
    rows = []
    for (ep, rule_id, d), c in sorted(counters.rules.items()):
        rows.append(CounterRow(ep, Direction(d), rules.get(rule_id), False, (), c))
    for (ep, d), c in sorted(counters.drops.items()):
        prog = program.endpoints.get(ep)
        by = prog.direction(Direction(d)).isolated_by if prog else ()
        rows.append(CounterRow(ep, Direction(d), None, True, tuple(by), c))
    return rows


def counter_text(r: Mapping[str, Any]) -> str:
    """One `stockade counters` row (agent.query.counters) as text; a tiered rule's origin names
    its kind, tier and priority: "drop by ClusterNetworkPolicy deny-c (Admin, priority 10) ingress rule 0"."""
    return (f"{r['packets']:>10} pkts {r['bytes']:>12} bytes  {r['endpoint']} {r['direction']}: "
            f"{r['verdict']} by {r['policy']}")


class KernelCollector(Collector):
    """Reads the dataplane's counters at scrape time and labels them with their origins."""

    def __init__(self, dataplane: Dataplane, program: Callable[[], Program | None]) -> None:
        self.dataplane = dataplane
        self.program = program
        self.errors = 0

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        rp = CounterMetricFamily("stockade_rule_packets", "Packets matched by a policy rule", labels=RULE_LABELS)
        rb = CounterMetricFamily("stockade_rule_bytes", "Bytes matched by a policy rule", labels=RULE_LABELS)
        dp = CounterMetricFamily("stockade_drop_packets", "Packets dropped, by endpoint, direction and reason",
                                 labels=DROP_LABELS)
        db = CounterMetricFamily("stockade_drop_bytes", "Bytes dropped, by endpoint, direction and reason",
                                 labels=DROP_LABELS)
        up = GaugeMetricFamily("stockade_dataplane_counters_up", "1 when the last counter read succeeded")
        program = self.program()
        try:
            counters = self.dataplane.counters(program) if program is not None else None
        except Exception as e:  # a scrape must never kill the agent
            log.warning("reading kernel counters failed: %s", e)
            counters = None
        up.add_metric([], 0 if counters is None and program is not None else 1)
        if counters is not None and program is not None:
            per_rule: dict[tuple[str, ...], Count] = {}
            drops: dict[tuple[str, ...], Count] = {}
            for row in counter_rows(program, counters):
                d, c = row.direction.value, row.count
                if row.default_deny:
                    dkey = (row.endpoint, d, "default-deny", ",".join(row.isolated_by), Tier.POLICY.value, "")
                    drops[dkey] = drops.get(dkey, Count()) + c
                    continue
                if row.rule is None:
                    continue
                o = row.rule.origin
                key = (o.source, o.namespace, o.policy, d, str(o.index), row.rule.verdict.value, o.tier.value, o.kind)
                per_rule[key] = per_rule.get(key, Count()) + c
                if row.rule.verdict is Verdict.DROP:
                    dkey = (row.endpoint, d, "drop-rule", f"{o.namespace}/{o.policy}".lstrip("/"), o.tier.value,
                            o.kind)
                    drops[dkey] = drops.get(dkey, Count()) + c
            for key, c in sorted(per_rule.items()):
                rp.add_metric([_label(v) for v in key], c.packets)
                rb.add_metric([_label(v) for v in key], c.bytes)
            for key, c in sorted(drops.items()):
                dp.add_metric([_label(v) for v in key], c.packets)
                db.add_metric([_label(v) for v in key], c.bytes)
        yield from (rp, rb, dp, db, up)


class SourceErrorsCollector(Collector):
    """Source faults by cause, read from the source's own tally at scrape time."""

    def __init__(self, errors: Callable[[], Mapping[str, int] | None]) -> None:
        self.errors = errors

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily("stockade_source_errors", "Source faults by cause", labels=["cause"])
        for cause, n in sorted((self.errors() or {}).items()):
            fam.add_metric([cause], n)
        yield fam


class EventLatency:
    """Event -> kernel latency: hook `observe` into Daemon.on_synced (runs after a successful apply).

    stockade_event_to_kernel_seconds: from a watch event read off the wire to the sync
    that put it in the kernel; stockade_pod_ip_to_kernel_seconds: the same for the event
    that first showed a pod's IP (the start-up window of --unknown-endpoints).
    Fed by `Snapshot.events`, which only a watch stream fills (Kubernetes): for the other
    sources the histograms stay empty.
    """

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self, registry: CollectorRegistry | None = None, keep: int = 1000) -> None:
        self._now = time.monotonic
        kw = {"registry": registry} if registry is not None else {}
        self.event = Histogram("stockade_event_to_kernel_seconds", "Watch event read to kernel updated",
                               ["kind"], buckets=self.BUCKETS, **kw)
        self.pod_ip = Histogram("stockade_pod_ip_to_kernel_seconds",
                                "A pod's first IP seen in a watch event to kernel updated",
                                buckets=self.BUCKETS, **kw)
        self.samples: collections.deque[tuple[str, str, float]] = collections.deque(maxlen=keep)

    def observe(self, snap: Snapshot) -> None:
        now = self._now()
        for ev in snap.events:
            if ev.type == "LIST":
                continue  # found by a list, not an event: its wait is the list's, not ours
            dt = now - ev.at
            self.event.labels(ev.ref.kind).observe(dt)
            self.samples.append((ev.ref.kind, ev.type, dt))
            if ev.new_ips:
                self.pod_ip.observe(dt)
                self.samples.append(("PodIP", ev.type, dt))


@dataclass
class AgentMetrics:
    """The agent's own metrics (names per Prometheus conventions, `stockade_` prefix)."""

    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        self.sync_duration = Histogram("stockade_sync_duration_seconds", "Time to compute and apply one sync",
                                       buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                       registry=r)
        self.syncs = Counter("stockade_syncs", "Reconcile runs by result", ["result"], registry=r)
        self.last_success = Gauge("stockade_last_successful_sync_timestamp_seconds",
                                  "Unix time of the last sync that reached the kernel", registry=r)
        self.latency = Histogram("stockade_policy_programming_latency_seconds",
                                 "Time from a source event being observed to the kernel enforcing it",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=r)
        self.endpoints = Gauge("stockade_endpoints", "Local endpoints in force", registry=r)
        self.policies = Gauge("stockade_policies", "Policies in force", registry=r)
        self.invalid = Gauge("stockade_invalid_objects", "Objects currently rejected as invalid", registry=r)
        self.rejected = Counter("stockade_invalid_objects_rejected", "Invalid objects rejected, by kind",
                                ["kind"], registry=r)
        self.dataplane_objects = Gauge("stockade_dataplane_objects", "Objects programmed in the kernel, by kind",
                                       ["kind"], registry=r)
        self.flows_cut = Counter("stockade_established_flows_cut", "Established flows cut by strict mode "
                                 "because a policy change no longer allows them", registry=r)
        self.map_fill = Gauge("stockade_dataplane_map_fill_ratio", "Entries / capacity of fixed-size kernel maps",
                              ["map"], registry=r)
        self.http_bind_failures = Counter("stockade_http_bind_failures", "Failed attempts to bind the HTTP "
                                          "endpoint (enforcement goes on; binding is retried)", registry=r)
        self.http_rejected = Counter("stockade_http_requests_rejected", "HTTP connections or requests refused, "
                                     "by reason", ["reason"], registry=r)
        for result in ("success", "error"):
            self.syncs.labels(result)
        for reason in HTTP_REJECT_REASONS:
            self.http_rejected.labels(reason)
        Info("stockade_build", "Build information", registry=r).info({"version": __version__})
        self.lock = threading.Lock()
