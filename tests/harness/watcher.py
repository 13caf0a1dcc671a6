"""A Workload API :class:`Watcher` run in the background, with every event it reports recorded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sds.errors import InvalidSvid, WorkloadApiError, WorkloadApiMisconfigured
from sds.spiffe.x509 import X509Context, X509Svid
from sds.workloadapi.watcher import NullEvents, Watcher


class Recorder(NullEvents):
    """WatcherEvents that remember every call, plus listener notifications."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.notifications = 0

    def notified(self) -> None:
        self.notifications += 1

    def of(self, name: str) -> list[Any]:
        return [arg for kind, arg in self.events if kind == name]

    def on_connected(self) -> None:
        self.events.append(("connected", None))

    def on_disconnected(self, error: WorkloadApiError) -> None:
        self.events.append(("disconnected", error))

    def on_x509_update(self, ctx: X509Context) -> None:
        self.events.append(("x509_update", ctx))

    def on_svid_rejected(self, error: InvalidSvid) -> None:
        self.events.append(("svid_rejected", error))

    def on_svid_expired(self, svid: X509Svid) -> None:
        self.events.append(("svid_expired", svid))

    def on_jwt_bundles_update(self, bundles: Any) -> None:
        self.events.append(("jwt_update", dict(bundles)))

    def on_misconfigured(self, error: WorkloadApiMisconfigured) -> None:
        self.events.append(("misconfigured", error))


@contextlib.asynccontextmanager
async def watching(
    address: str, *, backoff_initial: float = 0.01, backoff_max: float = 0.2
) -> AsyncIterator[tuple[Watcher, Recorder]]:
    """Run a Watcher in the background; cancel it (and surface any crash) on exit."""
    recorder = Recorder()
    watcher = Watcher(
        address, events=recorder, backoff_initial=backoff_initial, backoff_max=backoff_max
    )
    watcher.subscribe(recorder.notified)
    task = asyncio.create_task(watcher.run())
    try:
        yield watcher, recorder
    finally:
        assert not task.done(), "Watcher.run() returned or crashed"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def serials(ctx: X509Context | None) -> dict[str, int]:
    assert ctx is not None
    return {str(s.spiffe_id): s.serial for s in ctx.svids}
