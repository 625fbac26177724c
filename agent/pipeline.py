"""Source -> admission -> semantics: one function per source kind, shared by every command.

The simulator (`explain`, `matrix`) and the enforcer (`apply`, `run`) both get their
Program from here, so they can never disagree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from agent.admission import LastGood, kubernetes_inventory
from agent.inventory import Inventory, Problem
from agent.ir import Program
from agent.policy.kubernetes import compile_inventory
from agent.sources.files import DirectorySource

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    inventory: Inventory
    program: Program

    @property
    def problems(self) -> list[Problem]:
        return self.inventory.problems


class DirectoryPipeline:
    """A manifest directory compiled for one node (or every node when node is None)."""

    def __init__(
        self, path: str | Path, node: str | None, state_file: Path | None = None, readonly: bool = False
    ) -> None:
        self.source = DirectorySource(path)
        self.node = node
        self.store = LastGood(state_file, readonly=readonly)

    def snapshot(self) -> Snapshot:
        objects, problems = self.source.read()
        inv = kubernetes_inventory(objects, self.store, problems)
        return Snapshot(inv, compile_inventory(inv, self.node, source=self.source.name))
