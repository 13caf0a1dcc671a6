"""Shared test fixtures: short socket directories, managed subprocesses, condition waits."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sds._procs import stop_group
from tests.envoy import echo_app, envoy_version, envoys

__all__ = ["echo_app", "envoy_version", "envoys"]

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory for Unix sockets (sun_path is limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sds-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Processes:
    """Starts subprocesses for one test and kills every one of them at teardown."""

    def __init__(self, logdir: Path) -> None:
        self._logdir = logdir
        self._procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, argv: list[str], name: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stdout+stderr captured to a log file named after ``name``."""
        log = self._logdir / f"{name}-{len(self._procs)}.log"
        handle = log.open("wb")
        proc = subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
        handle.close()
        self._procs.append((proc, log))
        return proc

    def sds(self, *args: str, name: str = "sds", **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``python -m sds ARGS``."""
        return self.start([PYTHON, "-m", "sds", *args], name, **kwargs)

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """Everything ``proc`` has printed so far."""
        for candidate, log in self._procs:
            if candidate is proc:
                return log.read_text(errors="replace")
        raise KeyError(proc)

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        """Signal ``proc``'s process group and wait for it (SIGKILL after 10 s)."""
        code = stop_group(proc, sig)
        assert code is not None
        return code

    def close(self) -> None:
        for proc, _ in self._procs:
            self.stop(proc)


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    """Managed subprocesses; their logs are printed if the test fails."""
    manager = Processes(tmp_path)
    yield manager
    manager.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for _, log in manager._procs:
            sys.stderr.write(f"\n----- {log.name} -----\n{log.read_text(errors='replace')[-4000:]}")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build SPIRE once before the first SPIRE test, so the build is not timed as a test."""
    if not any(item.get_closest_marker("spire") for item in session.items):
        return
    from tests.spire import build_before_tests

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def write(line: str) -> None:
        if reporter is not None:
            reporter.write_line(line)

    build_before_tests(write)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report
