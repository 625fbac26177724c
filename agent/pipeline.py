"""Source -> admission -> semantics: one function per source kind, shared by every command.

The simulator (`explain`, `matrix`) and the enforcer (`apply`, `run`) both get their
Program from here, so they can never disagree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.admission import LastGood, kubernetes_inventory
from agent.dataplane.base import DataplaneError
from agent.inventory import Inventory, ObjectRef, Problem
from agent.ir import Program
from agent.policy.kubernetes import compile_inventory
from agent.sources.files import DirectorySource
from agent.sources.kubeobjects import RawObject

log = logging.getLogger(__name__)
MAX_SETTLE_WAITS = 20  # a file rewritten non-stop keeps its last settled version


@dataclass
class Snapshot:
    inventory: Inventory
    program: Program

    @property
    def problems(self) -> list[Problem]:
        return self.inventory.problems


class DirectoryPipeline:
    """A manifest directory compiled for one node (or every node when node is None).

    With a state file, a second file beside it (`<state>.files.json`) records which
    objects each manifest file held: a file that does not parse in a new process (a
    one-shot `apply`, a restart) keeps those objects, in their last good versions, as
    it would within one process. Only names are recorded; bodies come from the store.
    """

    def __init__(
        self, path: str | Path, node: str | None, state_file: Path | None = None, readonly: bool = False
    ) -> None:
        self.source = DirectorySource(path)
        self.node = node
        self.store = LastGood(state_file, readonly=readonly)
        self.errors = self.source.errors
        self.readonly = readonly
        self.index_file = state_file.with_name(state_file.stem + ".files.json") if state_file else None
        self._index: dict[str, list[list[str]]] = {}
        if self.index_file is not None and self.index_file.exists():
            try:
                self._index = json.loads(self.index_file.read_text())
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable state file %s: %s", self.index_file, e)
        self.source.fallback = self._held_before

    def _held_before(self, path: Path) -> list[RawObject]:
        held = self._index.get(os.path.abspath(path), []) if isinstance(self._index, dict) else []
        out = []
        for key in held if isinstance(held, list) else []:
            if not (isinstance(key, list) and len(key) == 3 and all(isinstance(k, str) for k in key)):
                continue
            ref = ObjectRef(key[0], key[1], key[2], self.source.name, str(path))
            body = self.store.get(ref)
            if body is not None:
                out.append(RawObject(ref, body))
        if out:
            log.warning("%s does not parse: keeping the %d objects it held before", path, len(out))
        return out

    def _save_index(self) -> None:
        index = {os.path.abspath(path): [[r.kind, r.namespace, r.name] for r in refs]
                 for path, refs in self.source.held().items()}
        if index == self._index:
            return
        self._index = index
        if self.index_file is None or self.readonly:
            return
        try:
            self.index_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.index_file.parent, prefix=".files-")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(index, f)
                os.replace(tmp, self.index_file)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:  # only a later process's fallback is lost: not worth failing the sync
            self._index = {}  # written again next time
            log.warning("cannot save %s: %s", self.index_file, e)

    def snapshot(self) -> Snapshot:
        objects, problems = self.source.read()
        for _ in range(MAX_SETTLE_WAITS):  # files being written right now: let them finish
            if not self.source.unsettled:
                break
            time.sleep(self.source.unsettled)
            objects, problems = self.source.read()
        inv = kubernetes_inventory(objects, self.store, problems)
        self._save_index()
        return Snapshot(inv, compile_inventory(inv, self.node, source=self.source.name))


# ------------------------------------------------------------------ Kubernetes API source
# Imports are local to keep the directory-only commands free of the kubernetes client.



class SourceNotSynced(DataplaneError):
    """The initial lists are not complete: nothing may reach the kernel yet.

    A DataplaneError so the daemon's loop keeps the previous kernel state and retries.
    """

    transient = True  # expected at start-up: logged, not alarmed


@dataclass
class KubernetesSnapshot(Snapshot):
    # Changes observed on the wire since the previous snapshot (agent.sources.kubernetes.Observed).
    events: list[Any] = field(default_factory=list)
    # This node's pod CIDRs (flag or node.spec.podCIDRs), for --unknown-endpoints=deny.
    pod_cidrs: tuple[Any, ...] = ()


class KubernetesPipeline:
    """The API server's Namespaces, Pods and NetworkPolicies compiled for one node.

    With a watching source, snapshot() waits (up to `sync_wait` seconds) for the initial
    lists and raises SourceNotSynced until they are in: a partial cluster view (say pods
    but no policies yet) must never reach the kernel. Without one (one-shot commands) it
    lists everything once.
    """

    def __init__(
        self,
        node: str | None,
        source: Any = None,
        state_file: Path | None = None,
        readonly: bool = False,
        sync_wait: float = 5.0,
        guard_unknown: bool = False,
        **source_options: Any,
    ) -> None:
        from agent.sources.kubernetes import KubernetesSource

        self.guard_unknown = guard_unknown  # --unknown-endpoints=deny
        self.source = source if source is not None else KubernetesSource(node=node, **source_options)
        self.node = node
        self.store = LastGood(state_file, readonly=readonly)
        self.errors = self.source.errors
        # The daemon's /readyz waits for this: every initial list (and the pod CIDRs, if
        # asked for) is in, so the first program reflects the whole cluster.
        self.ready = self.source.synced
        self.sync_wait = sync_wait

    def snapshot(self) -> KubernetesSnapshot:
        if not self.source.synced.is_set():
            if not self.source.watching:
                self.source.sync()
            elif not self.source.synced.wait(self.sync_wait):
                missing = [k for k, e in self.source.listed.items() if not e.is_set()]
                raise SourceNotSynced(
                    "kubernetes source not synced yet (waiting for "
                    + (", ".join(f"{k}s" for k in missing) or "the node's pod CIDRs") + ")"
                )
        objects, problems, events = self.source.read_with_events()
        inv = kubernetes_inventory(objects, self.store, problems)
        program = compile_inventory(inv, self.node, source=self.source.name)
        pod_cidrs = tuple(self.source.pod_cidrs or ())
        if self.guard_unknown:
            program = dataclasses.replace(program, guard=pod_cidrs)
        return KubernetesSnapshot(inv, program, events=events, pod_cidrs=pod_cidrs)


class EventLatency:
    """Event -> kernel latency: hook `observe` into Daemon.on_synced (runs after a successful apply).

    stockade_event_to_kernel_seconds: from a watch event read off the wire to the sync
    that put it in the kernel; stockade_pod_ip_to_kernel_seconds: the same for the event
    that first showed a pod's IP (the start-up window of --unknown-endpoints).
    """

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self, registry: Any = None, keep: int = 1000) -> None:
        import collections
        import time

        from prometheus_client import Histogram

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
        for ev in getattr(snap, "events", ()):
            if ev.type == "LIST":
                continue  # found by a list, not an event: its wait is the list's, not ours
            dt = now - ev.at
            self.event.labels(ev.ref.kind).observe(dt)
            self.samples.append((ev.ref.kind, ev.type, dt))
            if ev.new_ips:
                self.pod_ip.observe(dt)
                self.samples.append(("PodIP", ev.type, dt))
