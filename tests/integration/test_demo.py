"""`make demo` on examples/: the shipped examples are valid and the kernel agrees with matrix,
on both dataplanes."""

from __future__ import annotations

import pytest

from tests.kit.demo import main
from tests.kit.privileges import DATAPLANES, ROOT_EXAMPLES, require_privileges


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_demo_on_examples_agrees(dataplane: str) -> None:
    require_privileges()
    assert main(str(ROOT_EXAMPLES), dataplane) == 0
