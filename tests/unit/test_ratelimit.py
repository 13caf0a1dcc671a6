"""RateLimiter: a burst per key and interval, the rest counted and reported once."""

from __future__ import annotations

from sds._util.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_suppressed_count_reported_with_the_next_allowed_event() -> None:
    clock = Clock()
    limiter = RateLimiter(2, 10.0, clock=clock)
    assert [limiter.allow("k") for _ in range(5)] == [
        (True, 0),
        (True, 0),
        (False, 0),
        (False, 0),
        (False, 0),
    ]
    clock.now = 10.0  # a new window: the three dropped events are reported once
    assert limiter.allow("k") == (True, 3)
    assert limiter.allow("k") == (True, 0)
    assert limiter.allow("other") == (True, 0)  # keys are independent


def test_flush_reports_what_was_never_reported_and_forgets_the_key() -> None:
    limiter = RateLimiter(1, 60.0, clock=Clock())
    limiter.allow(("sds.nack", 7))
    limiter.allow(("sds.nack", 7))
    limiter.allow(("sds.nack", 7))
    assert len(limiter) == 1
    assert limiter.flush(("sds.nack", 7)) == 2
    assert len(limiter) == 0
    assert limiter.flush(("sds.nack", 7)) == 0


def test_keys_beyond_the_cap_share_one_overflow_key() -> None:
    limiter = RateLimiter(1, 60.0, max_keys=2, clock=Clock())
    assert limiter.allow("a") == (True, 0)
    assert limiter.allow("b") == (True, 0)
    assert limiter.allow("c") == (True, 0)  # the overflow key's first event
    assert limiter.allow("d") == (False, 0)  # shares it with "c"
    assert len(limiter) == 3
