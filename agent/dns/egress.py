"""`stockade run --dns-egress` (off by default): domainNames rules fed by the DNS answers
the node's pods receive, each answer released to its pod only once the addresses it taught
are in the kernel.

Per synced snapshot: the domainNames rules of every local pod (`learner_rules`), and the
hold (agent/dns/hold.py) attached to the host-side device of each pod that has some. Per
held answer (`learn`, on the hold's thread): the learner's updates for that pod, and
`commit` puts them into the kernel; only after that returned does the hold write the
answer to the pod. The hold learns from every frame it read at once, then commits once,
then releases them: one kernel update per burst, not per answer. Two ways to the kernel:

- the dataplane `learns_in_kernel` (nftables and eBPF): the program is applied as synced, each
  domainNames rule matching its own kernel sets (nftables) or map entries (eBPF)
  with per-element expiry. `learn`
  collects the entries the kernel lacks (new addresses, later expiries, and entries the
  per-pod cap evicted, to remove), `commit` sends them in one `Dataplane.learn`
  transaction, touching nothing else. The kernel times entries out itself: no update at
  expiry. After a sync the live entries of rules new to the kernel are sent again
  (idempotent): all of them after a full load (a table rebuilt whole) or a failed
  update, else those of rules the sync added.
- otherwise (a dataplane without such sets): `commit` re-applies the last program with the table's
  addresses as the rules' peers (`Daemon.reapply`, `with_learned`); an answer that only
  refreshes an address already learned needs no apply; a timer re-applies at each expiry.

Either way a pod's first connection to a fresh address is allowed and one past its TTL is
not.

`view()` is what the agent serves as `/dns` (and `stockade explain --to-name` reads).

Answers over UDP and TCP are held (a TCP answer: the segment that completes it, see
agent/dns/frames.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.dataplane.base import Dataplane, LearnedEntry
from agent.dns.hold import Hold
from agent.dns.learn import MAX_PER_POD, TTL_FLOOR, merge, named_updates, resolved
from agent.inventory import Inventory, IPAddress
from agent.ir import Program, Rule
from agent.policy.cluster import (
    KINDS,
    ClusterCompiler,
    ClusterPolicy,
    DomainRule,
    Learned,
    parse_cluster_policy,
    with_learned,
)
from agent.policy.cluster.domains import learned_rule_key

log = logging.getLogger(__name__)


class Reapplier(Protocol):
    """What this needs of the daemon (agent.daemon.Daemon)."""

    transform: Callable[[Program], Program] | None
    on_synced: list[Callable[[Any], None]]
    registry: CollectorRegistry
    dataplane: Dataplane
    apply_lock: threading.Lock  # serialises kernel updates with syncs

    def reapply(self) -> bool: ...


def learner_rules(inv: Inventory, endpoints: Iterable[str]) -> dict[str, list[DomainRule]]:
    """endpoint key -> its domainNames Accept rules (endpoints with none left out)."""
    cluster = []
    for raw in inv.policies.values():
        if isinstance(raw.parsed, ClusterPolicy):
            cluster.append(raw.parsed)
        elif raw.ref.kind in KINDS:
            cluster.append(parse_cluster_policy(raw, []))  # problems are reported by the compile
    if not cluster:
        return {}
    comp = ClusterCompiler(inv, cluster)
    out = {}
    for key in endpoints:
        ep = inv.endpoints.get(key)
        rules = comp.domain_rules(ep) if ep is not None else []
        if rules:
            out[key] = rules
    return out


class DnsEgress:
    def __init__(self, daemon: Reapplier, fail_closed: bool = False, grace: float = 1.0,
                 floor: int = TTL_FLOOR, cap: int = MAX_PER_POD,
                 clock: Callable[[], float] = time.monotonic, hold: Callable[..., Hold] = Hold) -> None:
        self.daemon = daemon
        self.floor, self.cap, self.clock = floor, cap, clock
        self.learned = Learned()
        self.lock = threading.Lock()
        self.rules: dict[str, list[DomainRule]] = {}
        self.by_ip: dict[IPAddress, str] = {}
        self.devices: set[str] = set()
        self.names: dict[tuple[str, str, IPAddress], str] = {}  # entry -> the question that taught it
        self.program: Program | None = None  # the last program transformed (rule origins for `view`)
        dp = getattr(daemon, "dataplane", None)
        self.kernel = bool(getattr(dp, "learns_in_kernel", False))  # see the module docstring
        self.apply_lock = getattr(daemon, "apply_lock", None) or threading.Lock()
        # kernel path: what the kernel lacks, sent by the next `commit` (entry -> expiry)
        self.pending: dict[tuple[str, str, IPAddress], float] = {}
        self.evicted: set[tuple[str, str, IPAddress]] = set()
        self.known: set[str] = set()  # learned rule keys of the last synced program
        self.lost = False  # a kernel update failed: the next sync sends every live entry
        r = daemon.registry
        self.answers = Counter("stockade_dns_answers", "DNS answers held, by what they taught: learned (an address "
                               "added or kept longer), nothing (no rule's name, or not a usable answer), "
                               "not_selected (a pod without domainNames rules)", ["outcome"], registry=r)
        self.entries = Gauge("stockade_dns_learned_entries", "Learned (pod, rule, address) entries in force",
                             registry=r)
        self.updates = Counter("stockade_dns_kernel_updates", "Kernel updates held answers waited for (one per "
                               "burst of answers read together that taught a new address, or, with learned "
                               "sets in the kernel, a later expiry)", registry=r)
        self.expired = Counter("stockade_dns_expired_entries", "Learned entries removed at their expiry", registry=r)
        self.failed = Counter("stockade_dns_kernel_update_failures", "Kernel updates of learned addresses "
                              "that failed (the answers were released all the same)", registry=r)
        self.held = Histogram("stockade_dns_hold_seconds", "A DNS answer read by the agent to released to its pod "
                              "(learning and the kernel update included)",
                              buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.hold = hold(self.learn, grace=grace, fail_closed=fail_closed, on_released=self.held.observe,
                         commit=self.commit)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._timer = threading.Thread(target=self._expire_loop, name="dns-expiry", daemon=True)
        daemon.transform = self.transform
        daemon.dns = self  # type: ignore[attr-defined]  # served as /dns (agent/endpoint.py)
        daemon.on_synced.append(self.synced)

    def start(self) -> None:
        self.hold.start()
        self._timer.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._timer.is_alive():
            self._timer.join()
        self.hold.close()

    # ------------------------------------------------------------ daemon side

    def transform(self, program: Program) -> Program:
        with self.lock:
            table = self._forget_expired()
            self.program = program
        return program if self.kernel else with_learned(program, table)

    def _forget_expired(self) -> Learned:
        """Drop the entries past their expiry from the table (caller holds the lock)."""
        now = self.clock()
        self.expired.inc(self.learned.expired(now))
        self.learned = table = self.learned.expire(now)
        self.entries.set(len(table))
        self.names = {k: n for k, n in self.names.items() if k[2] in table.entries.get(k[:2], {})}
        return table

    def synced(self, snap: Any) -> None:
        local = snap.program.endpoints
        self.rules = learner_rules(snap.inventory, local)
        self.by_ip = {ip: key for key, ep in local.items() for ip in ep.ips}
        for key in self.rules:
            for ip in local[key].ips[:1]:
                dev = self.hold.device_for(ip)
                if dev is not None and dev not in self.devices:
                    try:
                        self.hold.attach(dev)
                        self.devices.add(dev)
                    except Exception as e:  # the pod's answers then pass unheld: nothing learned
                        log.warning("dns egress: cannot hold answers to %s on %s: %s", key, dev, e)
        if self.kernel:
            self._resend(snap.program)

    def _resend(self, program: Program) -> None:
        """The live entries of the learned rules this sync may have given empty kernel sets
        (idempotent): all of them after a full load or a failed update, else those of rules
        new in `program`.
        An event's sync then costs what it changed, not what was learned."""
        keys = {r.key for ep in program.endpoints.values() for r in ep.egress.rules if r.learned}
        stats = getattr(self.daemon, "last_stats", None)
        known, self.known = self.known, keys
        if stats is not None and not stats.full and not self.lost:
            keys = keys - known
        self.lost = False  # a failure of this send sets it again
        with self.apply_lock:  # the table read under it: a later change is sent after this
            with self.lock:
                now, table = self.clock(), self.learned
            add = [LearnedEntry(k, ip, t) for (e, r), v in table.entries.items()
                   if (k := learned_rule_key(r, e)) in keys for ip, t in v.items() if t > now]
            if add:
                self._send(add, [])

    # ------------------------------------------------------------ hold side

    def on_answer(self, dst: IPAddress, payload: bytes) -> None:
        """Learn from an answer to `dst`; return once what it taught is in the kernel."""
        if self.learn(dst, payload):
            self.commit()

    def learn(self, dst: IPAddress, payload: bytes) -> bool:
        """Learn from an answer to `dst` (the hold's `on_answer`): whether it added an
        address, which only `commit()` puts into the kernel. An address already learned
        gets its later expiry in the table and needs no kernel update (a refresh)."""
        key = self.by_ip.get(dst)
        rules = self.rules.get(key, []) if key else []
        if not rules:
            self.answers.labels("not_selected").inc()
            return False
        now = self.clock()
        named = named_updates(key, rules, resolved(payload), now, self.floor)  # type: ignore[arg-type]
        new = [e for e, _ in named]
        self.answers.labels("learned" if new else "nothing").inc()
        if not new:
            return False
        with self.lock:
            before = self.learned
            self.learned = after = merge(before, new, self.cap)
            self.names.update(((e, r, ip), name) for (e, r, ip, _), name in named)
            fresh = any(ip not in before.entries.get((e, r), {}) for e, r, ip, _ in new)
            self.entries.set(size := len(after))
            if self.kernel:
                fresh = self._note_changes(before, after, new, size)
        if not fresh:
            self._wake.set()  # the earliest expiry may have changed
        return fresh

    def _note_changes(self, before: Learned, after: Learned, new: list[tuple[str, str, IPAddress, float]],
                      size: int) -> bool:
        """Kernel path (lock held): note what the kernel lacks after `before` -> `after`:
        entries added or given a later expiry, and those the per-pod cap evicted. Whether
        there is anything to send."""
        absent = set()
        for e, r, ip, _ in new:
            t = after.entries.get((e, r), {}).get(ip)
            was = before.entries.get((e, r), {}).get(ip)
            if was is None:
                absent.add((e, r, ip))
            if t is not None and (was is None or t > was) and self.pending.get((e, r, ip), 0.0) < t:
                self.pending[(e, r, ip)] = t
                self.evicted.discard((e, r, ip))
        if size < len(before) + len(absent):  # the cap evicted some: find them among the touched pods' entries
            eps = {e for e, _, _, _ in new}
            for (e, r), v in before.entries.items():
                if e in eps:
                    now = after.entries.get((e, r), {})
                    for ip in v:
                        if ip not in now:
                            self.evicted.add((e, r, ip))
                            self.pending.pop((e, r, ip), None)
        return bool(self.pending or self.evicted)

    def commit(self) -> None:
        """Put what was learned into the kernel (the hold's `commit`, once per batch of
        answers read together)."""
        self.updates.inc()
        if not self.kernel:
            self.daemon.reapply()
            self._wake.set()
            return
        with self.apply_lock:
            with self.lock:
                pending, evicted, self.pending, self.evicted = self.pending, self.evicted, {}, set()
            add = [LearnedEntry(learned_rule_key(r, e), ip, t) for (e, r, ip), t in pending.items()]
            remove = [LearnedEntry(learned_rule_key(r, e), ip, 0.0) for e, r, ip in evicted]
            self._send(add, remove)
        self._wake.set()

    def _send(self, add: list[LearnedEntry], remove: list[LearnedEntry]) -> None:
        """One `Dataplane.learn` (caller holds apply_lock). A failure is logged and counted,
        never raised: the hold releases the answers all the same (as a failed re-apply
        does), and the next sync sends every live entry again."""
        try:
            self.daemon.dataplane.learn(add, remove)
        except Exception as e:
            self.failed.inc()
            self.lost = True
            log.error("putting learned DNS addresses into the kernel failed, previous kernel state stays: %s", e)

    def _expire_loop(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                times = [t for v in self.learned.entries.values() for t in v.values()]
            wait = 60.0 if not times else max(0.0, min(times) - self.clock())
            if self._wake.wait(wait):
                self._wake.clear()
                continue
            if times and not self._stop.is_set():
                if self.kernel:  # the kernel timed them out itself: only the table forgets
                    with self.lock:
                        self._forget_expired()
                else:
                    self.daemon.reapply()  # transform() drops what expired

    # ------------------------------------------------------------ visibility

    def view(self) -> dict[str, Any]:
        """What `/dns` serves: every local pod with domainNames rules, each rule with its
        origin and the addresses learned under it now (the name that taught each, and its
        expiry as seconds from now and as wall-clock time)."""
        with self.lock:
            now, wall = self.clock(), time.time()
            table, names, program, rules = self.learned, dict(self.names), self.program, self.rules
        pods = []
        for key in sorted(rules):
            out = []
            for dr in rules[key]:
                learned = sorted(table.entries.get((key, dr.key), {}).items(), key=lambda x: (x[1], str(x[0])))
                out.append({
                    **rule_view(program, key, dr.key), "patterns": [p.text for p in dr.patterns],
                    "learned": [{"address": str(ip), "name": names.get((key, dr.key, ip)),
                                 "expires_in": round(t - now, 1), "expires": round(wall + t - now, 1)}
                                for ip, t in learned if t > now],
                })
            pods.append({"endpoint": key, "rules": out})
        return {"enabled": True, "pods": pods}


def rule_view(program: Program | None, endpoint: str, rule: str) -> dict[str, Any]:
    """A domainNames rule as `/dns` and `explain --to-name` name it (its IR rule's origin)."""
    r = find_rule(program, endpoint, rule)
    if r is None:  # not compiled yet (or gone): the learner's key is all there is
        return {"rule": rule, "policy": None, "tier": None, "priority": None, "ports": []}
    return {"rule": rule, "policy": str(r.origin), "tier": r.tier.value, "priority": r.origin.priority,
            "ports": [str(p) for p in r.ports]}


def find_rule(program: Program | None, endpoint: str, rule: str) -> Rule | None:
    ep = program.endpoints.get(endpoint) if program is not None else None
    if ep is None:
        return None
    key = learned_rule_key(rule, endpoint)
    return next((r for r in ep.egress.rules if r.key == key), None)
