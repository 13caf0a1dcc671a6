"""Subprocesses and condition waits for tests: sds._util.procs with pytest's failure reporting."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from sds._util.procs import Children, WaitFailed, wait_until

__all__ = ["PYTHON", "Processes", "wait_for"]

T = TypeVar("T")

PYTHON = sys.executable


def wait_for(
    predicate: Callable[[], T | None], timeout: float = 10.0, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    try:
        return wait_until(predicate, timeout, what, max_interval=0.1)
    except WaitFailed as exc:
        pytest.fail(str(exc))


class Processes(Children):
    """Subprocesses of one test (or of one benchmark run); close() stops every one of them."""

    def sds(self, *args: str, name: str = "sds", **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``python -m sds ARGS``."""
        return self.start([PYTHON, "-m", "sds", *args], name, **kwargs)

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0
    ) -> int:
        """Signal ``proc``'s process group and wait for it (SIGKILL after ``timeout``)."""
        code = super().stop(proc, sig, timeout)
        assert code is not None
        return code
