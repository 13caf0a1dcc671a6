"""A blocking raw HTTP/2 client for gRPC edge cases no well-behaved gRPC client produces.

It speaks h2 (the library grpclib is built on) over a Unix socket and
exposes the response exactly as sent: headers, DATA bytes, trailers and
whether the server reset the stream. Flow control is obeyed, so the amount
of data the server let in is visible in ``Response.sent``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

__all__ = ["RawH2", "Response", "grpc_frame"]


def grpc_frame(
    body: bytes, *, compressed: bool = False, flag: int | None = None, length: int | None = None
) -> bytes:
    """A gRPC Length-Prefixed-Message; ``flag`` (any byte) overrides the compressed flag,
    ``length`` the declared size."""
    first = int(compressed) if flag is None else flag
    declared = len(body) if length is None else length
    return bytes([first]) + declared.to_bytes(4, "big") + body


@dataclass
class StreamReply:
    """What the server sent on one stream, as sent (both raw clients record this)."""

    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    reset: bool = False

    def grpc_field(self, name: str) -> str | None:
        """``name`` from the trailers, or from a trailers-only response's headers."""
        return self.trailers.get(name, self.headers.get(name))


@dataclass
class Response(StreamReply):
    """What came back on one stream."""

    ended: bool = False
    sent: int = 0  # request DATA bytes the server's flow control let through

    @property
    def grpc_status(self) -> str | None:
        """grpc-status from the trailers, or from a trailers-only response's headers."""
        return self.grpc_field("grpc-status")

    @property
    def grpc_message(self) -> str | None:
        return self.grpc_field("grpc-message")


def _text(pairs: list[tuple[bytes | str, bytes | str]]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in pairs
    }


class RawH2:
    """One HTTP/2 connection to a Unix socket; call :meth:`call` per stream."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self._flush()
        self._responses: dict[int, Response] = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _pump(self) -> bool:
        """Read once from the socket and process events; False when the connection closed."""
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return False
        if not data:
            return False
        for ev in self.conn.receive_data(data):
            response = self._responses.get(getattr(ev, "stream_id", 0) or 0)
            if isinstance(ev, h2.events.ResponseReceived) and response is not None:
                response.headers = _text(ev.headers)
            elif isinstance(ev, h2.events.TrailersReceived) and response is not None:
                response.trailers = _text(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if response is not None:
                    response.data += ev.data
            elif isinstance(ev, h2.events.StreamEnded) and response is not None:
                response.ended = True
            elif isinstance(ev, h2.events.StreamReset) and response is not None:
                response.reset = True
        self._flush()
        return True

    def call(
        self,
        path: str,
        chunks: list[bytes] | None = None,
        *,
        metadata: dict[str, str] | None = None,
        repeat: int = 1,
        headers: list[tuple[str, str]] | None = None,
        end: bool = True,
    ) -> Response:
        """POST ``path``, send ``chunks`` (``repeat`` times, as flow control allows), end, read all.

        Sending stops early once the server answered or reset the stream. With
        ``end=False`` the request stream is left open (the server must end it).
        """
        sid = self.conn.get_next_available_stream_id()
        response = Response()
        self._responses[sid] = response
        request_headers = headers or [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        request_headers += list((metadata or {}).items())
        self.conn.send_headers(sid, request_headers, end_stream=not chunks)
        self._flush()
        for _ in range(repeat if chunks else 0):
            for chunk in chunks or ():
                view = memoryview(chunk)
                while view and not (response.ended or response.reset):
                    try:
                        window = min(
                            self.conn.local_flow_control_window(sid),
                            self.conn.max_outbound_frame_size,
                        )
                    except h2.exceptions.StreamClosedError:
                        response.reset = True
                        break
                    if window <= 0:
                        if not self._pump():
                            return response
                        continue
                    piece = view[:window]
                    self.conn.send_data(sid, piece.tobytes())
                    self._flush()
                    response.sent += len(piece)
                    view = view[len(piece) :]
                if response.ended or response.reset:
                    break
            if response.ended or response.reset:
                break
        if end and chunks and not (response.ended or response.reset):
            try:
                self.conn.end_stream(sid)
                self._flush()
            except h2.exceptions.StreamClosedError:
                pass
        while not (response.ended or response.reset):
            if not self._pump():
                break
        return response
