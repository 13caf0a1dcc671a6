"""grpclib server edges peers understand: bounded request reads, precise statuses, UNIMPLEMENTED.

grpclib 0.4.9 has no receive-size limit (a declared 4 GB message is buffered
as it arrives), turns broken framing or protobuf into UNKNOWN with a
traceback, and answers an unknown method without ``content-type``, which
grpc-go reports as ``Unknown`` instead of ``Unimplemented``. These helpers fix
that for any grpclib server (the Workload API provider and the SDS server):

* :func:`recv_request` reads one message through the stream's codec, checking
  the declared length against a limit *before* reading the body
  (RESOURCE_EXHAUSTED, as grpc-go does), and maps truncated frames, the
  compressed flag and undecodable bytes to INVALID_ARGUMENT (gRPC over
  HTTP/2, "Length-Prefixed-Message").
* :func:`server_config` sets small HTTP/2 receive windows, so a handler that
  has not read a request (e.g. one that refused the caller first) can be sent
  at most one window of data per connection.
* :func:`answer_unknown_methods` makes every unregistered ``:path`` a normal
  gRPC call that ends with UNIMPLEMENTED in a trailers-only response carrying
  ``content-type: application/grpc+proto``.
* :class:`GuardedServer` is grpclib's ``Server`` with all of the above plus a
  handshake timeout, an idle timeout, a listen backlog sized for 1,000+
  clients, release of streams reset before their task ran, and memory
  reclaimed after a busy connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from grpclib.config import Configuration
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Handler as _GrpclibHandler
from grpclib.server import Server, Stream

from sds._util.log import event
from sds._util.process import boot_ticks
from sds._util.ratelimit import RateLimiter

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "LISTEN_BACKLOG",
    "MIN_WINDOW",
    "GuardedServer",
    "answer_unknown_methods",
    "recv_request",
    "server_config",
]

_Req = TypeVar("_Req")

# The smallest receive window HTTP/2 allows (RFC 9113, section 6.9.2: 2^16 - 1).
MIN_WINDOW = 65535
_PREFIX = 5

MSG_TRUNCATED = "request ended inside a gRPC message frame"
MSG_COMPRESSED = "compressed request messages are not supported (no grpc-encoding negotiated)"


def server_config(window: int = MIN_WINDOW) -> Configuration:
    """A grpclib server configuration whose connection and stream receive windows are ``window``."""
    return Configuration(http2_connection_window_size=window, http2_stream_window_size=window)


async def recv_request(stream: Stream[_Req, Any], limit: int) -> _Req | None:
    """The next request message on a grpclib server ``stream``, None at end of stream.

    Raises GRPCError: RESOURCE_EXHAUSTED when the message declares more than
    ``limit`` bytes (nothing beyond the 5-byte prefix is read), INVALID_ARGUMENT
    for a truncated frame, a set compressed flag or bytes the codec rejects.
    """
    h2_stream = stream._stream
    try:
        prefix = await h2_stream.recv_data(_PREFIX)
    except AssertionError as exc:  # grpclib's Buffer: "Received less data than expected"
        raise GRPCError(Status.INVALID_ARGUMENT, MSG_TRUNCATED) from exc
    if not prefix:
        return None
    flag, length = prefix[0], int.from_bytes(prefix[1:_PREFIX], "big")
    if flag == 1:
        raise GRPCError(Status.INVALID_ARGUMENT, MSG_COMPRESSED)
    if flag != 0:
        raise GRPCError(Status.INVALID_ARGUMENT, f"invalid gRPC message flag {flag}")
    if length > limit:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED,
            f"request message is {length} bytes; the limit is {limit}",
        )
    try:
        body = await h2_stream.recv_data(length) if length else b""
    except AssertionError as exc:
        raise GRPCError(Status.INVALID_ARGUMENT, MSG_TRUNCATED) from exc
    if len(body) != length:  # the stream ended right after the prefix: grpclib returns b""
        raise GRPCError(Status.INVALID_ARGUMENT, MSG_TRUNCATED)
    recv_type = stream._recv_type
    try:
        message = stream._codec.decode(body, recv_type)
    except Exception as exc:  # protobuf's DecodeError and friends: the bytes are the caller's
        name = getattr(recv_type, "__name__", "request")
        raise GRPCError(Status.INVALID_ARGUMENT, f"request is not a valid {name}") from exc
    (message,) = await stream._dispatch.recv_message(message)
    stream._messages_received += 1
    request: _Req = message
    return request


async def _unimplemented(stream: Any) -> None:
    raise GRPCError(Status.UNIMPLEMENTED, f"unknown method {stream._method_name}")


class _Methods(dict[str, Handler]):
    """A method table that hands every unknown ``:path`` to a handler answering UNIMPLEMENTED."""

    def __init__(self, known: dict[str, Handler], fallback: Handler) -> None:
        super().__init__(known)
        self._fallback = fallback

    def get(self, key: str, default: Any = None) -> Any:
        found = super().get(key)
        return found if found is not None else self._fallback


def answer_unknown_methods(server: Server, message_type: Any = None) -> Server:
    """Make ``server`` answer unregistered methods with UNIMPLEMENTED and a gRPC content-type.

    grpclib's own answer lacks ``content-type``, so grpc-go maps it to
    Unknown. ``message_type`` is the (never decoded) request type given to the
    codec; any registered method's type works, None suits codecs that take
    bytes. Call before ``start()``. Returns ``server``.
    """
    if message_type is None:
        known = list(server._mapping.values())
        message_type = known[0].request_type if known else bytes
    fallback = Handler(_unimplemented, Cardinality.UNARY_UNARY, message_type, message_type)
    server._mapping = _Methods(server._mapping, fallback)
    return server


# -- a hardened grpclib server --------------------------------------------------------------


class _GuardedProtocol(H2Protocol):
    """grpclib's HTTP/2 connection, closed when it never starts a call or sits idle.

    A connection that has not opened a stream ``handshake_timeout`` s after it was accepted
    (a client stuck in the preface or SETTINGS exchange, or one that only holds the fd) is
    closed; so is one with no open stream for ``idle_timeout`` s (checked every quarter of
    it). Envoy holds its SDS streams open, so neither affects it.

    ``accepted_ticks`` is when the connection was accepted, in the clock ticks since boot
    that ``/proc/<pid>/stat`` counts process start times in: on a kernel without
    ``SO_PEERPIDFD``, :func:`sds._util.process.peer_process` refuses a peer pid whose
    process started later (the pid was reused).
    """

    def __init__(
        self,
        handler: Any,
        config: Any,
        h2_config: Any,
        *,
        handshake: float,
        idle: float,
        on_close: Callable[[str, float], None],
    ) -> None:
        super().__init__(handler, config, h2_config)
        self._handshake = handshake
        self._idle = idle
        self._on_close = on_close
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None
        self._last_created: float | None = None
        self.accepted_ticks: int | None = None

    def connection_made(self, transport: Any) -> None:
        self.accepted_ticks = boot_ticks()
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._handshake, self._check_handshake)

    def _check_handshake(self) -> None:
        if not self.connection.streams_started:
            self._close("handshake_timeout", self._handshake)
            return
        self._check_idle()

    def _check_idle(self) -> None:
        now = time.monotonic()
        created = self.connection.last_stream_created
        if self.processor.streams or created != self._last_created:
            self._idle_since = None
            self._last_created = created
        elif self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= self._idle:
            self._close("idle_timeout", self._idle)
            return
        self._timer = asyncio.get_running_loop().call_later(self._idle / 4, self._check_idle)

    def _close(self, reason: str, seconds: float) -> None:
        self._timer = None
        self._on_close(reason, seconds)
        self.processor.close(f"closed by the server: {reason}")

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)
        if self.connection.streams_started >= _BUSY_CONNECTION:
            _reclaim_soon()


#: A connection that started this many streams triggers a memory reclaim when it closes.
_BUSY_CONNECTION = 1000


class _Handler(_GrpclibHandler):
    """grpclib's per-connection handler, releasing streams whose task never ran.

    grpclib releases a stream (drops it from the connection's table and returns its
    flow-control credit) at the end of its request task. A stream reset in the same read
    as its HEADERS has its task cancelled before it starts, so it was never released and
    stayed in memory until the connection closed (10,000 rapid resets held ~75 MB).
    """

    def accept(self, stream: Any, headers: Any, release_stream: Callable[[], Any]) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                release_stream()

        super().accept(stream, headers, release)
        task = self._tasks.get(stream)
        if task is not None:
            task.add_done_callback(lambda _: release())


_reclaim_handle: asyncio.TimerHandle | None = None


def _reclaim_soon() -> None:
    """After a busy connection closes, collect its cycles and give freed heap back to the OS.

    Debounced to once a second. ``malloc_trim`` is glibc's; elsewhere only the collection
    runs. Without it, RSS stayed ~50 MB above baseline after a burst of 10,000 streams.
    """
    global _reclaim_handle  # noqa: PLW0603 - one debounce timer per process
    if _reclaim_handle is None:
        _reclaim_handle = asyncio.get_running_loop().call_later(1.0, _reclaim)


def _reclaim() -> None:
    global _reclaim_handle  # noqa: PLW0603
    _reclaim_handle = None
    import ctypes  # noqa: PLC0415
    import ctypes.util  # noqa: PLC0415
    import gc  # noqa: PLC0415

    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


#: listen(2) backlog of a :class:`GuardedServer` (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096
#: Seconds a connection may take to open its first stream (preface, SETTINGS, HEADERS).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Seconds a connection may stay open with no stream.
DEFAULT_IDLE_TIMEOUT = 300.0


class GuardedServer(Server):
    """grpclib's server, hardened for hostile local clients.

    Adds to grpclib: UNIMPLEMENTED with a gRPC content-type for unknown methods
    (:func:`answer_unknown_methods`, with ``unknown_type`` as its message type) and
    64 KiB HTTP/2 receive windows (:func:`server_config`, unless ``config`` is given), so
    data a handler has not read yet (a caller being refused) is at most one window per
    connection; a ``handshake_timeout`` for connections that never open a stream; an
    ``idle_timeout`` for connections with no stream; a listen backlog of
    :data:`LISTEN_BACKLOG` (grpclib's default is 100, and asyncio re-applies it to a socket
    that is already listening); streams reset before their task ran are released, and
    memory is reclaimed after a busy connection closes. Closed connections are logged as
    ``connection_event`` on ``log`` (rate-limited). grpclib==0.4.9 is pinned;
    ``_protocol_factory``, ``_handlers`` and ``Handler._tasks`` are its internals.
    """

    def __init__(
        self,
        handlers: Collection[Any],
        *,
        codec: Any = None,
        config: Configuration | None = None,
        unknown_type: Any = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        log: logging.Logger | None = None,
        connection_event: str = "grpc.connection_closed",
    ) -> None:
        super().__init__(handlers, codec=codec, config=config or server_config())
        answer_unknown_methods(self, unknown_type)
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self._log = log or logging.getLogger("sds.grpc")
        self._connection_event = connection_event
        self._connection_log = RateLimiter(10, 60.0, max_keys=10)
        self._protocols: weakref.WeakSet[_GuardedProtocol] = weakref.WeakSet()

    def open_streams(self) -> int:
        """HTTP/2 streams the server's connections hold now (for tests and diagnostics)."""
        return sum(len(p.processor.streams) for p in list(self._protocols))

    def open_connections(self) -> int:
        """Connections the server holds open now (for tests and diagnostics)."""
        return len(self._protocols)

    def _connection_closed(self, reason: str, seconds: float) -> None:
        allowed, suppressed = self._connection_log.allow(reason)
        if allowed:
            fields: dict[str, Any] = {"reason": reason, "after_seconds": seconds}
            if suppressed:
                fields["suppressed"] = suppressed
            event(self._log, logging.INFO, self._connection_event, **fields)

    def _protocol_factory(self) -> H2Protocol:
        self.__gc_step__()
        handler = _Handler(
            self._mapping, self._codec, self._status_details_codec, self.__dispatch__
        )
        self._handlers.add(handler)
        protocol = _GuardedProtocol(
            handler,
            self._config,
            self._h2_config,
            handshake=self.handshake_timeout,
            idle=self.idle_timeout,
            on_close=self._connection_closed,
        )
        self._protocols.add(protocol)
        return protocol

    async def start(self, *args: Any, backlog: int = LISTEN_BACKLOG, **kwargs: Any) -> None:
        """grpclib's ``start`` with a backlog sized for 1,000+ clients connecting at once."""
        await super().start(*args, backlog=backlog, **kwargs)
