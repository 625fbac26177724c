"""Source -> admission -> semantics: one pipeline per source kind, shared by every command.

The simulator (`explain`, `matrix`) and the enforcer (`apply`, `run`) both get their
Program from here, so they can never disagree. Every pipeline implements `Pipeline`;
the daemon and the CLI know nothing else of them.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.admission import KubernetesAdmission, LastGood, kubernetes_inventory
from agent.admission.netbird import AccountStore, admit_account, check_complete, local_peer
from agent.inventory import Inventory, IPAddress, ObjectRef, Problem, RawPolicy
from agent.ir import Network, Program
from agent.policy import netbird as nb
from agent.policy.kubernetes import compile_inventory
from agent.policy.kubernetes.incremental import IncrementalCompiler
from agent.sources.files import DirectorySource
from agent.sources.kubeobjects import RawObject
from agent.sources.netbird import DEFAULT_INTERVAL as NETBIRD_INTERVAL
from agent.sources.netbird import DEFAULT_URL as NETBIRD_URL
from agent.sources.netbird import (
    Faults,
    FetchError,
    NetbirdClient,
    NetbirdSource,
    Poller,
    RawAccount,
    interface_addresses,
    load_token,
)
from agent.statefile import write_json, write_text

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
    # Called by the daemon once the kernel holds (or failed to take) this program: work the
    # pipeline put off until then (the state file's background write, see LastGood.hold).
    applied: Callable[[], None] = field(default=lambda: None, compare=False, repr=False)

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
    compiler: IncrementalCompiler | None = None,
) -> Snapshot:
    """Kubernetes objects (Pods, Namespaces, NetworkPolicies) -> admission -> the Program for `node`.

    `problems` are the source's own (unreadable files, ...); admission adds its rejections.
    A `compiler` kept by the caller (for this node and source) makes each call cost what
    changed since the previous one; without one every call compiles everything.
    """
    inv = kubernetes_inventory(objects, store, list(problems))
    if compiler is not None:
        return Snapshot(inv, compiler.compile(inv))
    return Snapshot(inv, compile_inventory(inv, node, source=source))


def _holding_writes(store: LastGood, make: Callable[[], Snapshot]) -> Snapshot:
    """make(), the state file's background writes (the daemon's) held until the daemon calls
    the snapshot's `applied` (or released at once if make() fails): the first write of a
    cold start encodes every object (~0.1 s at 10k pods) and must not delay the kernel."""
    if not store.background:
        return make()
    store.hold()
    try:
        snap = make()
    except BaseException:
        store.release()
        raise
    snap.applied = store.release
    return snap


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection during a sync: a cold sync builds millions of
    long-lived containers (parsed manifests, endpoints, prefixes), and each full collection
    they set off walks all of them again (~40% of a cold start at 10k pods). What a sync
    drops is freed by reference counting; cycles wait for the next collection after it.
    Ends enabled if any overlapping caller found it enabled."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


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
        self.admission = KubernetesAdmission(self.store)
        self.compiler = IncrementalCompiler(node, self.name)
        self.errors = self.source.errors
        self.ready = threading.Event()
        self.ready.set()  # every read is a complete view
        self.readonly = readonly
        self.index_file = state_file.with_name(state_file.stem + ".files.json") if state_file else None
        self._index: dict[str, list[list[str]]] = {}
        # what _save_index last wrote: each file's object list and its `"path": [refs]` text
        self._index_lists: dict[Path, list[RawObject]] = {}
        self._index_texts: dict[Path, tuple[list[RawObject], list[list[str]], str]] = {}
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
        """Write which objects each file holds, when that changed: only the entries of files
        whose object lists changed are encoded again (a file's list is the same object
        while the file is unchanged)."""
        lists = self.source.lists()
        if lists.keys() == self._index_lists.keys() and all(
                lists[p] is old for p, old in self._index_lists.items()):
            return
        texts: dict[Path, tuple[list[RawObject], list[list[str]], str]] = {}
        for path, objs in lists.items():
            hit = self._index_texts.get(path)
            if hit is None or hit[0] is not objs:
                refs = [[o.ref.kind, o.ref.namespace, o.ref.name] for o in objs]
                if hit is not None and hit[1] == refs:
                    hit = (objs, hit[1], hit[2])  # parsed again, the same objects
                else:
                    hit = (objs, refs, f"{json.dumps(os.path.abspath(path))}: {json.dumps(refs)}")
            texts[path] = hit
        unchanged = texts.keys() == self._index_texts.keys() and all(
            texts[p][2] is t for p, (_, _, t) in self._index_texts.items())
        self._index = {os.path.abspath(p): refs for p, (_, refs, _) in texts.items()}
        self._index_lists, self._index_texts = dict(lists), texts
        if unchanged or self.index_file is None or self.readonly:
            return
        try:
            write_text(self.index_file, lambda f: f.write("{" + ", ".join(t for _, _, t in texts.values()) + "}"),
                       prefix=".files-")
        except OSError as e:  # only a later process's fallback is lost: not worth failing the sync
            self._index_lists, self._index_texts = {}, {}  # written again next time
            log.warning("cannot save %s: %s", self.index_file, e)

    def snapshot(self) -> Snapshot:
        return _holding_writes(self.store, self._snapshot)

    @gc_paused()
    def _snapshot(self) -> Snapshot:
        _, problems = self.source.read()
        for _ in range(MAX_SETTLE_WAITS):  # files being written right now: let them finish
            if not self.source.unsettled:
                break
            time.sleep(self.source.unsettled)
            _, problems = self.source.read()
        objects, changed = self.source.changes()
        inv = self.admission.update(objects, changed, problems)
        snap = Snapshot(inv, self.compiler.compile(inv, self.admission.touched))
        self._save_index()
        return snap

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        self.store.background = True  # the daemon: the state file is written off the event path
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
        self.admission = KubernetesAdmission(self.store)
        self.compiler = IncrementalCompiler(node, self.name)
        self.errors = self.source.errors
        # The daemon's /readyz waits for this: every initial list (and the pod CIDRs, if
        # asked for) is in, so the first program reflects the whole cluster.
        self.ready = self.source.synced
        self.sync_wait = sync_wait

    def snapshot(self) -> Snapshot:
        return _holding_writes(self.store, self._snapshot)

    @gc_paused()
    def _snapshot(self) -> Snapshot:
        if not self.source.synced.is_set():
            if not self.source.watching:
                self.source.sync()
            elif not self.source.synced.wait(self.sync_wait):
                missing = [k for k, e in self.source.listed.items() if not e.is_set()]
                raise SourceNotSynced(
                    "kubernetes source not synced yet (waiting for "
                    + (", ".join(f"{k}s" for k in missing) or "the node's pod CIDRs") + ")"
                )
        objects, changed, events = self.source.read_changes()
        inv = self.admission.update(objects, changed)
        snap = Snapshot(inv, self.compiler.compile(inv, self.admission.touched), events)
        if self.guard_unknown:  # this node's pod CIDRs (flag or node.spec.podCIDRs)
            snap.program = dataclasses.replace(snap.program, guard=tuple(self.source.pod_cidrs or ()))
        return snap

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        self.store.background = True  # the daemon: the state file is written off the event path
        return self.source.watch(on_change)



# ------------------------------------------------------------------ NetBird management API


@dataclass
class _Fetched:
    """One poll's answer: the account and the local interface's addresses (or why not)."""

    raw: RawAccount
    addresses: list[IPAddress] | FetchError | None  # None: the peer id is given


class NetbirdPipeline:
    """The NetBird account (source -> admission -> semantics) for the local peer.

    `snapshot()` compiles, on the caller's thread, the last account fetched (fetching it
    first when nobody is watching); before the first good state it returns the bootstrap
    program (inbound on the interface denied). `watch` starts the poll thread, which only
    fetches: every `interval` seconds (+-jitter), backing off exponentially on faults,
    calling back when the answer changed or a fault is pending. Faults (fetch, partial
    view, local peer) keep the last good state and are counted in `errors`.
    """

    name = "netbird"

    def __init__(
        self,
        source: NetbirdSource,
        *,
        peer_id: str | None = None,
        interface: str = nb.DEFAULT_INTERFACE,
        ranges: Sequence[Network] = nb.DEFAULT_RANGES,
        inbound_only: bool = False,
        interval: float = NETBIRD_INTERVAL,
        jitter: float = 0.1,
        max_backoff: float = 300.0,
        state_file: Path | None = None,
        address_lookup: Callable[[str], list[IPAddress]] = interface_addresses,
        readonly: bool = False,
    ) -> None:
        self.source = source
        self.peer_id = peer_id
        self.interface = interface
        self.ranges = tuple(ranges)
        self.inbound_only = inbound_only
        self.state_file = state_file
        self.readonly = readonly  # explain/matrix read the enforcer's state, never write it
        self.address_lookup = address_lookup
        self.store = AccountStore()  # per-object last good versions (in memory; saved with the state)
        self.faults = Faults()
        self.poller = Poller(self.faults, interval, jitter, max_backoff)  # the poll thread: fetches only
        self.errors = self.faults.errors  # fault cause -> occurrences
        self.polls = self.faults.polls  # "success" | "error"
        self.ready = threading.Event()  # set at the first good state (API or state file)
        self._lock = threading.RLock()  # the poll thread hands fetches to the compiling thread
        self._snapshot = Snapshot(nb.account_inventory(nb.Account(), ""), nb.bootstrap_program(interface))
        self._watching = False
        self._pending: _Fetched | None = None  # fetched, not compiled yet
        self._last_fetched: _Fetched | None = None
        self._local_id: str | None = peer_id
        self._warned: set[str] = set()
        self._load_state()

    @property
    def last_error(self) -> FetchError | None:
        return self.faults.last_error

    # ------------------------------------------------------------ state file

    def _load_state(self) -> None:
        """The state saved by a previous run, so a restart with the API down does not fall
        back to the bootstrap program — and enforces exactly what that run enforced: the
        saved answer is admitted again against the saved last good versions."""
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            data = json.loads(self.state_file.read_text())
            raw = RawAccount.from_json(data["account"])
            last_good = data.get("last_good", {})
            if not isinstance(last_good, dict) or not all(
                    isinstance(k, str) and isinstance(v, Mapping) for k, v in last_good.items()):
                raise ValueError("last_good is not a map of objects")
            self.store.replace(last_good)
            snap = self._build(_Fetched(raw, self._addresses()), data.get("local_peer"))
        except (OSError, ValueError, KeyError, TypeError, FetchError) as e:
            self.store = AccountStore()
            log.warning("ignoring unusable NetBird state file %s: %s: %s", self.state_file, type(e).__name__, e)
            return
        self._snapshot = snap
        self.ready.set()
        log.info("NetBird: enforcing the state saved in %s until the API answers", self.state_file)

    def _save_state(self, raw: RawAccount, local: str) -> None:
        """The admitted state: the answer and the last good versions admission kept (after
        this answer was admitted), from which _load_state rebuilds the same program."""
        if self.state_file is None or self.readonly:
            return
        try:
            write_json(self.state_file, {"account": raw.to_json(), "last_good": self.store.kept, "local_peer": local},
                       prefix=".netbird-")
        except (OSError, TypeError, ValueError) as e:
            log.warning("cannot save NetBird state to %s: %s", self.state_file, e)

    # ------------------------------------------------------------ fetch (any thread) and compile

    def _addresses(self) -> list[IPAddress] | FetchError | None:
        if self.peer_id is not None:
            return None
        try:
            return self.address_lookup(self.interface)
        except FetchError as e:
            return e

    def _fetch(self) -> _Fetched:
        raw = self.source.fetch()
        return _Fetched(raw, self._addresses())

    def _build(self, fetched: _Fetched, saved_local: str | None = None) -> Snapshot:
        check_complete(fetched.raw)
        problems: list[Problem] = []
        account, policy_objs = admit_account(fetched.raw, self.store, self.source.client.location, problems)
        local = local_peer(account, self.interface, self.peer_id, fetched.addresses, saved_local or self._local_id)
        compiled = nb.compile_account(account, local, interface=self.interface, ranges=self.ranges,
                                      inbound_only=self.inbound_only)
        inv = nb.account_inventory(account, local, self.interface, problems)
        for obj in policy_objs:
            inv.policies[obj.ref.key] = RawPolicy(obj.ref, obj.body)
        inv.context["netbird.warnings"] = compiled.warnings
        self._report_warnings(compiled.warnings)
        self._local_id = local
        return Snapshot(inv, compiled.program)

    def _report_warnings(self, warnings: list[Problem]) -> None:
        now = {str(w) for w in warnings}
        for text in sorted(now - self._warned):
            log.warning("NetBird policy warning: %s", text)
        self._warned = now

    def _failed(self, e: FetchError) -> None:
        kept = "last good state stays in force" if self.ready.is_set() else \
            "inbound on " + self.interface + " stays denied (no good state yet)"
        self.faults.failed(e, kept)

    def _apply(self, fetched: _Fetched) -> bool:
        """Admit and compile one fetched answer. True if the state changed."""
        try:
            snap = self._build(fetched)
        except FetchError as e:
            self._failed(e)
            return False
        self.faults.succeeded()
        self._save_state(fetched.raw, snap.inventory.context[nb.CTX_LOCAL_PEER])
        old, self._snapshot = self._snapshot, snap
        first = not self.ready.is_set()
        self.ready.set()
        return first or old.program != snap.program or [str(p) for p in old.problems] != [
            str(p) for p in snap.problems
        ]

    def refresh(self) -> bool:
        """Fetch and compile once, on this thread. True if the state changed."""
        with self._lock:
            try:
                fetched = self._fetch()
            except FetchError as e:
                self._failed(e)
                return False
            return self._apply(fetched)

    def snapshot(self) -> Snapshot:
        with self._lock:
            if not self._watching:
                self.refresh()
            elif self._pending is not None:
                fetched, self._pending = self._pending, None
                try:
                    self._apply(fetched)
                except Exception:  # a bug must not end enforcement: the last good state stays
                    log.exception("NetBird compile failed unexpectedly; last good state stays")
                    self.faults.internal()
            return self._snapshot

    @property
    def program(self) -> Program:
        with self._lock:
            return self._snapshot.program

    def next_delay(self, failures: int) -> float:
        """Seconds until the next poll (the poller's)."""
        return self.poller.next_delay(failures)

    def _poll(self) -> bool:
        """Fetch once (poll thread). True if the daemon should compile."""
        try:
            fetched = self._fetch()
        except FetchError as e:
            with self._lock:
                self._failed(e)
            return False
        with self._lock:
            # A pending fault (fetch or compile) is retried and counted on every poll.
            changed = fetched != self._last_fetched or self.last_error is not None
            self._last_fetched = fetched
            if changed:
                self._pending = fetched
            return changed

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        self._watching = True
        stop = self.poller.start(self._poll, on_change)

        def stop_watch() -> None:
            stop()
            self._watching = False

        return stop_watch


def make_netbird_pipeline(
    url: str = NETBIRD_URL,
    token_file: str | None = None,
    ca_file: str | None = None,
    **kwargs: Any,
) -> NetbirdPipeline:
    """Everything the CLI needs in one call; raises TokenError / ValueError on bad config."""
    client = NetbirdClient(url, load_token(token_file), ca_file=ca_file)
    return NetbirdPipeline(NetbirdSource(client), **kwargs)
