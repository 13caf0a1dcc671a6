"""A minimal loopback HTTP/1.1 endpoint: /healthz, /readyz, /metrics, /envoys, /secrets.

GET only, one request per connection, no keep-alive: it serves probes and
scrapes, nothing else, and needs no web framework. Never carries key bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .._log import event

__all__ = ["AdminServer", "Response"]

log = logging.getLogger("sds.admin")

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP response: status, content type and body."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def json(cls, data: object, status: int = 200) -> Response:
        return cls(status, json.dumps(data, indent=2).encode() + b"\n", "application/json")


Route = Callable[[], Response]


class AdminServer:
    """Serves ``routes`` (path -> handler) on ``host:port`` (port 0 = any).

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
        *,
        name: str = "admin",
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.routes = routes
        self.prefixes = prefixes or {}
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind and start serving; ``self.port`` becomes the bound port."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        event(log, logging.INFO, f"{self.name}.listening", address=f"http://{host}:{self.port}")

    async def close(self) -> None:
        """Stop accepting and close."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            if len(parts) < 2:
                return
            method, target = parts[0], parts[1].split("?", 1)[0]
            handler = self.routes.get(target)
            if handler is None:
                for prefix, prefixed in self.prefixes.items():
                    if target.startswith(prefix):
                        rest = target[len(prefix) :]
                        handler = lambda rest=rest, prefixed=prefixed: prefixed(rest)  # noqa: E731
                        break
            if method != "GET":
                response = Response(405, b"only GET\n")
            elif handler is None:
                paths = [*self.routes, *(f"{prefix}<td>" for prefix in self.prefixes)]
                response = Response(404, b"not found; try " + ", ".join(paths).encode() + b"\n")
            else:
                response = handler()
            head = (
                f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'OK')}\r\n"
                f"Content-Type: {response.content_type}\r\n"
                f"Content-Length: {len(response.body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + response.body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
