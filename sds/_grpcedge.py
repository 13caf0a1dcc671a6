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
"""

from __future__ import annotations

from typing import Any

from grpclib.config import Configuration
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

__all__ = [
    "MIN_WINDOW",
    "answer_unknown_methods",
    "recv_request",
    "server_config",
]

# The smallest receive window HTTP/2 allows (RFC 9113, section 6.9.2: 2^16 - 1).
MIN_WINDOW = 65535
_PREFIX = 5

MSG_TRUNCATED = "request ended inside a gRPC message frame"
MSG_COMPRESSED = "compressed request messages are not supported (no grpc-encoding negotiated)"


def server_config(window: int = MIN_WINDOW) -> Configuration:
    """A grpclib server configuration whose connection and stream receive windows are ``window``."""
    return Configuration(http2_connection_window_size=window, http2_stream_window_size=window)


async def recv_request(stream: Any, limit: int) -> Any:
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
    return message


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
