"""A minimal loopback HTTP/1.1 endpoint: /healthz, /readyz, /metrics, /envoys, /secrets.

GET only, one request per connection, no keep-alive: it serves probes and
scrapes, nothing else, and needs no web framework. Never carries key bytes.

It is kept off the data path's file-descriptor budget, so a local user who
floods it cannot starve SDS or the upstream connection: at most
``max_connections`` are open at once (the rest wait in the kernel's listen
backlog, costing this process no descriptor); each must send its request
head within ``idle_timeout`` between reads and within ``request_deadline``
in total, in at most ``max_header_bytes``; no connection is accepted while
fewer than ``fd_reserve`` descriptors are left under ``RLIMIT_NOFILE``; and
accept errors (EMFILE, ...) are logged at most once per
``log_interval`` with a count, never as a traceback per failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sds._util.log import event

__all__ = ["AdminLimits", "AdminServer", "Response", "fds_in_use"]

log = logging.getLogger("sds.admin")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP response: status, content type and body."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def json(cls, data: object, status: int = 200) -> Response:
        return cls(status, json.dumps(data, indent=2).encode() + b"\n", "application/json")


@dataclass(frozen=True, slots=True)
class AdminLimits:
    """Bounds on the admin endpoint (defaults are the shipped limits)."""

    max_connections: int = 64
    request_deadline: float = 5.0
    idle_timeout: float = 2.0
    max_header_bytes: int = 8192
    fd_reserve: int = 128
    backlog: int = 128
    log_interval: float = 10.0


Route = Callable[[], Response]


def fds_in_use() -> int:
    """How many file descriptors this process has open now (Linux ``/proc/self/fd``)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir itself opened
    except OSError:
        return 0


class _Throttled:
    """Logs one event at most once per ``interval`` seconds, with how many were suppressed."""

    def __init__(self, name: str, interval: float) -> None:
        self.name = name
        self.interval = interval
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, level: int, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        self._last = now
        if self._suppressed:
            fields["suppressed"] = self._suppressed
        self._suppressed = 0
        event(log, level, self.name, **fields)


class AdminServer:
    """Serves ``routes`` (path -> handler) on ``host:port`` (port 0 = any), within ``limits``.

    The caller picks the address: loopback for the admin endpoint, any IP for
    the metrics listener, whose routes carry nothing secret. ``name`` prefixes
    the ``<name>.listening`` log event.
    """

    def __init__(
        self,
        host: str,
        port: int,
        routes: dict[str, Route],
        prefixes: dict[str, Callable[[str], Response]] | None = None,
        limits: AdminLimits | None = None,
        *,
        name: str = "admin",
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.routes = routes
        self.prefixes = prefixes or {}
        self.limits = limits or AdminLimits()
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.limits.max_connections)
        self._accept_failed = _Throttled(f"{name}.accept_failed", self.limits.log_interval)
        self._reserve_hit = _Throttled(f"{name}.fd_reserve", self.limits.log_interval)

    @property
    def active(self) -> int:
        """Connections being served now."""
        return len(self._handlers)

    async def start(self) -> None:
        """Bind and serve in a task of its own; ``self.port`` becomes the bound port."""
        self.bind()
        self._accepting = asyncio.create_task(self.serve(), name=f"{self.name}-accept")

    def bind(self) -> None:
        """Bind and listen (``self.port`` becomes the bound port); connections wait in the
        backlog until :meth:`serve` runs. Raises OSError when the address is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(self.limits.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        event(log, logging.INFO, f"{self.name}.listening", address=f"http://{host}:{self.port}")

    async def serve(self) -> None:
        """Accept and answer connections until cancelled or :meth:`close`; the caller may own
        this task (an unexpected exception then reaches it), or :meth:`start` runs it."""
        self._accepting = asyncio.current_task()
        await self._accept_loop()

    async def close(self) -> None:
        """Stop accepting, end every open connection, and close."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _reserve_left(self) -> bool:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return True
        in_use = fds_in_use()
        if in_use + self.limits.fd_reserve < soft:
            return True
        self._reserve_hit(
            logging.WARNING,
            fds=in_use,
            limit=soft,
            reserve=self.limits.fd_reserve,
            action="not accepting connections until descriptors are free",
        )
        return False

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            await self._slots.acquire()
            try:
                while not self._reserve_left():  # noqa: ASYNC110 - polls the kernel's count
                    await asyncio.sleep(0.1)
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                self._slots.release()
                self._accept_failed(
                    logging.ERROR, error=exc.strerror or exc, action="retrying in 0.1s"
                )
                await asyncio.sleep(0.1)
                continue
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._serve(conn))
            self._handlers.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._slots.release()

    async def _serve(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            return
        try:
            async with asyncio.timeout(self.limits.request_deadline):
                head = await self._read_head(reader)
                response = self._respond(head)
                writer.write(self._encode(response))
                await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """The request head up to the blank line; None when it exceeds ``max_header_bytes``."""
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            chunk = await asyncio.wait_for(reader.read(4096), self.limits.idle_timeout)
            if not chunk:
                break
            data += chunk
            if len(data) > self.limits.max_header_bytes:
                return None
        return data

    def _respond(self, head: bytes | None) -> Response:
        if head is None:
            return Response(431, b"request head too large\n")
        parts = head.split(b"\n", 1)[0].decode("latin-1").split()
        if len(parts) < 2:
            return Response(400, b"bad request\n")
        method, target = parts[0], parts[1].split("?", 1)[0]
        handler = self.routes.get(target)
        if handler is None:
            for prefix, prefixed in self.prefixes.items():
                if target.startswith(prefix):
                    rest = target[len(prefix) :]
                    handler = lambda rest=rest, prefixed=prefixed: prefixed(rest)  # noqa: E731
                    break
        if method != "GET":
            return Response(405, b"only GET\n")
        if handler is None:
            paths = [*self.routes, *(f"{prefix}<td>" for prefix in self.prefixes)]
            return Response(404, b"not found; try " + ", ".join(paths).encode() + b"\n")
        return handler()

    @staticmethod
    def _encode(response: Response) -> bytes:
        head = (
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'OK')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode() + response.body
