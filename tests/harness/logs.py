"""Reading what ``sds`` logs in a test: records kept from one logger, tracebacks watched for."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def captured_log(logger_name: str, keep: Callable[[logging.LogRecord], T]) -> Iterator[list[T]]:
    """``keep(record)`` for every record logged on ``logger_name`` (DEBUG and up) in the block.

    A handler on the logger itself, so it sees records whatever the propagation settings.
    """
    records: list[T] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(keep(record))

    log = logging.getLogger(logger_name)
    handler = Collect(logging.DEBUG)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


@contextlib.contextmanager
def watched_logs() -> Iterator[Callable[[], list[str]]]:
    """Log records with a traceback, or grpclib's "Application error", on the provider's,
    grpclib's and asyncio's loggers (so far).

    Meanwhile the records reach no other handler: pytest's capture keeps every record of a
    test (~7,000 here, ~4 kB each), which would hide what the provider keeps.
    """

    def keep(record: logging.LogRecord) -> str | None:
        message = record.getMessage()
        if record.exc_info or "Traceback" in message or "Application error" in message:
            return f"{record.name}: {message}"
        return None

    loggers = [logging.getLogger(name) for name in ("sds", "grpclib", "asyncio")]
    saved = [(log.handlers[:], log.propagate) for log in loggers]
    with contextlib.ExitStack() as stack:
        found = []
        for log in loggers:
            log.handlers[:] = []  # pytest's capture handlers, when attached here
            found.append(stack.enter_context(captured_log(log.name, keep)))
            log.propagate = False
        try:
            yield lambda: [line for lines in found for line in lines if line is not None]
        finally:
            for log, (handlers, propagate) in zip(loggers, saved, strict=True):
                log.handlers[:], log.propagate = handlers, propagate
