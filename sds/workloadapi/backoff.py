"""Exponential backoff with full jitter, for reconnecting to a Workload API."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Exponential backoff with full jitter.

    Attempt ``n`` (counting from 1 after the last :meth:`reset`) waits a uniform
    random time in ``[0, min(maximum, initial * 2**(n-1))]``.
    """

    def __init__(
        self, initial: float, maximum: float, rng: Callable[[], float] = random.random
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {initial}, {maximum}")
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0
        self._rng = rng

    def ceiling(self) -> float:
        """The upper bound of the current attempt's delay."""
        exponent = min(max(self.attempt - 1, 0), 64)
        return float(min(self.maximum, self.initial * 2**exponent))

    def next_delay(self) -> float:
        """Count one more failed attempt and return how long to wait before the next."""
        self.attempt += 1
        return self._rng() * self.ceiling()

    def reset(self) -> None:
        """Start over from ``initial`` (after a good message)."""
        self.attempt = 0
