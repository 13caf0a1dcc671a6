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

import logging

import pytest

from tests.harness.logs import watched_logs

pytestmark = pytest.mark.hostile


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
