"""Run a function as another uid, whatever directory the checkout and the interpreter live in.

A child started with ``setpriv ... python`` fails when the venv's python or
the checkout sits under a directory the other uid cannot traverse (root's
home is 0700, and pyenv's python lives under it). Here the child is a fork
of the running test interpreter instead: every module the function needs is
already imported (import it at the top of the test module), the child drops
to the wanted uid/gid with ``setgroups``/``setgid``/``setuid``, changes to
``/``, runs the function, and sends back its result (or its error) through a
pipe. Nothing is executed from disk after the fork.

The function must not import anything new (stdlib included: it may live
under a 0700 directory) and must not touch the parent's event loop; it may
start its own with ``asyncio.run``.

:func:`start_as` is for a long-lived child as another uid whose pid is what
matters (a workload for SPIRE to attest): a system binary such as
``/usr/bin/sleep``, exec'd by Popen after it dropped to the uid, with ``/``
as its working directory, so nothing of the checkout is needed.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import select
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sds._util.procs import Children

__all__ = ["AsUserError", "arun_as", "run_as", "start_as"]

T = TypeVar("T")


class AsUserError(Exception):
    """The function raised in the child (message carries the child's traceback)."""


def _child(
    write_fd: int, uid: int, gid: int, func: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    outcome: tuple[bool, Any]
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        os.chdir("/")
        # The fork copied the parent's "running loop" marker; forget it so that
        # the function may run its own loop.
        asyncio.events._set_running_loop(None)
        outcome = (True, func(*args))
    except BaseException:
        outcome = (False, traceback.format_exc())
    try:
        data = pickle.dumps(outcome)
    except Exception:
        data = pickle.dumps((False, f"result not picklable: {outcome[1]!r}"))
    view = memoryview(data)
    while view:
        written = os.write(write_fd, view)
        view = view[written:]


def run_as(
    uid: int, func: Callable[..., T], *args: Any, gid: int | None = None, timeout: float = 60.0
) -> T:
    """Run ``func(*args)`` in a forked child as ``uid`` (gid defaults to uid); return its result.

    Raises AsUserError with the child's traceback when ``func`` raised, and
    TimeoutError (after killing the child) when it takes longer than ``timeout``.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(read_fd)
            _child(write_fd, uid, uid if gid is None else gid, func, args)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"child as uid {uid} still running after {timeout}s")
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    if not chunks:
        raise AsUserError(f"child as uid {uid} died without a result")
    ok, value = pickle.loads(b"".join(chunks))
    if not ok:
        raise AsUserError(f"as uid {uid}:\n{value}")
    result: T = value
    return result


async def arun_as(
    uid: int, func: Callable[..., T], *args: Any, gid: int | None = None, timeout: float = 60.0
) -> T:
    """:func:`run_as` from a worker thread, so the calling event loop keeps serving meanwhile."""
    return await asyncio.to_thread(run_as, uid, func, *args, gid=gid, timeout=timeout)


def start_as(
    procs: Children, uid: int, argv: Sequence[str], name: str, *, gid: int | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (an absolute path outside the checkout) under ``procs`` as ``uid``
    (gid defaults to uid, no supplementary groups), in ``/``; ``procs`` stops it."""
    return procs.start(
        argv, name, user=uid, group=uid if gid is None else gid, extra_groups=[], cwd="/"
    )
