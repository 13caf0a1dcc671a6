"""Fast recovery and no stalled upstream (issue 9 item 8): the X.509 stream is abandoned when
it stays silent past 3/4 of the SVIDs' remaining life, a server that never sends its first
message is dropped, and a reappearing Unix socket is reconnected at once instead of after
the backoff."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import sds.workloadapi.client as workloadapi
import sds.workloadapi.watcher as watcher_module
from sds.errors import WorkloadApiUnavailable
from sds.spiffe.x509 import X509Context
from sds.workloadapi import socketwatch
from sds.workloadapi.client import WorkloadApiClient
from sds.workloadapi.socketwatch import SocketWatch
from sds.workloadapi.watcher import NullEvents, Watcher
from tests.conftest import event_lines
from tests.harness.chaos import StallProxy
from tests.harness.fake_workload_api import FakeWorkloadApi, eventually, x509_response
from tests.harness.material import Authority
from tests.harness.upstream_server import Hanging, serving

WORKLOAD_LOGGER = "sds.workloadapi"


@pytest.fixture(autouse=True)
def _capture(sds_debug_logs: None) -> None:
    """Every test here reads ``sds`` logs through caplog."""


def lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return event_lines(caplog, WORKLOAD_LOGGER, name)


class Connections(NullEvents):
    def __init__(self) -> None:
        self.connected = 0
        self.errors: list[Exception] = []

    def on_connected(self) -> None:
        self.connected += 1

    def on_disconnected(self, error: Any) -> None:
        self.errors.append(error)


@contextlib.asynccontextmanager
async def running(watcher: Watcher) -> AsyncIterator[Watcher]:
    task = asyncio.create_task(watcher.run())
    try:
        yield watcher
    finally:
        assert not task.done(), "Watcher.run() returned or crashed"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def hints(ctx: X509Context | None) -> list[str]:
    return [s.hint for s in ctx.svids] if ctx else []


def test_stated_defaults() -> None:
    watcher = Watcher("unix:///nonexistent/api.sock")
    assert (watcher.first_message_timeout, watcher.silence_max) == (10.0, 300.0)
    assert (watcher_module.SILENCE_MIN, watcher_module.SILENCE_FRACTION) == (1.0, 0.75)
    assert workloadapi.KEEPALIVE_INTERVAL == 310.0
    assert watcher._backoff_initial == 0.1 and watcher._backoff_max == 5.0


@pytest.mark.chaos
async def test_a_stalled_upstream_is_abandoned_for_a_working_one_at_the_same_path(
    sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = Authority("example.org")
    path = sockdir / "api.sock"
    stalled, working = FakeWorkloadApi(), FakeWorkloadApi()
    # The stalled server sent one SVID with 4 s left, then never another message; its
    # connection stays open. A working server now answers at the same path.
    stalled.set_x509(x509_response([ca.short_lived("/web", 4, hint="stalled")], [ca.bundle]))
    working.set_x509(x509_response([ca.svid("/web", hint="working")], [ca.bundle]))
    await stalled.start_unix(path)
    events = Connections()
    try:
        async with running(Watcher(f"unix://{path}", events=events)) as watcher:
            await watcher.wait_ready(10)
            assert hints(watcher.current()) == ["stalled"]
            path.unlink()
            await working.start_unix(path)
            # Silent for 3/4 of the remaining 4 s: reconnected, before the SVID expired.
            await eventually(lambda: hints(watcher.current()) == ["working"], 10, "working")
    finally:
        await stalled.stop()
        await working.stop()
    [silent] = lines(caplog, "workload_api.silent")
    assert 'action="reconnecting (a stalled stream or a replaced server)"' in silent
    assert lines(caplog, "svid.expired") == []
    assert events.connected == 2 and events.errors == []


@pytest.mark.chaos
async def test_a_server_that_never_sends_the_first_message_is_dropped(sockdir: Path) -> None:
    async with serving(Hanging(), sockdir / "api.sock") as address:
        events = Connections()
        watcher = Watcher(address, events=events, first_message_timeout=0.3, backoff_initial=0.05)
        async with running(watcher):
            await eventually(lambda: len(events.errors) >= 2, 10, "two failed attempts")
    assert isinstance(events.errors[0], WorkloadApiUnavailable)
    assert str(events.errors[0]) == (
        f"workload API at {address} sent no X.509-SVID message within 0.3s of connecting"
    )


@pytest.mark.chaos
@pytest.mark.parametrize("mode", ["inotify", "poll"])
async def test_a_reappearing_socket_is_reconnected_without_waiting_out_the_backoff(
    sockdir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    if mode == "poll":

        def no_inotify(directory: str) -> int:
            raise OSError(38, "inotify not available")

        monkeypatch.setattr(socketwatch, "_inotify_directory", no_inotify)
    ca = Authority("example.org")
    path = sockdir / "api.sock"
    first, second = FakeWorkloadApi(), FakeWorkloadApi()
    first.set_x509(x509_response([ca.svid("/web", hint="old")], [ca.bundle]))
    second.set_x509(x509_response([ca.svid("/web", hint="new")], [ca.bundle]))
    await first.start_unix(path)
    events = Connections()
    # A backoff of up to an hour: only the socket watch can bring the stream back soon.
    watcher = Watcher(f"unix://{path}", events=events, backoff_initial=1800.0, backoff_max=3600.0)
    try:
        async with running(watcher):
            await watcher.wait_ready(10)
            await first.stop()  # as after kill -9: connections drop, the socket file stays
            await eventually(lambda: events.errors, 10, "disconnect")
            await asyncio.sleep(0.2)  # the watcher is now waiting out its backoff
            await second.start_unix(path)  # replaces the stale socket file
            await eventually(lambda: hints(watcher.current()) == ["new"], 20, "reconnected")
    finally:
        await first.stop()
        await second.stop()
    assert len(lines(caplog, "workload_api.socket_appeared")) == 1
    assert watcher._wake.watch is None  # no watch (and no poll) while connected


async def test_socket_watch_reports_a_socket_created_in_its_directory(sockdir: Path) -> None:
    path = sockdir / "later.sock"
    watch = SocketWatch(str(path), None)
    try:
        assert not await watch.wait(0.05)
        (sockdir / "other.sock").touch()
        assert not await watch.wait(0.1)  # another name in the directory: not ours
        path.touch()
        assert await watch.wait(5)
    finally:
        watch.close()


async def test_socket_watch_counts_a_replacement_made_before_it_started(sockdir: Path) -> None:
    path = sockdir / "api.sock"
    path.touch()
    before = socketwatch.inode(str(path))
    path.unlink()
    await asyncio.sleep(0.02)  # past the coarse ctime tick, should the inode number be reused
    path.touch()  # a new file at the same path
    assert socketwatch.inode(str(path)) != before
    watch = SocketWatch(str(path), before)
    try:
        assert await watch.wait(0.05)
    finally:
        watch.close()


@pytest.mark.chaos
async def test_keepalive_drops_a_connection_whose_peer_stopped_answering(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workloadapi, "KEEPALIVE_TIMEOUT", 0.3)
    ca = Authority("example.org")
    api = FakeWorkloadApi()
    api.set_x509(x509_response([ca.svid("/web")], [ca.bundle]))
    await api.start_unix(sockdir / "api.sock")
    proxy = StallProxy(sockdir / "proxy.sock", sockdir / "api.sock").start()
    try:
        client = WorkloadApiClient(f"unix://{proxy.listen}", keepalive=0.2)
        with pytest.raises(WorkloadApiUnavailable) as info:
            async with asyncio.timeout(30):
                async for _ in client.x509_contexts():
                    assert proxy.freeze() == 1  # nothing more either way, PINGs included
        client.close()
    finally:
        proxy.close()
        await api.stop()
    assert str(info.value) == (
        f"workload API at unix://{proxy.listen} is unavailable: connection lost"
    )
