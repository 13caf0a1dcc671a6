"""Asyncio client for the SPIFFE Workload API: the bridge's upstream side.

This is the only module, besides the embedded provider, that reads
``workload_pb2`` messages; everything it returns is a protobuf-free domain
type from :mod:`sds._x509` and :mod:`sds._jwt`.

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
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import random
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from ._jwt import JwtBundle
from ._log import event
from ._proto import workload_pb2
from ._proto.workload_grpc import SpiffeWorkloadAPIStub
from ._spiffe import SpiffeId, TrustDomain
from ._x509 import BundleSet, X509Bundle, X509Context, X509Svid, utcnow
from .errors import (
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


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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
        claims = json.loads(_b64url(parts[1]))
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

    def __init__(self, address: Address | str) -> None:
        self.address = _coerce_address(address)
        self._channel: Channel | None = None
        self._stub: SpiffeWorkloadAPIStub | None = None

    def _api(self) -> SpiffeWorkloadAPIStub:
        if self._stub is None:
            if self.address.scheme == "unix":
                self._channel = Channel(path=self.address.path)
            else:
                self._channel = Channel(host=self.address.host, port=self.address.port)
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
    def _errors(self) -> Iterator[None]:
        where = f"workload API at {self.address}"
        try:
            yield
        except GRPCError as exc:
            message = exc.message or exc.status.name
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

    async def _stream(self, method: Any, request: Any) -> AsyncGenerator[Any, None]:
        """Raw messages of one server stream, until the server ends it."""
        with self._errors():
            async with method.open(metadata=_METADATA) as stream:
                await stream.send_message(request, end=True)
                async for message in stream:
                    yield message

    async def _first(self, method: Any, request: Any, what: str) -> Any:
        """The first message of a server stream; the stream is then cancelled."""
        with self._errors():
            async with method.open(metadata=_METADATA) as stream:
                await stream.send_message(request, end=True)
                message = await stream.recv_message()
                if message is not None:
                    await stream.cancel()
        if message is None:
            raise WorkloadApiUnavailable(
                f"workload API at {self.address} ended the {what} stream without a response"
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
        with self._errors():
            resp = await self._api().FetchJWTSVID(request, metadata=_METADATA)
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
        with self._errors():
            resp = await self._api().ValidateJWTSVID(request, metadata=_METADATA)
        try:
            sid = SpiffeId.parse(resp.spiffe_id)
        except InvalidSpiffeId as exc:
            raise InvalidJwt(f"validated token has a bad spiffe_id: {exc}") from exc
        from google.protobuf import json_format  # type: ignore[import-untyped]  # noqa: PLC0415

        claims: dict[str, Any] = _plain(json_format.MessageToDict(resp.claims))
        return sid, claims


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


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Watcher:
    """Keeps the latest valid Workload API state, forever; an ``sds._x509.X509Source``.

    :meth:`run` follows the X.509-SVID stream and the JWT bundle stream over
    one connection, reconnecting with exponential backoff and full jitter
    (reset after each good message) until cancelled. Each message is the
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
        backoff_max: float = 30.0,
    ) -> None:
        self.address = _coerce_address(address)
        self._events: WatcherEvents = events if events is not None else NullEvents()
        Backoff(backoff_initial, backoff_max)  # validate the arguments early
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._ctx: X509Context | None = None
        self._jwt: dict[TrustDomain, JwtBundle] = {}
        self._listeners: list[Callable[[], None]] = []
        self._ready = asyncio.Event()
        self._last_error: WorkloadApiError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expires_at: dt.datetime | None = None

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
        while True:
            connected = False
            try:
                async with contextlib.aclosing(client._x509_responses()) as responses:
                    async for resp in responses:
                        if not connected:
                            connected = True
                            self._last_error = None
                            self._events.on_connected()
                            event(
                                logger, logging.INFO, "workload_api.connected", address=self.address
                            )
                        if self._apply_x509(resp):
                            backoff.reset()
                raise WorkloadApiUnavailable(
                    f"workload API at {self.address} ended the X.509-SVID stream"
                )
            except WorkloadApiError as exc:
                delay = self._x509_failed(exc, backoff)
            await asyncio.sleep(delay)

    def _x509_failed(self, exc: WorkloadApiError, backoff: Backoff) -> float:
        """Record a failed X.509 stream attempt; return the delay before the next one."""
        self._last_error = exc
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
                "(e.g. the workload.spiffe.io security header or the address)",
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
            except WorkloadApiError as exc:
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
            await asyncio.sleep(delay)

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
                        f"expires {_iso(_expiry(kept))})"
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
                not_after=_iso(_expiry(svid)),
                action="dropped: the workload API sent no replacement in time",
            )
        self._set_x509(X509Context(tuple(s for s in ctx.svids if _expiry(s) > now), ctx.bundles))
