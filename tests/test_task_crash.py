"""One owner for every task (sds._util.tasks, sds.bridge.root, sds.provider.root): an
unexpected exception in a long-running task is logged once with its traceback and stops the
process with exit 1, so the supervisor restarts it, instead of leaving it serving stale state."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sds._util.log import configure_logging, event
from sds._util.tasks import TaskOwner
from tests.conftest import PYTHON, Processes, wait_for
from tests.stack import Stack

# `python -m sds`, with one function the long-running task calls replaced by a bug.
BROKEN = """\
import sys
{patch}
from sds.cli import main
sys.exit(main(sys.argv[1:]))
"""

WATCHER_BUG = """\
import sds.workloadapi.watcher as watcher

async def _retry_wait(self, delay):
    raise RuntimeError("injected bug in the watcher")

watcher.Watcher._retry_wait = _retry_wait
"""

RELOAD_BUG = """\
import sds.provider.service as service

def reload(self, identities, federation):
    raise RuntimeError("injected bug in the reload")

service.WorkloadApiProvider.reload = reload
"""


def _start_broken(procs: Processes, patch: str, *args: str, name: str) -> subprocess.Popen[bytes]:
    return procs.start([PYTHON, "-c", BROKEN.format(patch=patch), *args], name)


def _exited(proc: subprocess.Popen[bytes], timeout: float, what: str) -> int:
    wait_for(lambda: proc.poll() is not None, timeout, what)
    code = proc.returncode
    assert code is not None
    return code


def _crash_lines(log: str, marker: str) -> list[str]:
    lines = [line for line in log.splitlines() if marker in line]
    assert len(lines) == 1, log  # logged once, on one line with its traceback
    return lines


@pytest.mark.chaos
def test_a_watcher_that_dies_stops_the_bridge_with_exit_1(procs: Processes, sockdir: Path) -> None:
    stack = Stack(procs, sockdir)
    stack.start_provider()
    stack.write_config()
    bridge = _start_broken(
        procs, WATCHER_BUG, "run", "--config", str(stack.config_path), name="bridge"
    )
    stack.bridge = bridge
    wait_for(stack.sds_socket.exists, 15, "SDS socket")

    # The upstream goes away; the watcher's retry path runs into the bug.
    assert procs.stop(stack.provider, signal.SIGTERM) == 0
    assert _exited(bridge, 20, "the bridge to exit") == 1
    log = procs.log(bridge)
    (line,) = _crash_lines(log, "injected bug in the watcher")
    assert " ERROR sds.run task.crashed task=watch-0 error=" in line
    assert 'error="RuntimeError: injected bug in the watcher"' in line
    assert 'action="stopping; exit 1 for the supervisor to restart the bridge"' in line
    assert ' exc="' in line and "Traceback (most recent call last):" in line
    assert "bridge.stopping exit_code=1" in log
    assert [entry for entry in log.splitlines() if "Traceback" in entry] == [line]
    assert not stack.sds_socket.exists()  # stopped in order: the socket is gone


@pytest.mark.chaos
def test_a_reload_that_dies_stops_the_provider_with_exit_1(procs: Processes, sockdir: Path) -> None:
    stack = Stack(procs, sockdir)
    provider = _start_broken(procs, RELOAD_BUG, *stack.provider_args(), name="provider")
    wait_for(lambda: "provider.ready" in procs.log(provider), 15, "provider.ready")

    provider.send_signal(signal.SIGHUP)
    assert _exited(provider, 20, "the provider to exit") == 1
    log = procs.log(provider)
    (line,) = _crash_lines(log, "injected bug in the reload")
    assert " ERROR sds.provider task.crashed task=reload " in line
    assert 'error="RuntimeError: injected bug in the reload"' in line
    assert ' exc="Traceback (most recent call last):\\n' in line
    assert [entry for entry in log.splitlines() if "Traceback" in entry] == [line]
    assert "provider.stopped" in log
    assert not stack.workload_socket.exists()


# -- the owner itself -----------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The test may configure ``sds`` logs as the CLI does; they are restored afterwards."""
    root = logging.getLogger("sds")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], level, root.propagate = saved
    root.setLevel(level)


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_a_crash_is_logged_once_with_its_traceback_and_sets_exit_1(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("INFO")  # logfmt on stderr, as the CLI writes it
    stopped = asyncio.Event()
    owner = TaskOwner(logging.getLogger("sds.test"), stopped.set, "stopping")

    async def broken() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    async with owner as tasks:
        survivor = tasks.spawn("survivor", _forever())
        tasks.spawn("broken", broken())
        async with asyncio.timeout(5):
            await stopped.wait()
        assert not survivor.done()  # the policy stops the program; the owner does not
        await tasks.cancel()
    assert owner.exit_code == 1
    assert survivor.cancelled()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert (
        ' ERROR sds.test task.crashed task=broken error="ValueError: boom" action=stopping '
        in (lines[0])
    )
    assert lines[0].endswith('\\nValueError: boom"')


async def test_cancelling_is_no_crash_and_returning_early_is(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("INFO")  # logfmt on stderr, as the CLI writes it
    crashes: list[int] = []
    owner = TaskOwner(logging.getLogger("sds.test"), lambda: crashes.append(1), "stopping")

    async def returns() -> None:
        await asyncio.sleep(0)

    async with owner as tasks:
        cancelled = tasks.spawn("cancelled", _forever())
        await tasks.cancel(cancelled)
        assert (crashes, owner.exit_code) == ([], 0)
        await tasks.spawn("returns", returns())
    assert (crashes, owner.exit_code) == ([1], 1)
    (line,) = capsys.readouterr().err.splitlines()
    assert 'task.crashed task=returns error="returned, but should run until stopped"' in line
    assert "exc=" not in line


def test_event_with_exc_info_below_error_carries_no_traceback(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("INFO")  # logfmt on stderr, as the CLI writes it
    try:
        raise KeyError("k")
    except KeyError as exc:
        event(logging.getLogger("sds.test"), logging.WARNING, "x.y", exc_info=exc)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(" WARNING sds.test x.y")
