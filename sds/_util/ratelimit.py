"""Log rate limiting: at most a few lines per key and interval, and a count of the rest.

A client that speaks the protocol badly must not be able to turn the log into
its amplifier (one line per name in a 100,000-name request, one per NACK in a
NACK storm). Each key (typically ``(event, stream id)`` or ``(event,)``) gets
``burst`` lines per ``interval`` seconds; lines over that are counted, and the
count is handed back with the next line that is allowed, or by :meth:`flush`
when the key's owner (a stream) goes away, so the log says "N more
suppressed" instead of going silent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

__all__ = ["RateLimiter"]


class RateLimiter:
    """Admits ``burst`` events per key per ``interval`` seconds and counts the rest.

    Memory is bounded by the number of live keys: callers :meth:`flush` a key
    when its owner ends, and at most ``max_keys`` keys are tracked, plus one
    overflow key that every further key shares (so those are limited together).
    """

    OVERFLOW: Hashable = ("_overflow",)

    def __init__(
        self,
        burst: int = 5,
        interval: float = 60.0,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        # key -> [window start, admitted in this window, suppressed since the last admitted]
        self._state: dict[Hashable, list[float]] = {}

    def allow(self, key: Hashable) -> tuple[bool, int]:
        """Whether to log this event now, and how many were suppressed before it.

        The count is non-zero only when the event is allowed; it is the number
        of events dropped for ``key`` since the last allowed one, so the caller
        can add ``suppressed=N`` to the line it writes.
        """
        now = self._clock()
        state = self._state.get(key)
        if state is None:
            if len(self._state) >= self.max_keys:
                key = self.OVERFLOW
                state = self._state.get(key)
            if state is None:
                state = self._state[key] = [now, 0.0, 0.0]
        if now - state[0] >= self.interval:
            state[0], state[1] = now, 0.0
        if state[1] < self.burst:
            state[1] += 1
            suppressed = int(state[2])
            state[2] = 0.0
            return True, suppressed
        state[2] += 1
        return False, 0

    def flush(self, key: Hashable) -> int:
        """Forget ``key``; return how many of its events were suppressed and never reported."""
        state = self._state.pop(key, None)
        return int(state[2]) if state is not None else 0

    def __len__(self) -> int:
        return len(self._state)
