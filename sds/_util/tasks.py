"""One owner for a program's long-running tasks, and one policy for a task that crashes.

:class:`TaskOwner` holds an :class:`asyncio.TaskGroup`: every task started
with :meth:`TaskOwner.spawn` lives in it, so leaving the ``async with`` block
ends them all and none runs unowned. A task that raises an unexpected
exception, or returns although it should run until cancelled, is logged once
as ``task.crashed task=NAME error=... action=... exc=<traceback>``, the exit
code becomes 1 and ``on_crash`` is called (the program stops in its stated
order, so its supervisor restarts it). Cancellation is not a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any

from sds._util.log import event

__all__ = ["EXIT_CRASHED", "TaskOwner", "each_time"]

EXIT_CRASHED = 1


class TaskOwner:
    """Owns named long-running tasks in one TaskGroup; ``exit_code`` is 1 once one crashed.

    ``action`` is logged with each crash (what happens now); ``on_crash()`` runs
    after the line is logged. Use as ``async with TaskOwner(...) as tasks:``.
    """

    def __init__(self, logger: logging.Logger, on_crash: Callable[[], None], action: str) -> None:
        self._log = logger
        self._on_crash = on_crash
        self._action = action
        self._group = asyncio.TaskGroup()
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.exit_code = 0

    async def __aenter__(self) -> TaskOwner:
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping = True
        await self._group.__aexit__(exc_type, exc, tb)

    async def run(
        self, serve: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
    ) -> int:
        """Inside the group, await ``serve()`` and then, always, ``stop()``; the exit code.

        An exception from ``serve`` (a start-up failure) is raised again once the
        group has ended, as itself: raised inside, the TaskGroup would wrap it.
        """
        failed: Exception | None = None
        async with self:
            try:
                await serve()
            except Exception as exc:  # noqa: BLE001 - raised again outside the group, unwrapped
                failed = exc
            finally:
                await stop()
        if failed is not None:
            raise failed
        return self.exit_code

    def spawn(self, name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` as task ``name`` in the group, under the crash policy."""
        task = self._group.create_task(self._supervised(name, work), name=name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(lambda _: work.close())  # cancelled before it ran: never awaited
        return task

    async def cancel(self, *tasks: asyncio.Task[None] | None) -> None:
        """Cancel ``tasks`` (all still running when none are named) and wait until they end."""
        self._stopping = self._stopping or not tasks
        chosen = tasks if tasks else tuple(self._running)
        running = [task for task in chosen if task is not None and not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)

    async def _supervised(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception as exc:  # noqa: BLE001 - the policy: log once, stop, exit 1
            self._crashed(name, exc)
        else:
            if not self._stopping:
                self._crashed(name, None)

    def _crashed(self, name: str, exc: Exception | None) -> None:
        event(
            self._log,
            logging.ERROR,
            "task.crashed",
            task=name,
            error=_describe(exc) if exc is not None else "returned, but should run until stopped",
            action=self._action,
            exc_info=exc,
        )
        self.exit_code = EXIT_CRASHED
        self._on_crash()


async def each_time(flag: asyncio.Event, action: Callable[[], Awaitable[None]]) -> None:
    """Run ``action`` every time ``flag`` is set, until cancelled; sets that arrive while
    it runs coalesce into one more run (a burst of SIGHUPs is one more reload)."""
    while True:
        await flag.wait()
        flag.clear()
        await action()


def _describe(exc: BaseException) -> str:
    """``Type: message`` of the exception, looking through groups of one (a TaskGroup's)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
