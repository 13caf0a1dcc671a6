"""Structured logging: one line per event, ``key=value`` pairs after the event name.

Every line starts with the UTC time, level and logger, then the event name and
fields, so a line can be grepped by event and parsed by any logfmt reader::

    2026-11-21T12:00:00.000Z INFO sds.provider svid.issued spiffe_id=spiffe://td/web serial=ab..
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

__all__ = ["configure_logging", "event"]


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(logger: logging.Logger, level: int, name: str, /, **fields: Any) -> None:
    """Log event ``name`` with ``fields`` as one logfmt line, if ``level`` is enabled."""
    if logger.isEnabledFor(level):
        pairs = " ".join(f"{key}={_quote(value)}" for key, value in fields.items())
        logger.log(level, "%s %s", name, pairs) if pairs else logger.log(level, "%s", name)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {record.name} "
        line += record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            line += " exc=" + _quote(self.formatException(record.exc_info))
        return line


def configure_logging(level: str = "INFO") -> None:
    """Send ``sds.*`` logs to stderr in the structured format, at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("sds")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
