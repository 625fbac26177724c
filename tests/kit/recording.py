"""A dataplane that records the programs the daemon applies (no kernel): for pipeline and
daemon tests."""

from __future__ import annotations

from agent.dataplane.base import ApplyStats, Counters, Dataplane
from agent.ir import Program


class RecordingDataplane(Dataplane):
    """Stands in for the kernel: keeps the last program applied."""

    name = "recording"

    def __init__(self) -> None:
        self.programs: list[Program] = []

    def render(self, program: Program) -> str:
        return ""

    def apply(self, program: Program) -> ApplyStats:
        self.programs.append(program)
        return ApplyStats(full=len(self.programs) == 1, commands=0)

    def counters(self, program: Program | None = None) -> Counters:
        return Counters()

    def cleanup(self) -> None:
        pass
