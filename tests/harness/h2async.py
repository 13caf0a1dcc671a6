"""An asyncio raw HTTP/2 gRPC client for hostile-input tests: it sends exactly the bytes it
is given (broken framing, bad protobuf, unknown methods) and records what comes back,
headers included, which grpclib's client would hide or refuse to produce.

Unlike the blocking ``tests/harness/h2raw.py``, many streams can be in flight at once on one
connection, which the fuzz and reset tests need (thousands of streams in seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)

from tests.harness.h2raw import StreamReply, grpc_frame

SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"


__all__ = ["SERVICE", "RawClient", "Reply", "grpc_frame", "stall_in_preface"]


@dataclass
class Reply(StreamReply):
    """What the server sent on one stream."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set on the first DATA or the end of the stream (a server stream may never end).
    answered: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def status(self) -> str | None:
        """grpc-status, from the trailers or a trailers-only response."""
        return self.grpc_field("grpc-status")

    @property
    def message(self) -> str | None:
        from urllib.parse import unquote

        raw = self.grpc_field("grpc-message")
        return unquote(raw) if raw is not None else None


class RawClient:
    """One HTTP/2 connection to a Unix socket; many streams may be in flight at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.replies: dict[int, Reply] = {}
        self.closed = asyncio.Event()
        self.writer.write(self.conn.data_to_send())
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, path: str) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for ev in self.conn.receive_data(data):
                    reply = self.replies.get(getattr(ev, "stream_id", 0) or 0)
                    if isinstance(ev, ResponseReceived) and reply is not None:
                        reply.headers = dict(ev.headers)  # type: ignore[arg-type]
                    elif isinstance(ev, TrailersReceived) and reply is not None:
                        reply.trailers = dict(ev.headers)  # type: ignore[arg-type]
                    elif isinstance(ev, DataReceived):
                        if reply is not None:
                            reply.data += ev.data
                            reply.answered.set()
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, StreamEnded) and reply is not None:
                        reply.done.set()
                        reply.answered.set()
                    elif isinstance(ev, StreamReset) and reply is not None:
                        reply.reset = True
                        reply.done.set()
                        reply.answered.set()
                    elif isinstance(ev, ConnectionTerminated):
                        break
                out = self.conn.data_to_send()
                if out:
                    self.writer.write(out)
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            for reply in self.replies.values():
                reply.done.set()
                reply.answered.set()

    def start(
        self,
        path: str,
        body: bytes,
        *,
        end: bool = True,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Reply:
        """Open a stream to ``path`` and send ``body`` as DATA (as much as the window allows).

        ``metadata`` adds request headers (e.g. the Workload API's security header).
        """
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("te", "trailers"),
            ("content-type", content_type or "application/grpc"),
            *(metadata or {}).items(),
        ]
        reply = self.replies[stream_id] = Reply()
        self.conn.send_headers(stream_id, headers, end_stream=not body and end)
        if body:
            window = min(self.conn.local_flow_control_window(stream_id), len(body))
            chunk = self.conn.max_outbound_frame_size
            for i in range(0, window, chunk):
                last = i + chunk >= window
                self.conn.send_data(
                    stream_id, body[i : min(i + chunk, window)], end_stream=end and last
                )
        self.writer.write(self.conn.data_to_send())
        return reply

    async def call(self, path: str, body: bytes, *, timeout: float = 10.0, **kw: object) -> Reply:
        reply = self.start(path, body, **kw)  # type: ignore[arg-type]
        await asyncio.wait_for(reply.done.wait(), timeout)
        return reply

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def stall_in_preface(path: str, count: int = 200, timeout: float = 20) -> None:
    """Open ``count`` connections that stop inside the HTTP/2 preface; return once all are closed.

    Each sends nothing or a prefix of the client preface, then waits for the
    server to close it (EOF, possibly after the server's own SETTINGS frame).
    Fails with TimeoutError if a connection is still open after ``timeout`` s.
    """
    stuck = []
    for i in range(count):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"PRI * HTTP/2.0\r\n"[: i % 16])  # nothing, or part of the preface
        stuck.append((reader, writer))
    for reader, _ in stuck:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    for _, writer in stuck:
        writer.close()
