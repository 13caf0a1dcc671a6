"""The unit tier runs in process: a test here that starts a child process fails."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _no_child_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse subprocess.Popen (asyncio's subprocesses use it too) for every unit test."""

    def refuse(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a unit test started {args!r}; tests that do belong in integration/")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
