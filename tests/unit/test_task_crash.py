"""One owner for every task (sds._util.tasks, sds.bridge.root, sds.provider.root), one crash policy.

The tests here run in process, with no child process and no Envoy; the others are in
``tests/integration/test_task_crash.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from sds._util.log import configure_logging, event
from sds._util.tasks import TaskOwner, each_time


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


async def test_run_always_stops_and_raises_a_start_up_failure_unwrapped() -> None:
    owner = TaskOwner(logging.getLogger("sds.test"), lambda: None, "stopping")
    stopped: list[str] = []

    async def serve() -> None:
        owner.spawn("idle", _forever())
        raise OSError("cannot bind")

    async def stop() -> None:
        stopped.append("stop")
        await owner.cancel()

    with pytest.raises(OSError, match=r"^cannot bind$"):
        await owner.run(serve, stop)
    assert stopped == ["stop"]
    assert owner.exit_code == 0


async def test_each_time_coalesces_sets_that_arrive_while_it_runs() -> None:
    flag = asyncio.Event()
    running = asyncio.Event()
    release = asyncio.Event()
    runs: list[int] = []

    async def action() -> None:
        runs.append(len(runs))
        running.set()
        await release.wait()

    task = asyncio.create_task(each_time(flag, action))
    flag.set()
    await asyncio.wait_for(running.wait(), 5)
    for _ in range(3):  # a burst while the first run is still going
        flag.set()
    running.clear()
    release.set()
    await asyncio.wait_for(running.wait(), 5)
    await asyncio.sleep(0)
    assert runs == [0, 1]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
