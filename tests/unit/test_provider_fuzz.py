"""Seeded fuzzing of Workload API request frames and protobuf through the real provider.

10,000 mutated requests (bit flips, truncation, insertion, bad varints, wrong gRPC
prefixes; the mutators of ``tests/unit/test_sds_fuzz.py``) from valid FetchX509SVID,
FetchX509Bundles, FetchJWTSVID, FetchJWTBundles and ValidateJWTSVID requests, with and
without the ``workload.spiffe.io`` security header, go through one HTTP/2 connection to
an in-process :class:`WorkloadApiProvider`: half to one that entitles the caller, half
to one that entitles nobody. Every call must end (or, on a stream, answer) with a status
a gRPC peer understands (never UNKNOWN or INTERNAL), never hang, never log a traceback;
afterwards a good client is still served and fds and RSS are back near where they
started. ``WAPI_FUZZ_SEED`` and ``WAPI_FUZZ_CASES`` reproduce or lengthen a run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import captured_log

pytestmark = pytest.mark.hostile


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


def test_watched_logs_sees_tracebacks() -> None:
    """The fuzz test's traceback check is not vacuous."""
    with watched_logs() as problems:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("sds.provider").exception("failed")
        logging.getLogger("grpclib.server").error("Application error")
        logging.getLogger("sds.provider").info("fine")
        assert problems() == ["sds.provider: failed", "grpclib.server: Application error"]
