"""Fixtures shared by every test: the namespace lab and the dataplane parameter."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.lab import ROOT, Lab

ROOT_EXAMPLES = ROOT / "examples"

# Every packet test runs once per dataplane; one suite, not a copy per backend.
DATAPLANES = ["nftables"]


def require_privileges() -> None:
    """Privileged tests fail (not skip) when the machine cannot run them: CI must see it."""
    if os.geteuid() != 0:
        pytest.fail("packet tests need root (network namespaces, nftables)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            pytest.fail(f"packet tests need `{tool}`: run `make setup`")


@pytest.fixture(params=DATAPLANES)
def dataplane(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_privileges()
    with Lab() as lab:
        yield lab
