"""One owner for every task (sds._util.tasks, sds.bridge.root, sds.provider.root): an
unexpected exception in a long-running task is logged once with its traceback and stops the
process with exit 1, so the supervisor restarts it, instead of leaving it serving stale state."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, Processes, wait_for
from tests.harness.stack import Stack

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
