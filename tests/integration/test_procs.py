"""sds._util.procs: children in their own groups, logs captured, stopped as a group."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from sds._util.procs import Children, WaitFailed, wait_until

PYTHON = sys.executable
# A child that starts a grandchild in its group, prints both pids, then waits.
PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print(f'pids {child.pid}', flush=True)\n"
    "time.sleep(600)\n"
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_close_stops_the_whole_group_and_keeps_the_log(tmp_path: Path) -> None:
    with Children(tmp_path) as children:
        proc = children.start([PYTHON, "-c", PARENT], "parent")
        line = children.wait_until(lambda: "pids " in children.log(proc), 30, "the pids line")
        assert line
        grandchild = int(children.log(proc).split()[1])
        assert os.getpgid(proc.pid) == proc.pid
        assert os.getpgid(grandchild) == proc.pid
    assert proc.returncode == -signal.SIGTERM
    wait_until(lambda: not alive(grandchild), 10, "the grandchild to go")
    assert children.log_path(proc) == tmp_path / "parent-0.log"
    assert children.log(proc).startswith("pids ")


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    stubborn += "print('ready', flush=True)\ntime.sleep(600)\n"
    children = Children(tmp_path)
    proc = children.start([PYTHON, "-c", stubborn], "stubborn")
    children.wait_until(lambda: "ready" in children.log(proc), 30, "ready")
    assert children.stop(proc, timeout=0.5) == -signal.SIGKILL


def test_wait_fails_early_with_the_log_tail_when_a_child_exits(tmp_path: Path) -> None:
    children = Children(tmp_path)
    children.start([PYTHON, "-c", "import sys; sys.exit('boom: config is bad')"], "bad")
    with pytest.raises(WaitFailed) as failed:
        children.wait_until(lambda: False, 60, "the socket")
    message = str(failed.value)
    assert message.startswith("bad exited with code 1 while waiting for the socket:\n")
    assert message.endswith("boom: config is bad\n")
    children.close()


def test_a_stopped_child_is_not_watched(tmp_path: Path) -> None:
    children = Children(tmp_path)
    proc = children.start([PYTHON, "-c", "import time; time.sleep(600)"], "sleeper")
    children.stop(proc)
    assert children.wait_until(lambda: "ok", 1, "nothing") == "ok"
