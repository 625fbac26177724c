"""Source -> admission -> semantics: one pipeline per source kind, shared by every command.

The simulator (`explain`, `matrix`) and the enforcer (`apply`, `run`) both get their
Program from here, so they can never disagree. Every pipeline implements `Pipeline`;
the daemon and the CLI know nothing else of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.admission import LastGood, kubernetes_inventory
from agent.inventory import Inventory, ObjectRef, Problem
from agent.ir import Program
from agent.policy.kubernetes import compile_inventory
from agent.sources.files import DirectorySource
from agent.sources.kubeobjects import RawObject

if TYPE_CHECKING:
    from agent.sources.kubernetes import Observed

log = logging.getLogger(__name__)
MAX_SETTLE_WAITS = 20  # a file rewritten non-stop keeps its last settled version


@dataclass
class Snapshot:
    """What a pipeline hands the daemon: the admitted inventory and its compiled Program.

    Every pipeline fills every field (empty where it has nothing), so the daemon and its
    hooks never ask which source they are running.
    """

    inventory: Inventory
    program: Program
    # Changes observed on the wire since the previous snapshot, for the event -> kernel
    # latency histograms (agent.metrics.EventLatency); only watch streams have them.
    events: Sequence[Observed] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        return self.inventory.problems


class PipelineError(Exception):
    """A snapshot could not be made. The daemon keeps the kernel's state and retries."""

    transient = False  # True: expected (e.g. at start-up), logged at info, not as an error


class SourceNotSynced(PipelineError):
    """The initial lists are not complete: nothing may reach the kernel yet."""

    transient = True


class Pipeline(Protocol):
    """What the daemon and the CLI need of a source's pipeline."""

    name: str                     # the source's name: "file" | "kubernetes" | "netbird" (metrics, origins)
    errors: Mapping[str, int]     # source fault cause -> occurrences (stockade_source_errors_total)
    ready: threading.Event        # set once a complete view can be compiled; set at once for the directory
    def snapshot(self) -> Snapshot: ...   # the current Program; raises SourceNotSynced (transient) while not ready
    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]: ...  # start watching; returns stop()


def compile_kubernetes(
    objects: Iterable[RawObject],
    store: LastGood,
    node: str | None,
    source: str,
    problems: Iterable[Problem] = (),
) -> Snapshot:
    """Kubernetes objects (Pods, Namespaces, NetworkPolicies) -> admission -> the Program for `node`.

    `problems` are the source's own (unreadable files, ...); admission adds its rejections.
    """
    inv = kubernetes_inventory(objects, store, list(problems))
    return Snapshot(inv, compile_inventory(inv, node, source=source))


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
        self.name = self.source.name
        self.node = node
        self.store = LastGood(state_file, readonly=readonly)
        self.errors = self.source.errors
        self.ready = threading.Event()
        self.ready.set()  # every read is a complete view
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
        snap = compile_kubernetes(objects, self.store, self.node, self.name, problems)
        self._save_index()
        return snap

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        return self.source.watch(on_change)


# ------------------------------------------------------------------ Kubernetes API source
# Imports are local to keep the directory-only commands free of the kubernetes client.


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
        self.name = self.source.name
        self.store = LastGood(state_file, readonly=readonly)
        self.errors = self.source.errors
        # The daemon's /readyz waits for this: every initial list (and the pod CIDRs, if
        # asked for) is in, so the first program reflects the whole cluster.
        self.ready = self.source.synced
        self.sync_wait = sync_wait

    def snapshot(self) -> Snapshot:
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
        snap = compile_kubernetes(objects, self.store, self.node, self.name, problems)
        snap.events = events
        if self.guard_unknown:  # this node's pod CIDRs (flag or node.spec.podCIDRs)
            snap.program = dataclasses.replace(snap.program, guard=tuple(self.source.pod_cidrs or ()))
        return snap

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        return self.source.watch(on_change)

