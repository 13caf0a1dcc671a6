"""Child processes in their own process groups, with captured logs, and waits on conditions.

One implementation for ``sds demo``, the tests (``tests/harness/procs.py``) and
the benchmarks (``bench/_common.py``): every child starts in a new session
(``start_new_session=True``, so its group id is its pid) with its output in a
log file; stopping signals the whole group (SIGTERM, then SIGKILL after a grace
period), so nothing a child started outlives it; a wait polls a condition with
a backoff until it holds or a deadline passes, and fails early, with the log's
tail, when a watched child exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["Children", "WaitFailed", "signal_group", "stop_group", "wait_until"]

T = TypeVar("T")


class WaitFailed(RuntimeError):
    """A condition did not hold before its deadline, or a child it depended on exited."""


def signal_group(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``proc``'s process group if ``proc`` still runs."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


def stop_group(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10.0
) -> int | None:
    """Signal ``proc``'s group, wait up to ``timeout``, then SIGKILL it; return the exit code.

    Whatever else is left in the group afterwards is killed too, so nothing a
    child started outlives it.
    """
    signal_group(proc, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    proc: subprocess.Popen[Any] | None = None,
    *,
    check: Callable[[], None] | None = None,
    max_interval: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Raises :class:`WaitFailed` after ``timeout`` seconds, or as soon as ``proc``
    has exited; ``check`` (called before each poll) may raise to stop early
    too. Polls start 2 ms apart and back off to ``max_interval``.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        if check is not None:
            check()
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise WaitFailed(f"{what}: process exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise WaitFailed(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, max_interval)


class Children:
    """The child processes of one run (a test, a benchmark, the demo); close() stops them all.

    Each child's stdout and stderr go to ``<logdir>/<name>-<n>.log`` (stdout
    can be a pipe instead, and stdin a pipe); used as a context manager, the
    block's failure prints every log's tail to stderr before the children stop.
    """

    def __init__(self, logdir: Path, *, cwd: Path | None = None) -> None:
        self.logdir = logdir
        self.cwd = cwd
        self.started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self._stopped: set[int] = set()

    def start(
        self,
        argv: Sequence[str],
        name: str,
        *,
        stdin: bool = False,
        stdout: bool = False,
        **popen: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new process group; ``popen`` goes to Popen (env, cwd, pass_fds)."""
        log_path = self.logdir / f"{name}-{len(self.started)}.log"
        popen.setdefault("cwd", self.cwd)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else log,
                stderr=log,
                start_new_session=True,
                **popen,
            )
        self.started.append((name, proc, log_path))
        return proc

    def log_path(self, proc: subprocess.Popen[bytes]) -> Path:
        """The file ``proc``'s output goes to."""
        for _, candidate, path in self.started:
            if candidate is proc:
                return path
        raise KeyError(proc)

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """Everything ``proc`` has written to its log so far."""
        return self.log_path(proc).read_text(errors="replace")

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0
    ) -> int | None:
        """Close ``proc``'s pipes, signal its group with ``sig`` (SIGKILL after ``timeout``)."""
        self._stopped.add(proc.pid)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        code = stop_group(proc, sig, timeout)
        if proc.stdout is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdout.close()
        return code

    def close(self, timeout: float = 10.0) -> None:
        """SIGTERM every group at once, then wait for them together (SIGKILL after ``timeout``)."""
        for _, proc, _ in reversed(self.started):
            signal_group(proc)
        deadline = time.monotonic() + timeout
        for _, proc, _ in reversed(self.started):
            self.stop(proc, timeout=max(deadline - time.monotonic(), 0.1))

    def wait_until(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        """:func:`wait_until` that also fails, with its log's tail, if a child exits meanwhile.

        Children stopped with :meth:`stop` are not watched.
        """
        return wait_until(predicate, timeout, what, check=lambda: self._check_running(what))

    def _check_running(self, what: str) -> None:
        for name, proc, path in self.started:
            if proc.pid not in self._stopped and proc.poll() is not None:
                tail = path.read_text(errors="replace")[-1500:]
                raise WaitFailed(
                    f"{name} exited with code {proc.returncode} while waiting for {what}:\n{tail}"
                )

    def tails(self, limit: int = 2500) -> str:
        """The last ``limit`` characters of each child's log, under a header naming it."""
        out = []
        for name, _, path in self.started:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")[-limit:]
                out.append(f"----- {name} ({path}) -----\n{text}")
        return "\n".join(out)

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop every child; when the block failed, print each one's log tail first."""
        if kind is not None:
            print(self.tails(), file=sys.stderr)
        self.close()
