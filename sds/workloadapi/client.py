"""Asyncio client for the SPIFFE Workload API: the bridge's upstream side.

This is the only module, besides the embedded provider, that reads
``workload_pb2`` messages; everything it returns is a protobuf-free domain
type from :mod:`sds.spiffe.x509` and :mod:`sds.spiffe.jwt`, and every gRPC or
socket failure is mapped to :mod:`sds.errors` in one place
(:meth:`ApiClient._errors`, shared with the Delegated Identity API client).

Standards followed:

* SPIFFE Workload Endpoint, sections 3-4: addresses and the security header,
  :mod:`sds.workloadapi.address`; section 6: a server that does not see the
  header answers ``INVALID_ARGUMENT``.
* SPIFFE Workload API, sections 4.2-4.4: keep the stream open and reconnect
  when it drops; every ``FetchX509SVID`` / ``FetchJWTBundles`` message is the
  complete, current state, so SVIDs or bundles missing from it are withdrawn.
  Section 5.2.1: ``PERMISSION_DENIED`` means the caller must stop using its
  SVIDs. Section 5.3: the first SVID is the default.
* X509-SVID, sections 4-5, via :meth:`X509Svid.parse` and :meth:`X509Svid.verify`;
  each SVID is verified against the bundle sent with it (its mandatory
  ``bundle`` field, Workload API s.5.1).

:class:`WorkloadApiClient` makes single calls and streams of converted
messages; :class:`sds.workloadapi.watcher.Watcher` is the long-running,
self-healing consumer that ``sds run`` serves from.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Generic, Self, TypeVar

from google.protobuf.message import Message
from grpclib.client import Channel, ServiceMethod, Stream
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from sds._proto import workload_pb2
from sds._proto.workload_grpc import SpiffeWorkloadAPIStub
from sds.errors import (
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
from sds.spiffe.x509 import BundleSet, X509Bundle, X509Context, X509Svid, utcnow
from sds.workloadapi.address import SECURITY_HEADER, SECURITY_VALUE, Address, as_address

__all__ = [
    "CALL_TIMEOUT",
    "KEEPALIVE_INTERVAL",
    "MAX_MESSAGE_BYTES",
    "ApiClient",
    "JwtSvid",
    "RejectedSvid",
    "WorkloadApiClient",
    "X509Update",
    "jwt_bundle_map",
    "jwt_svid",
    "trust_domain_key",
    "x509_bundle_map",
]

_METADATA = {SECURITY_HEADER: SECURITY_VALUE}

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


# gRPC status -> (error, message); {where} names the address (Workload Endpoint s.6:
# UNAVAILABLE and PERMISSION_DENIED are retried by the Watcher, INVALID_ARGUMENT slowly).
_STATUS_ERRORS: dict[Status, tuple[type[WorkloadApiError], str]] = {
    Status.UNAVAILABLE: (WorkloadApiUnavailable, "{where} is unavailable: {message}"),
    Status.PERMISSION_DENIED: (WorkloadApiDenied, "permission denied: {message}"),
    Status.INVALID_ARGUMENT: (
        WorkloadApiMisconfigured,
        "{where} rejected the request as invalid: {message}",
    ),
}
_OTHER_STATUS: tuple[type[WorkloadApiError], str] = (
    WorkloadApiError,
    "{where} failed: {status}: {message}",
)
# Socket errors with a fixed reason (subclasses first); other OSErrors give their strerror.
_SOCKET_REASONS: tuple[tuple[type[OSError], str], ...] = (
    (FileNotFoundError, "socket not found"),
    (ConnectionRefusedError, "connection refused"),
    (PermissionError, "no permission to connect to the socket"),
)


class MessageTooLarge(Exception):
    """A peer declared a message longer than the receive limit (internal; mapped in _errors)."""


_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)
_Stub = TypeVar("_Stub")


def _method_name(method: ServiceMethod[Any, Any]) -> str:
    """``FetchJWTSVID`` for grpclib's method object named ``/SpiffeWorkloadAPI/FetchJWTSVID``."""
    return method.name.rpartition("/")[2]


async def _recv_capped(stream: Stream[Any, _Resp], limit: int) -> _Resp | None:
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
        message: _Resp = stream._codec.decode(data, stream._recv_type)
        return message


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


def trust_domain_key(key: str, what: str) -> TrustDomain:
    """The trust domain a bundle map key names (``spiffe://td``); raise InvalidBundle naming it."""
    try:
        return TrustDomain.parse(key)
    except InvalidSpiffeId as exc:
        raise InvalidBundle(f"{what} key {key!r} is not a trust domain: {exc}") from exc


def x509_bundle_map(entries: Mapping[str, bytes], what: str) -> list[X509Bundle]:
    """Parse a ``"spiffe://td" -> DER`` map; raise InvalidBundle naming the bad entry."""
    return [
        X509Bundle.from_der(trust_domain_key(key, what), bytes(der))
        for key, der in sorted(entries.items())
    ]


def _response_bundles(
    resp: workload_pb2.X509SVIDResponse,
) -> tuple[BundleSet, list[X509Bundle | None]]:
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
    for bundle in x509_bundle_map(resp.federated_bundles, "federated bundle"):
        merged.setdefault(bundle.trust_domain, bundle)
    return BundleSet(merged.values()), own


def _convert_svid(msg: workload_pb2.X509SVID, own: X509Bundle | None, now: dt.datetime) -> X509Svid:
    """Parse and verify one wire SVID against the bundle sent with it; raise InvalidSvid."""
    try:
        svid = X509Svid.parse(
            msg.spiffe_id, bytes(msg.x509_svid), bytes(msg.x509_svid_key), msg.hint
        )
        svid.verify(own, now)
    except (ValueError, TypeError) as exc:  # e.g. cryptography on a malformed extension
        raise InvalidSvid(f"SVID {msg.spiffe_id}: {exc}") from exc
    return svid


def _x509_context(resp: workload_pb2.X509SVIDResponse) -> X509Context:
    """Convert one X509SVIDResponse strictly: any bad bundle or SVID raises."""
    now = utcnow()
    bundles, own = _response_bundles(resp)
    svids = tuple(_convert_svid(msg, b, now) for msg, b in zip(resp.svids, own, strict=True))
    return X509Context(svids, bundles)


@dataclass(frozen=True, slots=True)
class RejectedSvid:
    """An SVID of an X.509-SVID message that failed parsing or verification, and why."""

    spiffe_id: str
    hint: str
    error: InvalidSvid


@dataclass(frozen=True, slots=True)
class X509Update:
    """One X.509-SVID message: its bundles, and each SVID in order, valid or rejected."""

    bundles: BundleSet
    svids: tuple[X509Svid | RejectedSvid, ...]


def _x509_update(resp: workload_pb2.X509SVIDResponse) -> X509Update | InvalidBundle:
    """Convert one X509SVIDResponse with per-SVID isolation (the Watcher's view of it)."""
    now = utcnow()
    try:
        bundles, own = _response_bundles(resp)
    except InvalidBundle as exc:
        return exc
    svids: list[X509Svid | RejectedSvid] = []
    for msg, own_bundle in zip(resp.svids, own, strict=True):
        try:
            svids.append(_convert_svid(msg, own_bundle, now))
        except InvalidSvid as exc:
            svids.append(RejectedSvid(msg.spiffe_id, msg.hint, exc))
    return X509Update(bundles, tuple(svids))


def jwt_bundle_map(entries: Mapping[str, bytes]) -> dict[TrustDomain, JwtBundle]:
    """Parse a ``"spiffe://td" -> JWKS`` map; raise InvalidBundle naming the bad entry."""
    bundles: dict[TrustDomain, JwtBundle] = {}
    for key, jwks in sorted(entries.items()):
        td = trust_domain_key(key, "JWT bundle")
        bundles[td] = JwtBundle.from_jwks(td, bytes(jwks))
    return bundles


def jwt_svid(spiffe_id: str, token: str, hint: str) -> JwtSvid:
    """One JWT-SVID as a Workload API sends it, ``sub`` and ``exp`` read from the (unverified)
    payload; raise InvalidJwt when the ID is bad or the token is not a JWT for it."""
    try:
        sid = SpiffeId.parse(spiffe_id)
    except InvalidSpiffeId as exc:
        raise InvalidJwt(f"JWT-SVID has a bad spiffe_id: {exc}") from exc
    parts = token.split(".")
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
    return JwtSvid(sid, token, hint, expiry)


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


class ApiClient(Generic[_Stub]):
    """One gRPC connection to a local SPIFFE API, with the one error map for its calls.

    The base of :class:`WorkloadApiClient` and of
    :class:`sds.workloadapi.delegated.DelegatedIdentityClient`: a subclass names
    its API (:attr:`label`, :attr:`protocol`), the metadata each call carries
    and its stub. The channel (grpclib; ``path=`` for Unix sockets, host/port
    for TCP) is opened lazily on the first call and reconnects on the next call
    after the connection drops. Failures raise: WorkloadApiUnavailable (socket
    missing, refused, connection lost, ``UNAVAILABLE``), WorkloadApiDenied
    (``PERMISSION_DENIED``), WorkloadApiMisconfigured (``INVALID_ARGUMENT``, not
    gRPC, method not implemented), WorkloadApiError (any other status).
    """

    #: How error messages name the peer: ``<label> at <address>``.
    label: ClassVar[str] = "workload API"
    #: What a peer that is not this API is not: ``not a <protocol>``.
    protocol: ClassVar[str] = "SPIFFE Workload API"
    #: Metadata sent with every call.
    metadata: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        address: Address | str,
        *,
        call_timeout: float = CALL_TIMEOUT,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        keepalive: float | None = KEEPALIVE_INTERVAL,
    ) -> None:
        self.address = as_address(address)
        self.call_timeout = call_timeout
        self.max_message_bytes = max_message_bytes
        self._keepalive = keepalive
        self._channel: Channel | None = None
        self._stub: _Stub | None = None

    def _new_stub(self, channel: Channel) -> _Stub:
        """The generated stub of this API on ``channel``."""
        raise NotImplementedError

    def _api(self) -> _Stub:
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
            self._stub = self._new_stub(self._channel)
        return self._stub

    def close(self) -> None:
        """Close the connection; a later call opens a new one."""
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None

    async def __aenter__(self) -> Self:
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
        """The one map from grpclib and socket failures to :mod:`sds.errors` (``raise ... from``).

        gRPC statuses by :data:`_STATUS_ERRORS`, socket errors by :data:`_SOCKET_REASONS`;
        a peer that is not this API (not gRPC, or without ``method``) is misconfigured.
        """
        where = f"{self.label} at {self.address}"
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
                    f"{self.address}: not a {self.protocol} (the peer does not speak gRPC)"
                ) from exc
            if exc.status is Status.UNIMPLEMENTED and method:
                raise WorkloadApiMisconfigured(
                    f"{self.address}: not a {self.protocol} (the peer does not implement {method})"
                ) from exc
            error, template = _STATUS_ERRORS.get(exc.status, _OTHER_STATUS)
            raise error(
                template.format(where=where, status=exc.status.name, message=message)
            ) from exc
        except StreamTerminatedError as exc:
            reason = (str(exc) or "stream terminated").lower()
            raise WorkloadApiUnavailable(f"{where} is unavailable: {reason}") from exc
        except OSError as exc:
            reason = next(
                (text for kind, text in _SOCKET_REASONS if isinstance(exc, kind)),
                (exc.strerror or str(exc) or type(exc).__name__).lower(),
            )
            raise WorkloadApiUnavailable(f"{where} is unavailable: {reason}") from exc
        except ProtocolError as exc:
            raise WorkloadApiError(f"{where}: gRPC protocol error: {exc}") from exc
        except MessageTooLarge as exc:
            raise WorkloadApiError(f"{where} sent {exc}") from exc

    async def _stream(
        self, method: ServiceMethod[_Req, _Resp], request: _Req
    ) -> AsyncGenerator[_Resp, None]:
        """Raw messages of one server stream, until the server ends it."""
        with self._errors(_method_name(method)):
            async with method.open(metadata=dict(self.metadata)) as stream:
                await stream.send_message(request, end=True)
                while (message := await _recv_capped(stream, self.max_message_bytes)) is not None:
                    yield message

    @contextlib.asynccontextmanager
    async def _call(
        self, method: ServiceMethod[_Req, _Resp], request: _Req
    ) -> AsyncIterator[Stream[_Req, _Resp]]:
        """The stream of one call bounded by ``call_timeout``, its request sent; failures
        inside (the caller's reads included) become Workload API errors."""
        with self._errors(_method_name(method)):
            async with (
                asyncio.timeout(self.call_timeout),
                method.open(metadata=dict(self.metadata)) as stream,
            ):
                await stream.send_message(request, end=True)
                yield stream

    async def _first(self, method: ServiceMethod[_Req, _Resp], request: _Req, what: str) -> _Resp:
        """The first message of a server stream within ``call_timeout``; then cancelled."""
        async with self._call(method, request) as stream:
            message = await _recv_capped(stream, self.max_message_bytes)
            if message is not None:
                await stream.cancel()
        if message is None:
            raise WorkloadApiUnavailable(
                f"{self.label} at {self.address} ended the {what} stream without a response"
            )
        return message

    async def _unary(self, method: ServiceMethod[_Req, _Resp], request: _Req) -> _Resp:
        """One unary call, answered within ``call_timeout`` and at most ``max_message_bytes``."""
        async with self._call(method, request) as stream:
            message = await _recv_capped(stream, self.max_message_bytes)
            await stream.recv_trailing_metadata()
        if message is None:
            raise WorkloadApiUnavailable(
                f"{self.label} at {self.address} answered {_method_name(method)} with no message"
            )
        return message


class WorkloadApiClient(ApiClient[SpiffeWorkloadAPIStub]):
    """One connection to a Workload API; single calls and raw streams, errors translated.

    Every call carries the security header (Workload Endpoint s.3). Failures
    raise as :class:`ApiClient` says; messages that fail conversion raise
    InvalidSvid, InvalidBundle or InvalidJwt.
    """

    metadata: ClassVar[Mapping[str, str]] = _METADATA

    def _new_stub(self, channel: Channel) -> SpiffeWorkloadAPIStub:
        return SpiffeWorkloadAPIStub(channel)

    def _x509_responses(self) -> AsyncGenerator[workload_pb2.X509SVIDResponse, None]:
        return self._stream(self._api().FetchX509SVID, workload_pb2.X509SVIDRequest())

    def _jwt_bundle_responses(self) -> AsyncGenerator[workload_pb2.JWTBundlesResponse, None]:
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

    async def x509_updates(self) -> AsyncGenerator[X509Update | InvalidBundle, None]:
        """Every FetchX509SVID message, converted SVID by SVID, until the server ends it.

        A message whose bundles do not parse is yielded as its InvalidBundle (it
        cannot be used as a whole); otherwise each SVID is verified against its
        own bundle and yielded as an X509Svid or, when it fails, a RejectedSvid:
        the caller decides what to keep (Workload API s.5).
        """
        async with contextlib.aclosing(self._x509_responses()) as responses:
            async for resp in responses:
                yield _x509_update(resp)

    async def fetch_x509_bundles(self) -> BundleSet:
        """Every X.509 bundle the caller trusts: the first FetchX509Bundles message."""
        resp = await self._first(
            self._api().FetchX509Bundles, workload_pb2.X509BundlesRequest(), "X.509 bundle"
        )
        return BundleSet(x509_bundle_map(resp.bundles, "X.509 bundle"))

    async def x509_bundles(self) -> AsyncGenerator[BundleSet, None]:
        """Every FetchX509Bundles message, each the complete set of bundles."""
        stream = self._stream(self._api().FetchX509Bundles, workload_pb2.X509BundlesRequest())
        async with contextlib.aclosing(stream) as responses:
            async for resp in responses:
                yield BundleSet(x509_bundle_map(resp.bundles, "X.509 bundle"))

    # -- JWT --------------------------------------------------------------------

    async def fetch_jwt_svids(
        self, audience: Sequence[str], spiffe_id: str | None = None
    ) -> list[JwtSvid]:
        """JWT-SVIDs for ``audience`` (all of the caller's identities, or only ``spiffe_id``)."""
        request = workload_pb2.JWTSVIDRequest(audience=list(audience), spiffe_id=spiffe_id or "")
        resp = await self._unary(self._api().FetchJWTSVID, request)
        return [jwt_svid(msg.spiffe_id, msg.svid, msg.hint) for msg in resp.svids]

    async def fetch_jwt_bundles(self) -> dict[TrustDomain, JwtBundle]:
        """Every JWT bundle the caller trusts: the first FetchJWTBundles message."""
        resp = await self._first(
            self._api().FetchJWTBundles, workload_pb2.JWTBundlesRequest(), "JWT bundle"
        )
        return jwt_bundle_map(resp.bundles)

    async def jwt_bundles(self) -> AsyncGenerator[dict[TrustDomain, JwtBundle], None]:
        """Every FetchJWTBundles message, each the complete set of JWT bundles."""
        async with contextlib.aclosing(self._jwt_bundle_responses()) as responses:
            async for resp in responses:
                yield jwt_bundle_map(resp.bundles)

    async def jwt_bundle_updates(
        self,
    ) -> AsyncGenerator[dict[TrustDomain, JwtBundle] | InvalidBundle, None]:
        """Like :meth:`jwt_bundles`, but a message that does not parse is yielded as its
        InvalidBundle and the stream goes on (the caller keeps its last good bundles)."""
        async with contextlib.aclosing(self._jwt_bundle_responses()) as responses:
            async for resp in responses:
                try:
                    bundles = jwt_bundle_map(resp.bundles)
                except InvalidBundle as exc:
                    yield exc
                else:
                    yield bundles

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
        from google.protobuf import json_format  # noqa: PLC0415

        claims: dict[str, Any] = _plain(json_format.MessageToDict(resp.claims))
        return sid, claims
