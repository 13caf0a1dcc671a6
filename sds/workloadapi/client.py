"""Asyncio client for the SPIFFE Workload API: the bridge's upstream side.

This is the only module, besides the embedded provider, that reads
``workload_pb2`` messages; everything it returns is a protobuf-free domain
type from :mod:`sds.spiffe.x509` and :mod:`sds.spiffe.jwt`.

Standards followed:

* SPIFFE Workload Endpoint, section 4: the endpoint address is
  ``unix:///absolute/path`` or ``tcp://IP:PORT`` (an IP literal, never a host
  name), taken from ``SPIFFE_ENDPOINT_SOCKET`` when not configured.
* SPIFFE Workload Endpoint, section 3: every call carries the security header
  ``workload.spiffe.io: true``; section 6: a server that does not see it
  answers ``INVALID_ARGUMENT``; ``UNAVAILABLE`` and ``PERMISSION_DENIED`` are
  retried with backoff.
* SPIFFE Workload API, sections 4.2-4.4: keep the stream open and reconnect
  when it drops; every ``FetchX509SVID`` / ``FetchJWTBundles`` message is the
  complete, current state, so SVIDs or bundles missing from it are withdrawn.
  Section 5.2.1: ``PERMISSION_DENIED`` means the caller must stop using its
  SVIDs. Section 5.3: the first SVID is the default.
* X509-SVID, sections 4-5, via :meth:`X509Svid.parse` and :meth:`X509Svid.verify`;
  each SVID is verified against the bundle sent with it (its mandatory
  ``bundle`` field, Workload API s.5.1).

:class:`WorkloadApiClient` makes single calls and raw streams; :class:`Watcher`
is the long-running, self-healing consumer that ``sds run`` serves from.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import ipaddress
import json
import logging
import os
import random
import struct
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from sds._proto import workload_pb2
from sds._proto.workload_grpc import SpiffeWorkloadAPIStub
from sds._util.log import event
from sds.errors import (
    ConfigError,
    InvalidBundle,
    InvalidJwt,
    InvalidSpiffeId,
    InvalidSvid,
    WorkloadApiDenied,
    WorkloadApiError,
    WorkloadApiMisconfigured,
    WorkloadApiUnavailable,
)
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.jwt import JwtBundle, b64url_decode
from sds.spiffe.x509 import BundleSet, X509Bundle, X509Context, X509Svid, utc_text, utcnow

__all__ = [
    "ENDPOINT_ENV",
    "SECURITY_HEADER",
    "Address",
    "Backoff",
    "JwtSvid",
    "NullEvents",
    "Watcher",
    "WatcherEvents",
    "WorkloadApiClient",
    "parse_address",
]

logger = logging.getLogger("sds.workloadapi")

#: Environment variable naming the Workload API endpoint (Workload Endpoint s.4).
ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
#: The security header sent on every call (Workload Endpoint s.3).
SECURITY_HEADER = ("workload.spiffe.io", "true")
_METADATA = dict([SECURITY_HEADER])

#: Deadline of every unary call and of the first message of a one-shot stream (seconds).
CALL_TIMEOUT = 10.0
#: Largest message accepted from a Workload API (bytes): far above real bundles (a
#: federation of hundreds of trust domains is a few MiB), far below what hurts memory.
MAX_MESSAGE_BYTES = 16 * 2**20
#: Seconds between HTTP/2 PINGs on the upstream connection. grpc-go servers (SPIRE, tbot)
#: refuse clients that ping more often than every 5 minutes (ENHANCE_YOUR_CALM), so stay
#: just above it; a silent stream is caught earlier by the Watcher's stall deadline.
KEEPALIVE_INTERVAL = 310.0
#: Seconds to wait for a PING's answer before the connection is declared dead.
KEEPALIVE_TIMEOUT = 20.0
# grpclib's messages for a response that is not gRPC (no or another content-type, HTTP error).
_NOT_GRPC = ("Missing content-type header", "Invalid content-type", "Received :status")


class MessageTooLarge(Exception):
    """A peer declared a message longer than the receive limit (internal; mapped in _errors)."""


def _method_name(method: Any) -> str:
    """``FetchJWTSVID`` for grpclib's method object named ``/SpiffeWorkloadAPI/FetchJWTSVID``."""
    return str(getattr(method, "name", "")).rpartition("/")[2]


async def _recv_capped(stream: Any, limit: int) -> Any:
    """The next message of a grpclib client stream, or None at its end; refuses a message
    whose declared length exceeds ``limit`` before reading its body.

    grpclib 0.4.9 (pinned) buffers a message of any declared length; this is its
    ``Stream.recv_message`` with the length checked first (gRPC over HTTP/2: a
    message is a 1-byte compressed flag, a 4-byte big-endian length, the bytes).
    """
    if not stream._recv_initial_metadata_done:
        await stream.recv_initial_metadata()
    with stream._wrapper:
        prefix = await stream._stream.recv_data(5)
        if not prefix:
            return None
        if prefix[0]:
            raise ProtocolError("compressed messages are not supported")
        length = int.from_bytes(prefix[1:5], "big")
        if length > limit:
            raise MessageTooLarge(f"a {length}-byte message (the limit is {limit} bytes)")
        data = await stream._stream.recv_data(length)
        return stream._codec.decode(data, stream._recv_type)


# --------------------------------------------------------------------------- address


@dataclass(frozen=True, slots=True)
class Address:
    """A Workload API endpoint: a Unix socket path or a TCP ``IP:port`` (Workload Endpoint s.4).

    ``str(address)`` is the canonical URI (``unix:///path`` or ``tcp://ip:port``).
    """

    scheme: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return "unix://" + self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_address(text: str | None, *, option: str = "--workload-api") -> Address:
    """Parse a Workload API address; ``None`` or ``""`` means ``$SPIFFE_ENDPOINT_SOCKET``.

    Accepts ``unix:///abs/path``, ``unix:/abs/path`` and ``tcp://IP:PORT`` with an
    IP literal (SPIFFE Workload Endpoint s.4). Raises ConfigError with one line
    naming the address (and its source) and what is wrong; ``option`` is the
    command-line flag named when no address is configured at all.
    """
    source = ""
    if not text:
        text = os.environ.get(ENDPOINT_ENV, "")
        source = f" (from {ENDPOINT_ENV})"
        if not text:
            raise ConfigError(f"no workload API address: set {ENDPOINT_ENV} or pass {option}")

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"workload API address {text!r}{source} {reason}")

    generic = "must be unix:///path or tcp://ip:port"
    if "\x00" in text:
        raise bad("contains a NUL byte")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise bad(generic) from exc
    if parts.scheme == "unix":
        if parts.netloc:
            raise bad("must not name a host; use unix:///absolute/path")
        if parts.query or parts.fragment or "?" in text or "#" in text:
            raise bad("must not have a query or fragment")
        if not parts.path.startswith("/"):
            raise bad("must have an absolute socket path (unix:///absolute/path)")
        return Address("unix", path=parts.path)
    if parts.scheme == "tcp":
        if parts.path or parts.query or parts.fragment or "?" in text or "#" in text:
            raise bad("must not have a path, query or fragment")
        if parts.username is not None or parts.password is not None:
            raise bad("must not have user info")
        try:
            port = parts.port
        except ValueError as exc:
            raise bad("has an invalid port") from exc
        host = parts.hostname
        if not host:
            raise bad(generic)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError as exc:
            raise bad(f"must use an IP address, not the host name {host!r}") from exc
        if not port:
            raise bad("must include a port (tcp://ip:port)")
        return Address("tcp", host=str(ip), port=port)
    raise bad(generic)


def _coerce_address(address: Address | str | None) -> Address:
    return address if isinstance(address, Address) else parse_address(address)


# --------------------------------------------------------------------------- conversion


@dataclass(frozen=True, slots=True)
class JwtSvid:
    """A JWT-SVID as fetched: subject, compact token, hint, and the token's ``exp`` (UTC).

    The token is not verified here: it comes straight from the trusted local
    Workload API; relying parties validate it (JWT-SVID s.4).
    """

    spiffe_id: SpiffeId
    token: str = field(repr=False)
    hint: str
    expiry: dt.datetime


def _trust_domain_key(key: str, what: str) -> TrustDomain:
    try:
        return TrustDomain.parse(key)
    except InvalidSpiffeId as exc:
        raise InvalidBundle(f"{what} key {key!r} is not a trust domain: {exc}") from exc


def _x509_bundle_map(entries: Mapping[str, bytes], what: str) -> list[X509Bundle]:
    """Parse a ``"spiffe://td" -> DER`` map; raise InvalidBundle naming the bad entry."""
    return [
        X509Bundle.from_der(_trust_domain_key(key, what), bytes(der))
        for key, der in sorted(entries.items())
    ]


def _response_bundles(resp: Any) -> tuple[BundleSet, list[X509Bundle | None]]:
    """The bundles of one X509SVIDResponse, and each SVID's own bundle (None if absent).

    Own bundles (each SVID's ``bundle`` field) come first; federated bundles
    never replace an own trust domain's bundle. Raises InvalidBundle if any
    bundle is malformed: such a message cannot be used as a whole. An SVID
    whose mandatory ``bundle`` is empty gets None and fails verification
    (Workload API s.4.5: a message missing a mandatory field is not used).
    """
    own: list[X509Bundle | None] = []
    merged: dict[TrustDomain, X509Bundle] = {}
    for msg in resp.svids:
        try:
            td = SpiffeId.parse(msg.spiffe_id).trust_domain
        except InvalidSpiffeId:
            own.append(None)  # the SVID itself is rejected when parsed
            continue
        if not msg.bundle:
            own.append(None)
            continue
        bundle = X509Bundle.from_der(td, bytes(msg.bundle))
        own.append(bundle)
        merged.setdefault(td, bundle)
    for bundle in _x509_bundle_map(resp.federated_bundles, "federated bundle"):
        merged.setdefault(bundle.trust_domain, bundle)
    return BundleSet(merged.values()), own


def _convert_svid(msg: Any, own: X509Bundle | None, now: dt.datetime) -> X509Svid:
    """Parse and verify one wire SVID against the bundle sent with it; raise InvalidSvid."""
    try:
        svid = X509Svid.parse(
            msg.spiffe_id, bytes(msg.x509_svid), bytes(msg.x509_svid_key), msg.hint
        )
        svid.verify(own, now)
    except (ValueError, TypeError) as exc:  # e.g. cryptography on a malformed extension
        raise InvalidSvid(f"SVID {msg.spiffe_id}: {exc}") from exc
    return svid


def _x509_context(resp: Any) -> X509Context:
    """Convert one X509SVIDResponse strictly: any bad bundle or SVID raises."""
    now = utcnow()
    bundles, own = _response_bundles(resp)
    svids = tuple(_convert_svid(msg, b, now) for msg, b in zip(resp.svids, own, strict=True))
    return X509Context(svids, bundles)


def _jwt_bundle_map(entries: Mapping[str, bytes]) -> dict[TrustDomain, JwtBundle]:
    bundles: dict[TrustDomain, JwtBundle] = {}
    for key, jwks in sorted(entries.items()):
        td = _trust_domain_key(key, "JWT bundle")
        bundles[td] = JwtBundle.from_jwks(td, bytes(jwks))
    return bundles


def _jwt_svid(msg: Any) -> JwtSvid:
    """Convert one wire JWT-SVID, reading ``sub`` and ``exp`` from the (unverified) payload."""
    try:
        sid = SpiffeId.parse(msg.spiffe_id)
    except InvalidSpiffeId as exc:
        raise InvalidJwt(f"JWT-SVID has a bad spiffe_id: {exc}") from exc
    parts = msg.svid.split(".")
    if len(parts) != 3:
        raise InvalidJwt(f"JWT-SVID {sid}: token is not a compact JWS")
    try:
        claims = json.loads(b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJwt(f"JWT-SVID {sid}: token payload is not base64url JSON") from exc
    if not isinstance(claims, dict):
        raise InvalidJwt(f"JWT-SVID {sid}: token payload is not a JSON object")
    if claims.get("sub") != str(sid):
        raise InvalidJwt(f"JWT-SVID {sid}: token subject is {claims.get('sub')!r}")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise InvalidJwt(f"JWT-SVID {sid}: token has no numeric 'exp' claim")
    try:
        expiry = dt.datetime.fromtimestamp(exp, dt.UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise InvalidJwt(f"JWT-SVID {sid}: token 'exp' {exp} is out of range") from exc
    return JwtSvid(sid, msg.svid, msg.hint, expiry)


def _plain(value: Any) -> Any:
    """Struct JSON numbers are floats; give whole numbers back as ints (``exp``, ``iat``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- client


class WorkloadApiClient:
    """One connection to a Workload API; single calls and raw streams, errors translated.

    The gRPC channel (grpclib; ``path=`` for Unix sockets, host/port for TCP)
    is opened lazily on the first call and reconnects on the next call after
    the connection drops. Every call carries the security header (Workload
    Endpoint s.3). Failures raise: WorkloadApiUnavailable (socket missing,
    refused, connection lost, ``UNAVAILABLE``), WorkloadApiDenied
    (``PERMISSION_DENIED``), WorkloadApiMisconfigured (``INVALID_ARGUMENT``),
    WorkloadApiError (any other status); messages that fail conversion raise
    InvalidSvid, InvalidBundle or InvalidJwt.
    """

    def __init__(
        self,
        address: Address | str,
        *,
        call_timeout: float = CALL_TIMEOUT,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        keepalive: float | None = KEEPALIVE_INTERVAL,
    ) -> None:
        self.address = _coerce_address(address)
        self.call_timeout = call_timeout
        self.max_message_bytes = max_message_bytes
        self._keepalive = keepalive
        self._channel: Channel | None = None
        self._stub: SpiffeWorkloadAPIStub | None = None

    def _api(self) -> SpiffeWorkloadAPIStub:
        if self._stub is None:
            config = None
            if self._keepalive is not None:
                # HTTP/2 PINGs on an idle connection, unlimited in number: a peer that stops
                # answering for KEEPALIVE_TIMEOUT seconds is dropped and the watch reconnects.
                config = Configuration(
                    _keepalive_time=self._keepalive,
                    _keepalive_timeout=KEEPALIVE_TIMEOUT,
                    _keepalive_permit_without_calls=True,
                    _http2_max_pings_without_data=0,
                    _http2_min_sent_ping_interval_without_data=self._keepalive,
                )
            if self.address.scheme == "unix":
                self._channel = Channel(path=self.address.path, config=config)
            else:
                self._channel = Channel(
                    host=self.address.host, port=self.address.port, config=config
                )
            self._stub = SpiffeWorkloadAPIStub(self._channel)
        return self._stub

    def close(self) -> None:
        """Close the connection; a later call opens a new one."""
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    async def __aenter__(self) -> WorkloadApiClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- error translation -------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, method: str = "") -> Iterator[None]:
        where = f"workload API at {self.address}"
        try:
            yield
        except TimeoutError as exc:
            raise WorkloadApiUnavailable(
                f"{where} did not answer {method or 'the call'} within {self.call_timeout:g}s"
            ) from exc
        except GRPCError as exc:
            message = exc.message or exc.status.name
            if exc.status is Status.UNKNOWN and message.startswith(_NOT_GRPC):
                # HTTP/2 that is not gRPC (or a gRPC peer that omits content-type).
                raise WorkloadApiMisconfigured(
                    f"{self.address}: not a SPIFFE Workload API (the peer does not speak gRPC)"
                ) from exc
            if exc.status is Status.UNIMPLEMENTED and method:
                raise WorkloadApiMisconfigured(
                    f"{self.address}: not a SPIFFE Workload API "
                    f"(the peer does not implement {method})"
                ) from exc
            if exc.status is Status.UNAVAILABLE:
                raise WorkloadApiUnavailable(f"{where} is unavailable: {message}") from exc
            if exc.status is Status.PERMISSION_DENIED:
                raise WorkloadApiDenied(f"permission denied: {message}") from exc
            if exc.status is Status.INVALID_ARGUMENT:
                raise WorkloadApiMisconfigured(
                    f"{where} rejected the request as invalid: {message}"
                ) from exc
            raise WorkloadApiError(f"{where} failed: {exc.status.name}: {message}") from exc
        except StreamTerminatedError as exc:
            reason = (str(exc) or "stream terminated").lower()
            raise WorkloadApiUnavailable(f"{where} is unavailable: {reason}") from exc
        except FileNotFoundError as exc:
            raise WorkloadApiUnavailable(f"{where} is unavailable: socket not found") from exc
        except ConnectionRefusedError as exc:
            raise WorkloadApiUnavailable(f"{where} is unavailable: connection refused") from exc
        except PermissionError as exc:
            raise WorkloadApiUnavailable(
                f"{where} is unavailable: no permission to connect to the socket"
            ) from exc
        except OSError as exc:
            reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
            raise WorkloadApiUnavailable(f"{where} is unavailable: {reason}") from exc
        except ProtocolError as exc:
            raise WorkloadApiError(f"{where}: gRPC protocol error: {exc}") from exc
        except MessageTooLarge as exc:
            raise WorkloadApiError(f"{where} sent {exc}") from exc

    async def _stream(self, method: Any, request: Any) -> AsyncGenerator[Any, None]:
        """Raw messages of one server stream, until the server ends it."""
        with self._errors(_method_name(method)):
            async with method.open(metadata=_METADATA) as stream:
                await stream.send_message(request, end=True)
                while (message := await _recv_capped(stream, self.max_message_bytes)) is not None:
                    yield message

    @contextlib.asynccontextmanager
    async def _call(self, method: Any, request: Any) -> AsyncIterator[Any]:
        """The stream of one call bounded by ``call_timeout``, its request sent; failures
        inside (the caller's reads included) become Workload API errors."""
        with self._errors(_method_name(method)):
            async with (
                asyncio.timeout(self.call_timeout),
                method.open(metadata=_METADATA) as stream,
            ):
                await stream.send_message(request, end=True)
                yield stream

    async def _first(self, method: Any, request: Any, what: str) -> Any:
        """The first message of a server stream within ``call_timeout``; then cancelled."""
        async with self._call(method, request) as stream:
            message = await _recv_capped(stream, self.max_message_bytes)
            if message is not None:
                await stream.cancel()
        if message is None:
            raise WorkloadApiUnavailable(
                f"workload API at {self.address} ended the {what} stream without a response"
            )
        return message

    async def _unary(self, method: Any, request: Any) -> Any:
        """One unary call, answered within ``call_timeout`` and at most ``max_message_bytes``."""
        async with self._call(method, request) as stream:
            message = await _recv_capped(stream, self.max_message_bytes)
            await stream.recv_trailing_metadata()
        if message is None:
            raise WorkloadApiUnavailable(
                f"workload API at {self.address} answered {_method_name(method)} with no message"
            )
        return message

    def _x509_responses(self) -> AsyncGenerator[Any, None]:
        return self._stream(self._api().FetchX509SVID, workload_pb2.X509SVIDRequest())

    def _jwt_bundle_responses(self) -> AsyncGenerator[Any, None]:
        return self._stream(self._api().FetchJWTBundles, workload_pb2.JWTBundlesRequest())

    # -- X.509 ----------------------------------------------------------------

    async def fetch_x509_context(self) -> X509Context:
        """The caller's current SVIDs and bundles: the first FetchX509SVID message (strict)."""
        resp = await self._first(
            self._api().FetchX509SVID, workload_pb2.X509SVIDRequest(), "X.509-SVID"
        )
        return _x509_context(resp)

    async def x509_contexts(self) -> AsyncGenerator[X509Context, None]:
        """Every FetchX509SVID message, each the complete state, until the server ends it."""
        async with contextlib.aclosing(self._x509_responses()) as responses:
            async for resp in responses:
                yield _x509_context(resp)

    async def fetch_x509_bundles(self) -> BundleSet:
        """Every X.509 bundle the caller trusts: the first FetchX509Bundles message."""
        resp = await self._first(
            self._api().FetchX509Bundles, workload_pb2.X509BundlesRequest(), "X.509 bundle"
        )
        return BundleSet(_x509_bundle_map(resp.bundles, "X.509 bundle"))

    async def x509_bundles(self) -> AsyncGenerator[BundleSet, None]:
        """Every FetchX509Bundles message, each the complete set of bundles."""
        stream = self._stream(self._api().FetchX509Bundles, workload_pb2.X509BundlesRequest())
        async with contextlib.aclosing(stream) as responses:
            async for resp in responses:
                yield BundleSet(_x509_bundle_map(resp.bundles, "X.509 bundle"))

    # -- JWT --------------------------------------------------------------------

    async def fetch_jwt_svids(
        self, audience: Sequence[str], spiffe_id: str | None = None
    ) -> list[JwtSvid]:
        """JWT-SVIDs for ``audience`` (all of the caller's identities, or only ``spiffe_id``)."""
        request = workload_pb2.JWTSVIDRequest(audience=list(audience), spiffe_id=spiffe_id or "")
        resp = await self._unary(self._api().FetchJWTSVID, request)
        return [_jwt_svid(msg) for msg in resp.svids]

    async def fetch_jwt_bundles(self) -> dict[TrustDomain, JwtBundle]:
        """Every JWT bundle the caller trusts: the first FetchJWTBundles message."""
        resp = await self._first(
            self._api().FetchJWTBundles, workload_pb2.JWTBundlesRequest(), "JWT bundle"
        )
        return _jwt_bundle_map(resp.bundles)

    async def jwt_bundles(self) -> AsyncGenerator[dict[TrustDomain, JwtBundle], None]:
        """Every FetchJWTBundles message, each the complete set of JWT bundles."""
        async with contextlib.aclosing(self._jwt_bundle_responses()) as responses:
            async for resp in responses:
                yield _jwt_bundle_map(resp.bundles)

    async def validate_jwt_svid(self, token: str, audience: str) -> tuple[SpiffeId, dict[str, Any]]:
        """Have the Workload API validate ``token`` for ``audience``; return subject and claims.

        The server reports a token it rejects as ``INVALID_ARGUMENT``, so that
        surfaces as WorkloadApiMisconfigured carrying the server's reason.
        """
        request = workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token)
        resp = await self._unary(self._api().ValidateJWTSVID, request)
        try:
            sid = SpiffeId.parse(resp.spiffe_id)
        except InvalidSpiffeId as exc:
            raise InvalidJwt(f"validated token has a bad spiffe_id: {exc}") from exc
        from google.protobuf import json_format  # type: ignore[import-untyped]  # noqa: PLC0415

        claims: dict[str, Any] = _plain(json_format.MessageToDict(resp.claims))
        return sid, claims


# --------------------------------------------------------------------------- socket watch

#: Seconds the first X.509-SVID message may take after connecting.
FIRST_MESSAGE_TIMEOUT = 10.0
#: How long an open X.509-SVID stream may stay silent: this fraction of the remaining
#: lifetime of the earliest-expiring SVID, clamped to [SILENCE_MIN, SILENCE_MAX] seconds.
SILENCE_FRACTION = 0.75
SILENCE_MIN = 1.0
SILENCE_MAX = 300.0
#: After the socket reappears, connection failures are retried this many times every
#: FAST_RETRY_DELAY seconds (a server binds before it serves) before the backoff resumes.
FAST_RETRIES = 20
FAST_RETRY_DELAY = 0.005
#: Stat-poll interval when inotify is not available (only while disconnected).
_POLL_INTERVAL = 0.2

_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_EVENT = struct.Struct("iIII")


def _inode(path: str) -> tuple[int, int, int] | None:
    """Identity of the file at ``path``: device, inode and change time (tmpfs reuses inode
    numbers at once, so a recreated socket can carry its predecessor's), or None."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino, info.st_ctime_ns)


def _inotify_directory(directory: str) -> int:
    """An inotify fd watching ``directory`` for created and moved-in entries; raise OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1 failed")
    mask = _IN_CREATE | _IN_MOVED_TO | _IN_DELETE_SELF | _IN_MOVE_SELF
    if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
        errno = ctypes.get_errno()
        os.close(fd)
        raise OSError(errno, f"inotify_add_watch {directory} failed")
    return fd


class SocketWatch:
    """Tells when a Unix socket path is created or replaced, so a reconnect need not wait
    out its backoff.

    Linux: inotify on the socket's directory (no polling); elsewhere, or while the
    directory itself is missing, a stat poll every 0.2 s. It exists only while the
    watcher is disconnected. If the path already holds another inode than
    ``known`` (the socket we were last connected to, if any), that counts as
    having appeared.
    """

    def __init__(self, path: str, known: tuple[int, int, int] | None) -> None:
        self._path = path
        self._directory, self._name = os.path.split(path)
        self._appeared = asyncio.Event()
        self._fd = -1
        self._poller: asyncio.Task[None] | None = None
        current = _inode(path)
        self._seen = current  # what the stat poll compares against
        self._start()
        if known is not None and current is not None and current != known:
            self._appeared.set()  # replaced between the disconnect and this watch

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if sys.platform.startswith("linux"):
            try:
                self._fd = _inotify_directory(self._directory)
            except (OSError, AttributeError):
                self._fd = -1
            else:
                loop.add_reader(self._fd, self._readable)
                return
        self._poller = loop.create_task(self._poll(), name="socket-poll")

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        offset = 0
        gone = not data
        while offset + _EVENT.size <= len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED):
                gone = True
            elif mask & _IN_Q_OVERFLOW or os.fsdecode(name) == self._name:
                self._appeared.set()  # an overflow may have hidden ours: try once more
        if gone:  # the directory went away: fall back to polling until it is back
            self._close_fd()
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="socket-poll")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(_POLL_INTERVAL)
            current = _inode(self._path)
            if current != self._seen:
                self._seen = current
                if current is not None:
                    self._appeared.set()

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait up to ``timeout`` s; True if the socket appeared (the flag is then cleared)."""
        try:
            async with asyncio.timeout(timeout):
                await self._appeared.wait()
        except TimeoutError:
            return False
        self._appeared.clear()
        return True

    def _close_fd(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Stop watching (on connect, or when the watcher stops)."""
        self._close_fd()
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None


# --------------------------------------------------------------------------- watcher


class WatcherEvents(Protocol):
    """What a Watcher reports as it runs: the seam for metrics (the core knows no Prometheus).

    Every method is called synchronously on the event loop and must not block.
    """

    def on_connected(self) -> None:
        """The X.509-SVID stream delivered its first message on a new connection."""
        return None

    def on_disconnected(self, error: WorkloadApiError) -> None:
        """An X.509-SVID stream attempt ended or failed with ``error``; a retry follows."""
        return None

    def on_x509_update(self, ctx: X509Context) -> None:
        """The published X.509 state changed to ``ctx``."""
        return None

    def on_svid_rejected(self, error: InvalidSvid) -> None:
        """An SVID in a new message failed validation and was not taken."""
        return None

    def on_svid_expired(self, svid: X509Svid) -> None:
        """A held SVID reached its expiry without a replacement and was dropped."""
        return None

    def on_jwt_bundles_update(self, bundles: Mapping[TrustDomain, JwtBundle]) -> None:
        """The JWT bundles changed."""
        return None

    def on_misconfigured(self, error: WorkloadApiMisconfigured) -> None:
        """The server answered ``INVALID_ARGUMENT``: a configuration problem, not an outage."""
        return None


class NullEvents(WatcherEvents):
    """WatcherEvents that do nothing (the Protocol's bodies are no-ops): the default."""


class Backoff:
    """Exponential backoff with full jitter.

    Attempt ``n`` (counting from 1 after the last :meth:`reset`) waits a uniform
    random time in ``[0, min(maximum, initial * 2**(n-1))]``.
    """

    def __init__(
        self, initial: float, maximum: float, rng: Callable[[], float] = random.random
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {initial}, {maximum}")
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0
        self._rng = rng

    def ceiling(self) -> float:
        """The upper bound of the current attempt's delay."""
        exponent = min(max(self.attempt - 1, 0), 64)
        return float(min(self.maximum, self.initial * 2**exponent))

    def next_delay(self) -> float:
        """Count one more failed attempt and return how long to wait before the next."""
        self.attempt += 1
        return self._rng() * self.ceiling()

    def reset(self) -> None:
        """Start over from ``initial`` (after a good message)."""
        self.attempt = 0


def _expiry(svid: X509Svid) -> dt.datetime:
    """When the SVID stops being usable: the earliest not-after in its chain."""
    return min(cert.not_valid_after_utc for cert in svid.chain)


def _fingerprint(svid: X509Svid) -> tuple[str, str, bytes, bytes]:
    return (str(svid.spiffe_id), svid.hint, svid.chain_der(), svid.key_der())


def _same_x509(a: X509Context, b: X509Context) -> bool:
    return a.bundles == b.bundles and [_fingerprint(s) for s in a.svids] == [
        _fingerprint(s) for s in b.svids
    ]


def _same_jwt(a: Mapping[TrustDomain, JwtBundle], b: Mapping[TrustDomain, JwtBundle]) -> bool:
    return {td: x.to_jwks() for td, x in a.items()} == {td: x.to_jwks() for td, x in b.items()}


class Watcher:
    """Keeps the latest valid Workload API state, forever; an ``sds.spiffe.x509.X509Source``.

    :meth:`run` follows the X.509-SVID stream and the JWT bundle stream over
    one connection, reconnecting with exponential backoff and full jitter
    (reset after each good message) until cancelled. A stream that sends no
    first message within ``first_message_timeout``, or stays silent past 3/4 of
    the remaining lifetime of the earliest-expiring SVID held (1 s to
    ``silence_max``), is abandoned for a new connection; on a Unix socket the
    socket's directory is watched while disconnected and a reappearing socket
    is connected at once, without waiting out the backoff. Each message is the
    complete state (Workload API s.5): SVIDs missing from it are withdrawn.
    SVIDs are validated one by one: an invalid one is reported and the last
    good SVID with the same SPIFFE ID and hint is kept while unexpired; a
    message whose bundles do not parse is rejected whole. Identical updates
    are dropped. A timer at the earliest expiry removes expired SVIDs, so
    :meth:`current` never returns one. ``PERMISSION_DENIED`` withdraws the SVIDs
    (bundles stay); ``INVALID_ARGUMENT`` is reported as a configuration problem
    and retried only every ``backoff_max`` seconds (Workload Endpoint s.6 says
    not to retry it at all; a sidecar must not give up for good, so it retries
    slowly). Listeners registered with
    :meth:`subscribe` run synchronously on the loop after every state change.
    """

    def __init__(
        self,
        address: Address | str | None,
        *,
        events: WatcherEvents | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        first_message_timeout: float = FIRST_MESSAGE_TIMEOUT,
        silence_max: float = SILENCE_MAX,
        watch_socket: bool = True,
    ) -> None:
        self.address = _coerce_address(address)
        self._events: WatcherEvents = events if events is not None else NullEvents()
        Backoff(backoff_initial, backoff_max)  # validate the arguments early
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self.first_message_timeout = first_message_timeout
        self.silence_max = silence_max
        self._watch_socket = watch_socket and self.address.scheme == "unix"
        self._socket_watch: SocketWatch | None = None
        self._connected_inode: tuple[int, int, int] | None = None
        self._reconnected = asyncio.Event()
        # Quick retries left since the socket appeared (it may be bound but not serving yet).
        self._fast_retries = 0
        self._ctx: X509Context | None = None
        self._jwt: dict[TrustDomain, JwtBundle] = {}
        self._listeners: list[Callable[[], None]] = []
        self._ready = asyncio.Event()
        self._last_error: WorkloadApiError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expires_at: dt.datetime | None = None
        self._connected = False
        self._notified = 0  # notifications sent so far

    # -- public state ------------------------------------------------------

    def current(self) -> X509Context | None:
        """The latest validated X.509 state (never holding an expired SVID), or None before any."""
        ctx = self._ctx
        if ctx is not None and self._expires_at is not None:
            now = utcnow()
            if self._expires_at <= now:  # the expiry timer has not run yet
                return X509Context(tuple(s for s in ctx.svids if _expiry(s) > now), ctx.bundles)
        return ctx

    def jwt_bundles(self) -> Mapping[TrustDomain, JwtBundle]:
        """The latest JWT bundles (read-only view; empty before the first message)."""
        return MappingProxyType(self._jwt)

    @property
    def connected(self) -> bool:
        """Whether the X.509-SVID stream is up now (a message arrived since the last failure)."""
        return self._connected

    @property
    def last_error(self) -> WorkloadApiError | None:
        """The most recent X.509 stream failure, or None."""
        return self._last_error

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` synchronously on the loop after every state change."""
        self._listeners.append(callback)

    async def wait_ready(self, timeout: float) -> X509Context:  # noqa: ASYNC109
        """Wait up to ``timeout`` seconds for the first X.509 state and return it.

        On timeout raises the class of the last stream error (WorkloadApiError
        subclasses) with its reason, or WorkloadApiUnavailable if none was seen.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            err = self._last_error
            if err is None:
                raise WorkloadApiUnavailable(
                    f"workload API at {self.address} sent no X.509-SVIDs within {timeout:g}s"
                ) from None
            raise type(err)(f"no X.509-SVIDs within {timeout:g}s: {err}") from err
        ctx = self.current()
        assert ctx is not None
        return ctx

    # -- running -----------------------------------------------------------

    async def run(self) -> None:
        """Follow the Workload API until cancelled (never returns otherwise)."""
        client = WorkloadApiClient(self.address)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._x509_loop(client))
                group.create_task(self._jwt_loop(client))
        finally:
            self._cancel_timer()
            client.close()

    async def _x509_loop(self, client: WorkloadApiClient) -> None:
        backoff = Backoff(self._backoff_initial, self._backoff_max)
        try:
            while True:
                try:
                    await self._follow_x509(client, backoff)
                    continue  # the stream went silent: reconnect at once
                except WorkloadApiUnavailable as exc:
                    if self._fast_retries:
                        self._fast_retries -= 1
                        self._last_error = exc
                        event(logger, logging.DEBUG, "workload_api.not_serving_yet", error=exc)
                        delay = FAST_RETRY_DELAY
                    else:
                        delay = self._x509_failed(exc, backoff)
                except WorkloadApiError as exc:
                    delay = self._x509_failed(exc, backoff)
                except Exception as exc:  # noqa: BLE001 - policy: log, then retry like an outage
                    event(logger, logging.ERROR, "workload_api.unexpected_error", error=repr(exc))
                    delay = self._x509_failed(
                        WorkloadApiError(f"workload API at {self.address}: {exc!r}"), backoff
                    )
                if await self._retry_wait(delay):
                    backoff.reset()
                    self._fast_retries = FAST_RETRIES
        finally:
            self._stop_socket_watch()

    async def _follow_x509(self, client: WorkloadApiClient, backoff: Backoff) -> None:
        """One X.509-SVID stream until it fails (raises) or stays silent too long (returns).

        The first message must come within ``first_message_timeout``; after each
        message the stream may stay silent for 3/4 of the remaining lifetime of
        the earliest-expiring SVID held (at least 1 s, at most ``silence_max``),
        so a server that keeps the connection open but stopped sending is
        abandoned while a quarter of that lifetime is left to fetch a new SVID. A
        healthy upstream rotates at half-life (SPIRE, our provider), well inside
        the bound, so a fresh SVID never causes a reconnect.
        """
        connected = False
        async with contextlib.aclosing(client._x509_responses()) as responses:
            while True:
                limit = self._silence_limit() if connected else self.first_message_timeout
                try:
                    async with asyncio.timeout(limit):
                        resp = await anext(responses)
                except StopAsyncIteration:
                    raise WorkloadApiUnavailable(
                        f"workload API at {self.address} ended the X.509-SVID stream"
                    ) from None
                except TimeoutError:
                    client.close()  # a hung server: the next attempt opens a new connection
                    if not connected:
                        raise WorkloadApiUnavailable(
                            f"workload API at {self.address} sent no X.509-SVID message "
                            f"within {limit:g}s of connecting"
                        ) from None
                    event(
                        logger,
                        logging.WARNING,
                        "workload_api.silent",
                        address=self.address,
                        silent_for=f"{limit:.3f}",
                        action="reconnecting (a stalled stream or a replaced server)",
                    )
                    return
                if not connected:
                    connected = True
                    was_connected, self._connected = self._connected, True
                    self._on_stream_up()
                    notified = self._notified
                    if self._apply_x509(resp):
                        backoff.reset()
                    if not was_connected and self._notified == notified:
                        self._notify()  # listeners learn of the connection once
                elif self._apply_x509(resp):
                    backoff.reset()

    def _on_stream_up(self) -> None:
        self._last_error = None
        self._fast_retries = 0
        self._stop_socket_watch()
        self._connected_inode = _inode(self.address.path) if self._watch_socket else None
        self._reconnected.set()
        self._reconnected.clear()
        self._events.on_connected()
        event(logger, logging.INFO, "workload_api.connected", address=self.address)

    def _silence_limit(self) -> float:
        """How long the X.509 stream may stay silent: 3/4 of the earliest SVID's remaining life."""
        expires_at = self._expires_at
        if expires_at is None:
            return self.silence_max
        remaining = (expires_at - utcnow()).total_seconds()
        return min(max(remaining * SILENCE_FRACTION, SILENCE_MIN), self.silence_max)

    async def _retry_wait(self, delay: float) -> bool:
        """Sleep ``delay`` before reconnecting; on a Unix socket, wake early (True) when the
        socket file is created or replaced. The directory is watched only while disconnected."""
        if not self._watch_socket:
            await asyncio.sleep(delay)
            return False
        if self._socket_watch is None:
            self._socket_watch = SocketWatch(self.address.path, self._connected_inode)
        appeared = await self._socket_watch.wait(delay)
        if appeared:
            event(logger, logging.INFO, "workload_api.socket_appeared", address=self.address)
        return appeared

    def _stop_socket_watch(self) -> None:
        if self._socket_watch is not None:
            self._socket_watch.close()
            self._socket_watch = None

    def _x509_failed(self, exc: WorkloadApiError, backoff: Backoff) -> float:
        """Record a failed X.509 stream attempt; return the delay before the next one."""
        self._last_error = exc
        if self._connected:
            self._connected = False
            self._notify()
        self._events.on_disconnected(exc)
        if isinstance(exc, WorkloadApiMisconfigured):
            self._events.on_misconfigured(exc)
            backoff.attempt += 1
            event(
                logger,
                logging.ERROR,
                "workload_api.misconfigured",
                address=self.address,
                error=exc,
                problem="configuration: the server rejected the request as invalid "
                "(e.g. the workload.spiffe.io security header) or is not a Workload API "
                "(check the address)",
                attempt=backoff.attempt,
                retry_in=f"{self._backoff_max:.3f}",
            )
            return self._backoff_max
        delay = backoff.next_delay()
        if isinstance(exc, WorkloadApiDenied):
            withdrawn = self._withdraw_svids()
            event(
                logger,
                logging.ERROR,
                "workload_api.denied",
                address=self.address,
                error=exc,
                withdrawn=",".join(withdrawn) or "none",
                attempt=backoff.attempt,
                retry_in=f"{delay:.3f}",
            )
        else:
            event(
                logger,
                logging.WARNING,
                "workload_api.disconnected",
                address=self.address,
                error=exc,
                attempt=backoff.attempt,
                retry_in=f"{delay:.3f}",
            )
        return delay

    async def _jwt_loop(self, client: WorkloadApiClient) -> None:
        backoff = Backoff(self._backoff_initial, self._backoff_max)
        while True:
            try:
                async with contextlib.aclosing(client._jwt_bundle_responses()) as responses:
                    async for resp in responses:
                        self._apply_jwt(resp)
                        backoff.reset()
                raise WorkloadApiUnavailable(
                    f"workload API at {self.address} ended the JWT bundle stream"
                )
            except Exception as exc:  # noqa: BLE001 - policy: log, then retry like an outage
                if not isinstance(exc, WorkloadApiError):
                    exc = WorkloadApiError(f"workload API at {self.address}: {exc!r}")
                if isinstance(exc, WorkloadApiMisconfigured):
                    backoff.attempt += 1
                    delay = self._backoff_max
                else:
                    delay = backoff.next_delay()
                # The X.509 loop reports the connection; repeat failures here stay quiet.
                level = logging.WARNING if backoff.attempt == 1 else logging.DEBUG
                event(
                    logger,
                    level,
                    "workload_api.jwt_bundles_failed",
                    address=self.address,
                    error=exc,
                    attempt=backoff.attempt,
                    retry_in=f"{delay:.3f}",
                )
            # Wake early when the X.509 stream is back (e.g. the socket reappeared).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._reconnected.wait()

    # -- state changes -----------------------------------------------------

    def _apply_x509(self, resp: Any) -> bool:
        """Take one X509SVIDResponse with per-SVID isolation; False if rejected whole."""
        now = utcnow()
        try:
            bundles, own = _response_bundles(resp)
        except InvalidBundle as exc:
            event(
                logger,
                logging.ERROR,
                "x509.update_rejected",
                reason=exc,
                action="kept the last good state",
            )
            return False
        previous: dict[tuple[str, str], X509Svid] = {}
        for svid in self._ctx.svids if self._ctx else ():
            previous.setdefault((str(svid.spiffe_id), svid.hint), svid)  # first wins (s.5.2.1)
        svids: list[X509Svid] = []
        for msg, own_bundle in zip(resp.svids, own, strict=True):
            try:
                svids.append(_convert_svid(msg, own_bundle, now))
            except InvalidSvid as exc:
                self._events.on_svid_rejected(exc)
                kept = self._last_good(previous.get((msg.spiffe_id, msg.hint)), bundles)
                if kept is not None:
                    svids.append(kept)
                    action = (
                        f"kept the last good SVID (serial {kept.serial:x}, "
                        f"expires {utc_text(_expiry(kept))})"
                    )
                else:
                    action = "dropped: no unexpired last good SVID"
                event(
                    logger,
                    logging.ERROR,
                    "svid.rejected",
                    spiffe_id=msg.spiffe_id,
                    hint=msg.hint,
                    reason=exc,
                    action=action,
                )
        self._set_x509(X509Context(tuple(svids), bundles))
        return True

    @staticmethod
    def _last_good(last: X509Svid | None, bundles: BundleSet) -> X509Svid | None:
        """``last`` if it is still unexpired and chains to the new message's bundle, else None."""
        if last is None:
            return None
        try:
            last.verify(bundles.get(last.spiffe_id.trust_domain))
        except InvalidSvid:
            return None
        return last

    def _set_x509(self, ctx: X509Context) -> None:
        old = self._ctx
        self._ready.set()
        if old is not None and _same_x509(old, ctx):
            return
        self._ctx = ctx
        self._reschedule_expiry()
        self._events.on_x509_update(ctx)
        event(
            logger,
            logging.INFO,
            "x509.updated",
            svids=",".join(str(s.spiffe_id) for s in ctx.svids) or "none",
            bundles=",".join(td.name for td in ctx.bundles) or "none",
        )
        self._notify()

    def _withdraw_svids(self) -> list[str]:
        """Drop every SVID (the caller is no longer entitled); keep the bundles."""
        ctx = self._ctx
        if ctx is None or not ctx.svids:
            return []
        self._set_x509(X509Context((), ctx.bundles))
        return [str(s.spiffe_id) for s in ctx.svids]

    def _apply_jwt(self, resp: Any) -> None:
        try:
            bundles = _jwt_bundle_map(resp.bundles)
        except InvalidBundle as exc:
            event(
                logger,
                logging.ERROR,
                "jwt_bundles.rejected",
                reason=exc,
                action="kept the last good JWT bundles",
            )
            return
        if _same_jwt(self._jwt, bundles):
            return
        self._jwt = bundles
        view = MappingProxyType(bundles)
        self._events.on_jwt_bundles_update(view)
        event(
            logger,
            logging.INFO,
            "jwt_bundles.updated",
            bundles=",".join(td.name for td in sorted(bundles)) or "none",
        )
        self._notify()

    def _notify(self) -> None:
        self._notified += 1
        for callback in list(self._listeners):
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - one broken listener must not stop the rest
                event(logger, logging.ERROR, "watcher.listener_failed", error=repr(exc))

    # -- expiry --------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _reschedule_expiry(self, minimum: float = 0.0) -> None:
        """Arm one timer (no polling) at the earliest expiry among the held SVIDs."""
        self._cancel_timer()
        ctx = self._ctx
        self._expires_at = min((_expiry(s) for s in ctx.svids), default=None) if ctx else None
        if self._expires_at is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(minimum, (self._expires_at - utcnow()).total_seconds())
        self._timer = loop.call_at(loop.time() + delay, self._on_expiry)

    def _on_expiry(self) -> None:
        self._timer = None
        ctx = self._ctx
        if ctx is None:
            return
        now = utcnow()
        expired = [s for s in ctx.svids if _expiry(s) <= now]
        if not expired:  # woke a little early (monotonic vs wall clock): try again shortly
            self._reschedule_expiry(minimum=0.01)
            return
        for svid in expired:
            self._events.on_svid_expired(svid)
            event(
                logger,
                logging.ERROR,
                "svid.expired",
                spiffe_id=svid.spiffe_id,
                hint=svid.hint,
                not_after=utc_text(_expiry(svid)),
                action="dropped: the workload API sent no replacement in time",
            )
        self._set_x509(X509Context(tuple(s for s in ctx.svids if _expiry(s) > now), ctx.bundles))
