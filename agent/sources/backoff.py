"""One retry backoff for every source: exponential, capped, jittered."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Exponential backoff, d = min(cap, base * 2**n) after the n-th consecutive fault.

    Jitter is equal jitter (delay in [d/2, d]) by default, or, with `spread`, d scaled
    by a factor in [1 - spread, 1 + spread] (NetBird's polling).
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: Callable[[], float] = random.random,
                 spread: float | None = None) -> None:
        self.base, self.cap, self.rng, self.spread = base, cap, rng, spread
        self.failures = 0

    def delay(self, n: int) -> float:
        """The delay after the (n+1)-th consecutive fault; does not count it."""
        d = min(self.cap, self.base * (2**n))
        if self.spread is None:
            return d / 2 + self.rng() * d / 2
        return d * (1 + self.spread * (2 * self.rng() - 1))

    def next(self) -> float:
        d = self.delay(self.failures)
        self.failures += 1
        return d

    def reset(self) -> None:
        self.failures = 0
