"""Chaos plumbing shared by ``tests/e2e/test_chaos.py`` (short runs) and ``bench/chaos.py`` /
``bench/recovery.py`` (long runs): a real provider, bridge and Envoy, continuous mTLS
traffic with a new connection per request, and the faults.

Faults: ``kill -9`` of the provider and its restart, ``kill -9`` of the bridge and its
restart, an outage longer than the SVID lifetime (timed until Envoy presents a new SVID),
and a stalled upstream (:class:`StallProxy`: the connection stays open, nothing more is
forwarded, while new connections to the same path work).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.envoy import (
    EnvoyProcess,
    Envoys,
    bootstrap,
    downstream_mtls_listener,
    sds_cluster,
)
from tests.harness.procs import Processes, wait_for
from tests.harness.stack import Stack
from tests.harness.tlsclient import HttpsClient

__all__ = [
    "StallProxy",
    "Traffic",
    "kill_bridge",
    "outage_recovery",
    "restart_provider",
    "start_envoy",
    "start_provider_timed",
]


def start_envoy(envoys: Envoys, stack: Stack) -> tuple[EnvoyProcess, int]:
    """An Envoy terminating mTLS with ``default`` and ``ROOTCA`` from the bridge; its port."""
    config = bootstrap(
        "chaos-envoy",
        "chaos",
        [downstream_mtls_listener("in")],
        [sds_cluster("sds", stack.sds_socket)],
    )
    envoy = envoys.start(config)
    return envoy, envoy.listener_port("in")


@dataclass
class Traffic:
    """Fresh-connection HTTPS requests through Envoy in a thread, counting every outcome.

    ``failures`` holds (monotonic time, error) for each failed request; ``served`` the
    (time, serial) of each success whose serial differs from the previous one.
    """

    client: HttpsClient
    port: int
    interval: float = 0.02
    ok: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    served: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True, name="traffic")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                response = self.client.get("127.0.0.1", self.port, timeout=5)
                if response.status != 200:
                    self.failures.append((time.monotonic(), f"HTTP {response.status}"))
                else:
                    self.ok += 1
                    if not self.served or self.served[-1][1] != response.serial:
                        self.served.append((time.monotonic(), response.serial))
            except (ssl.SSLError, OSError) as exc:
                self.failures.append((time.monotonic(), repr(exc)))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def serial(self) -> int | None:
        return self.served[-1][1] if self.served else None


def _socket_back(path: Path, timeout: float) -> float:
    """Poll (1 ms) until the socket ``path`` exists; return when it was made (monotonic).

    The time comes from the file's ctime (set by bind and the chmod that follows it),
    not from when this poll saw it: a loaded machine may wake the poll late.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            made = path.stat().st_ctime_ns / 1e9
            break
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} did not appear within {timeout}s") from None
            time.sleep(0.001)
    age = max(0.0, time.time() - made)
    return time.monotonic() - age


def start_provider_timed(stack: Stack) -> float:
    """Start the provider; return when its socket appeared (monotonic)."""
    if stack.workload_socket.exists():
        stack.workload_socket.unlink()
    stack.provider = stack.procs.sds(*stack.provider_args(), name="provider")
    return _socket_back(stack.workload_socket, 30)


def restart_provider(stack: Stack, procs: Processes, down_for: float = 0.3) -> float:
    """``kill -9`` the provider, keep it down ``down_for`` s, start it; return the seconds
    from its socket appearing to the bridge serving the SVID it issued."""
    before = stack.served_serial()
    procs.stop(stack.provider, signal.SIGKILL)
    time.sleep(down_for)
    back = start_provider_timed(stack)
    served = _poll(lambda: _served_or_none(stack) not in (None, before), 30, "bridge serves it")
    return served - back


def kill_bridge(stack: Stack, procs: Processes) -> None:
    """``kill -9`` the bridge (its socket file stays) and start a new one."""
    procs.stop(stack.bridge, signal.SIGKILL)
    stack.start_bridge()


def outage_recovery(
    stack: Stack, procs: Processes, traffic: Traffic, outage: float
) -> dict[str, float]:
    """Keep the provider down for ``outage`` s (longer than the SVID lifetime, so the
    bridge's SVID expires), start it, and time until Envoy presents a new SVID.

    Returns ``to_bridge`` (socket back -> the bridge serves the new serial) and
    ``to_envoy`` (socket back -> the first successful request presenting it).
    """
    old = traffic.serial()
    procs.stop(stack.provider, signal.SIGKILL)
    down = time.monotonic()
    wait_for(
        lambda: "svid.expired" in procs.log(stack.bridge), outage + 30, "the bridge's SVID expired"
    )
    time.sleep(max(0.0, outage - (time.monotonic() - down)))
    back = start_provider_timed(stack)
    served = _poll(lambda: _served_or_none(stack) not in (None, old), 30, "bridge serves it")
    seen = wait_for(
        lambda: next((t for t, s in traffic.served if t >= back and s != old), None),
        30,
        "Envoy presents the new SVID",
    )
    return {"outage": back - down, "to_bridge": served - back, "to_envoy": seen - back}


def _poll(predicate: Any, timeout: float, what: str) -> float:
    """Check ``predicate`` every 5 ms; return the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic()


def _served_or_none(stack: Stack) -> int | None:
    try:
        return stack.served_serial()
    except (KeyError, OSError):
        return None


class StallProxy:
    """A Unix-socket proxy to ``target``; :meth:`freeze` stops every open connection (kept
    open, nothing forwarded either way) while connections made later work normally."""

    def __init__(self, listen: Path, target: Path) -> None:
        self.listen = listen
        self.target = target
        self._loop = asyncio.new_event_loop()
        self._frozen: list[asyncio.Event] = []
        self._live: list[asyncio.Event] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")
        self._server: Any = None
        self.connections = 0

    def start(self) -> StallProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_unix_server(self._handle, str(self.listen)), self._loop
        ).result(10)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # close() cancels: a quiet end
            await self._forward(reader, writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        frozen = asyncio.Event()
        self._live.append(frozen)
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.target))
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if frozen.is_set():
                        await asyncio.Event().wait()  # stalled: hold the connection forever
                    dst.write(data)
                    await dst.drain()
            if not frozen.is_set():
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def freeze(self) -> int:
        """Stall every connection open now; return how many."""

        def mark() -> int:
            for event in self._live:
                event.set()
            count = len(self._live)
            self._live = []
            return count

        async def run() -> int:
            return mark()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def close(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
            for writer in self._writers:
                writer.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in self._writers:
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.listen)
