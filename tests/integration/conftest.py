"""The integration tier runs real processes but no Envoy: a test here that starts one fails."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.sds_server import Served, serve_sds


@pytest.fixture(autouse=True)
def _no_envoy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse to start an ``envoy`` binary (tests with Envoy in the path belong in e2e/)."""
    start = subprocess.Popen.__init__

    def checked(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        argv = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
        if os.path.basename(os.fsdecode(argv[0])).startswith("envoy"):
            raise AssertionError(f"an integration test started {argv[0]}; that is an e2e test")
        start(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked)


@pytest.fixture
async def served(sockdir: Path) -> AsyncIterator[Served]:
    """An in-process SDS server (:func:`serve_sds`), closed after the test."""
    s = await serve_sds(sockdir)
    yield s
    s.server.close()
    await s.server.wait_closed()
