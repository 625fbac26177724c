"""Fixtures shared by every test: the namespace lab and the dataplane parameter (the
helpers behind them live in the kit, tests/kit/privileges.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit import Lab
from tests.kit.privileges import DATAPLANES, dataplane_env, private_bpffs, require_privileges


@pytest.fixture(params=DATAPLANES)
def dataplane(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with dataplane_env(request.param, tmp_path.name) as name:
        yield name


@pytest.fixture
def pin_root(tmp_path: Path) -> Iterator[str]:
    with private_bpffs(tmp_path.name) as pins:
        yield pins


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_privileges()
    with Lab() as lab:
        yield lab
