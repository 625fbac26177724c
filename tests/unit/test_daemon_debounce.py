"""The daemon's leading-edge debounce: a lone event is applied at once, bursts are gathered.

Every wait is a condition with a deadline; the debounce is set to an hour so that a test
can only pass if the path it checks does not wait for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.daemon import Daemon
from agent.pipeline import Snapshot
from tests.kit import expect
from tests.kit.builders import pod, snapshot_of
from tests.kit.recording import RecordingDataplane

HOUR = 3600.0


class Pipeline:
    """A pipeline whose snapshot is whatever the test put last; `gate` can hold a sync."""

    name = "test"
    errors: dict[str, int] = {}

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.ready.set()
        self.gate = threading.Event()
        self.gate.set()
        self.in_snapshot = threading.Event()
        self.docs = [pod("a/x", "10.0.0.1")]
        self.calls = 0

    def snapshot(self) -> Snapshot:
        self.calls += 1
        self.in_snapshot.set()
        assert self.gate.wait(30)
        return snapshot_of(list(self.docs), node=None)

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        return lambda: None


@pytest.fixture
def running() -> Iterator[tuple[Daemon, Pipeline, RecordingDataplane]]:
    pipe, dp = Pipeline(), RecordingDataplane()
    daemon = Daemon(pipe, dp, debounce=HOUR, resync=HOUR, strict=False)  # type: ignore[arg-type]
    t = threading.Thread(target=daemon.run, daemon=True)
    t.start()
    try:
        expect(lambda: len(dp.programs) == 1, what="first sync")
        yield daemon, pipe, dp
    finally:
        pipe.gate.set()
        daemon.stop()
        t.join(10)
        assert not t.is_alive()


def test_isolated_event_is_applied_without_waiting_for_the_debounce(running) -> None:
    daemon, pipe, dp = running
    daemon._busy_until = time.monotonic() - 2 * HOUR  # the last sync was long ago: not a burst
    pipe.docs.append(pod("a/y", "10.0.0.2"))
    daemon.trigger()
    expect(lambda: len(dp.programs) == 2 and "a/y" in dp.programs[-1].endpoints, what="the event applied")


def test_events_during_a_sync_are_one_burst(running) -> None:
    """Events that arrive while a sync runs make the daemon gather (a burst), not sync at once."""
    daemon, pipe, dp = running
    daemon._busy_until = time.monotonic() - 2 * HOUR
    pipe.gate.clear()
    pipe.in_snapshot.clear()
    daemon.trigger()  # isolated: synced at once, and held in snapshot() by the gate
    assert pipe.in_snapshot.wait(10)
    for i in range(5):
        pipe.docs.append(pod(f"a/b{i}", f"10.0.1.{i}"))
        daemon.trigger()
    assert daemon.in_burst()  # came during the sync
    pipe.gate.set()
    expect(lambda: len(dp.programs) == 2, what="the held sync")
    # The five events are waiting out the (hour-long) debounce as one batch: stop ends it.
    assert daemon._pending_since is not None and daemon.in_burst()


def test_burst_rule() -> None:
    daemon = Daemon(Pipeline(), RecordingDataplane(), debounce=HOUR)  # type: ignore[arg-type]
    assert not daemon.in_burst()  # nothing pending
    daemon._busy_until = time.monotonic() - 2 * HOUR
    daemon.trigger()
    assert not daemon.in_burst()  # first event after a quiet spell: at once
    daemon._pending_since = None
    daemon._busy_until = time.monotonic()
    daemon.trigger()
    assert daemon.in_burst()  # right after a sync: gather
