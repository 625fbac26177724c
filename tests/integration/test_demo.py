"""`make demo` on examples/: the shipped examples are valid and the kernel agrees with matrix."""

from __future__ import annotations

from tests.kit.demo import main
from tests.kit.privileges import ROOT_EXAMPLES, require_privileges


def test_demo_on_examples_agrees() -> None:
    require_privileges()
    assert main(str(ROOT_EXAMPLES)) == 0
