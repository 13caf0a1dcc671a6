"""Structured logging: one line per event, ``key=value`` pairs after the event name.

Every line starts with the UTC time, level and logger, then the event name and
fields, so a line can be grepped by event and parsed by any logfmt reader::

    2026-11-21T12:00:00.000Z INFO sds.provider svid.issued spiffe_id=spiffe://td/web serial=ab..

With ``--log-format json`` the same events become one JSON object per line,
keys in a fixed order: ``ts``, ``level``, ``logger``, ``event``, then the
event's fields in the order logfmt has them, then ``exc`` for an error logged
with a traceback. Integers, finite floats and booleans stay JSON numbers and
booleans, ``None`` is ``null``, anything else is its ``str()``; a message not
logged through :func:`event` is the ``event`` value, without fields::

    {"ts": "2026-11-21T12:00:00.000Z", "level": "INFO", "logger": "sds.provider",
     "event": "svid.issued", "spiffe_id": "spiffe://td/web", "serial": "ab.."}

A field whose name is one of the four fixed keys is written with a leading
underscore (``_event``), so the fixed keys always mean the same thing.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["LOG_FORMATS", "configure_logging", "event"]

LOG_FORMATS = ("logfmt", "json")
_FIXED = ("ts", "level", "logger", "event")


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class _Logfmt:
    """An event's message, rendered to logfmt only if a handler asks for it."""

    __slots__ = ("fields", "name")

    def __init__(self, name: str, fields: Mapping[str, Any]) -> None:
        self.name = name
        self.fields = fields

    def __str__(self) -> str:
        pairs = " ".join(f"{key}={_quote(value)}" for key, value in self.fields.items())
        return f"{self.name} {pairs}" if pairs else self.name


def event(
    logger: logging.Logger,
    level: int,
    name: str,
    /,
    *,
    exc_info: BaseException | None = None,
    **fields: Any,
) -> None:
    """Log event ``name`` with ``fields`` as one line, if ``level`` is enabled.

    With ``exc_info`` (at ``ERROR`` and above) the line ends with that exception's
    traceback as the ``exc`` field, still one line.
    """
    if logger.isEnabledFor(level):
        logger.log(level, _Logfmt(name, fields), exc_info=exc_info)


def _stamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_stamp(record)} {record.levelname} {record.name} "
        line += record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            line += " exc=" + _quote(self.formatException(record.exc_info))
        return line


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return str(value)


class _JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": _stamp(record),
            "level": record.levelname,
            "logger": record.name,
        }
        if isinstance(record.msg, _Logfmt) and not record.args:
            doc["event"] = record.msg.name
            for key, value in record.msg.fields.items():
                doc["_" + key if key in _FIXED else key] = _json_value(value)
        else:
            doc["event"] = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, allow_nan=False, default=str)


def configure_logging(level: str = "INFO", fmt: str = "logfmt") -> None:
    """Send ``sds.*`` logs to stderr at ``level``, as logfmt lines or JSON objects (``fmt``)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: want one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _Formatter())
    root = logging.getLogger("sds")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
