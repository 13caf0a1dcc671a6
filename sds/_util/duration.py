"""Go-style durations (``30s``, ``5m``, ``1h30m``, ``1.5h``, ``500ms``): the one parser.

Used by the provider's identities files (``maximum_ttl``) and the bridge config
(``failover.grace``, ``upstream_backoff``, ``jwt_svids.idle_timeout``).
"""

from __future__ import annotations

import datetime as dt
import math
import re

from sds._util.text import show

__all__ = ["MAX_DURATION", "parse_duration"]

#: The longest duration :func:`parse_duration` accepts (ten years): longer than any
#: lifetime we issue, and keeps datetime arithmetic in range.
MAX_DURATION = dt.timedelta(days=3650)

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def _seconds(text: str) -> float | None:
    """The seconds ``text`` spells as a sequence of ``NUMBER UNIT`` parts; None if it does not.

    Units: ``h``, ``m``, ``s``, ``ms``. No sign, no spaces; the sum may be 0 or
    infinite (range checks are the caller's).
    """
    if not isinstance(text, str) or not text:
        return None
    seconds = 0.0
    position = 0
    for match in _PART.finditer(text):
        if match.start() != position:
            return None
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    return seconds if position == len(text) else None


def parse_duration(text: str, maximum: dt.timedelta = MAX_DURATION) -> dt.timedelta:
    """Parse a positive Go-style duration of at most ``maximum``.

    Raises ValueError with a message suitable after a field name.
    """
    seconds = _seconds(text)
    if seconds is None:
        raise ValueError(f"invalid duration {show(text)} (want e.g. 30s, 5m, 1h30m)")
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    if not math.isfinite(seconds) or seconds > maximum.total_seconds():
        raise ValueError(
            f"duration {show(text)} is longer than {int(maximum.total_seconds()) // 3600}h"
        )
    return dt.timedelta(seconds=seconds)
