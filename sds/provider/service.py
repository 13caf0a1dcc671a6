"""The SPIFFE Workload API service, backed by the local CA and attested by peer credentials.

Behaviour follows the SPIFFE Workload Endpoint standard (section 4.3: every
request carries the ``workload.spiffe.io: true`` metadata, else
INVALID_ARGUMENT) and the Workload API standard (section 5: X.509 and JWT
profiles; streams answer at once and again whenever their content changes).

Callers are identified only by what the kernel reports for the Unix socket
peer (SO_PEERCRED: pid, uid, gid), matched against ``workload_identity``
rules. A caller that matches none gets PERMISSION_DENIED on every method, as
SPIRE does; so does a caller that is not on a Unix socket.

X.509-SVIDs are minted per stream for that caller and re-issued at half
their lifetime. Streams hold no queues: each waits on the current
"state changed" event or its next rotation time and then sends the latest
state if it differs from what it sent last.

Hostile callers are bounded: entitlement is checked before a request is
read; a request over MAX_REQUEST_BYTES is refused (RESOURCE_EXHAUSTED) from
its 5-byte length prefix, and the HTTP/2 receive windows are 64 KiB, so an
unread request costs at most that; broken framing or protobuf is
INVALID_ARGUMENT; JWT audiences are capped in count and length. Connections
are served by :class:`sds._util.grpcedge.GuardedServer` (shared with the SDS
server): one that opens no stream within ``handshake_timeout`` (10 s; a client
stuck in the HTTP/2 preface) or holds none for ``idle_timeout`` (300 s) is
closed and logged as ``workload.connection_closed`` (rate-limited).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import socket
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from google.protobuf.message import Message
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from sds._proto import workload_pb2 as pb
from sds._proto.workload_grpc import SpiffeWorkloadAPIBase
from sds._util.grpcedge import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    GuardedServer,
    recv_request,
)
from sds._util.log import event
from sds._util.peercred import DEFAULT_BACKLOG, PeerCredentials, UnixListener, peer_credentials
from sds.errors import InvalidJwt, InvalidSpiffeId
from sds.provider.ca import LocalCA
from sds.provider.identities import FederatedBundle, Identity, entitled
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.jwt import JwtBundle, b64url_decode, validate_jwt_svid
from sds.spiffe.x509 import X509Svid, utc_text, utcnow
from sds.workloadapi.address import SECURITY_HEADER, SECURITY_VALUE

__all__ = [
    "DEFAULT_JWT_TTL",
    "DEFAULT_X509_TTL",
    "MAX_AUDIENCES",
    "MAX_AUDIENCE_BYTES",
    "MAX_REQUEST_BYTES",
    "REQUEST_TIMEOUT",
    "SECURITY_HEADER",
    "Endpoint",
    "WorkloadApiProvider",
    "WorkloadApiService",
]

logger = logging.getLogger("sds.provider")

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

DEFAULT_X509_TTL = dt.timedelta(hours=1)
DEFAULT_JWT_TTL = dt.timedelta(minutes=5)
_CLOSE_TIMEOUT = 5.0
# Never renew more often than this, even for an SVID capped by metadata.expires.
_MIN_RENEW = dt.timedelta(milliseconds=500)
_ONE_SECOND = dt.timedelta(seconds=1)

# Workload API requests are tiny (a few audiences, one token): 64 KiB is ample.
MAX_REQUEST_BYTES = 64 * 1024
MAX_AUDIENCES = 16
MAX_AUDIENCE_BYTES = 1024
# A caller that opens a call and never finishes sending its (tiny) request is cut off.
REQUEST_TIMEOUT = 10.0

MSG_NO_HEADER = "security header missing from request"
MSG_NO_AUDIENCE = "audience must be specified"
MSG_NO_SVID = "svid must be specified"
MSG_SHUTTING_DOWN = "Workload API provider is shutting down"
MSG_NO_REQUEST = "request message missing"
MSG_TOO_MANY_AUDIENCES = f"at most {MAX_AUDIENCES} audiences per request"
MSG_AUDIENCE_TOO_LONG = f"an audience is at most {MAX_AUDIENCE_BYTES} bytes"


def jwt_times(token: str) -> tuple[dt.datetime, dt.datetime]:
    """The ``iat`` and ``exp`` claims of a token this provider just signed."""
    payload = token.split(".")[1]
    claims = json.loads(b64url_decode(payload))
    return (
        dt.datetime.fromtimestamp(claims["iat"], dt.UTC),
        dt.datetime.fromtimestamp(claims["exp"], dt.UTC),
    )


async def wait_for_any(until: dt.datetime | None, *events: asyncio.Event) -> None:
    """Sleep until one of ``events`` is set or ``until`` passes (never, if None)."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    timeout = None if until is None else max(0.0, (until - utcnow()).total_seconds())
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class CallTracker:
    """The calls and connections one server has open, so shutdown can end them all.

    :meth:`enter` is each handler's first step: it records the call's task and
    its connection's transport and refuses the call (UNAVAILABLE) once
    :meth:`shutdown` has begun.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self.closing = False
        self._calls: set[asyncio.Task[Any]] = set()
        self._transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()

    def __len__(self) -> int:
        """How many calls are open."""
        return len(self._calls)

    def enter(self, stream: Stream[Any, Any]) -> None:
        """Track the current call and its connection; UNAVAILABLE when shutting down."""
        task = asyncio.current_task()
        if task is not None:
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        transport = getattr(stream.peer, "_transport", None)
        if transport is not None:
            self._transports.add(transport)
        self.check_open()

    def check_open(self) -> None:
        """UNAVAILABLE ("shutting down") once :meth:`shutdown` has begun."""
        if self.closing:
            raise GRPCError(Status.UNAVAILABLE, MSG_SHUTTING_DOWN)

    async def shutdown(self, grace: float = _CLOSE_TIMEOUT) -> None:
        """Refuse new calls, wake the open ones (they end UNAVAILABLE) and wait for them."""
        self.closing = True
        self._wake()
        calls = {task for task in self._calls if task is not asyncio.current_task()}
        if calls:
            await asyncio.wait(calls, timeout=grace)

    def close_connections(self) -> None:
        """Close the transport of every connection that made a call (idle ones included)."""
        for transport in list(self._transports):
            transport.close()


async def read_request(stream: Stream[_Req, Any]) -> _Req:
    """The call's one request message (at most MAX_REQUEST_BYTES, within REQUEST_TIMEOUT).

    Read only once the caller is admitted; a missing one is INVALID_ARGUMENT.
    """
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            request = await recv_request(stream, MAX_REQUEST_BYTES)
    except TimeoutError:
        raise GRPCError(
            Status.DEADLINE_EXCEEDED,
            f"request message not received within {REQUEST_TIMEOUT:g}s",
        ) from None
    if request is None:
        raise GRPCError(Status.INVALID_ARGUMENT, MSG_NO_REQUEST)
    return request


def check_audience(audience: Sequence[str]) -> None:
    """INVALID_ARGUMENT for more than MAX_AUDIENCES audiences or one over MAX_AUDIENCE_BYTES."""
    if len(audience) > MAX_AUDIENCES:
        raise GRPCError(Status.INVALID_ARGUMENT, MSG_TOO_MANY_AUDIENCES)
    if any(len(a.encode()) > MAX_AUDIENCE_BYTES for a in audience):
        raise GRPCError(Status.INVALID_ARGUMENT, MSG_AUDIENCE_TOO_LONG)


def requested_audience(audience: Sequence[str]) -> list[str]:
    """The non-empty audiences of a JWT-SVID request, capped; INVALID_ARGUMENT if none
    ("audience must be specified", SPIRE's message)."""
    check_audience(audience)
    wanted = [a for a in audience if a]
    if not wanted:
        raise GRPCError(Status.INVALID_ARGUMENT, MSG_NO_AUDIENCE)
    return wanted


@dataclass(frozen=True, slots=True)
class _State:
    """One immutable generation of configuration; replaced whole on reload."""

    identities: tuple[Identity, ...]
    federation: tuple[FederatedBundle, ...]


@dataclass(frozen=True, slots=True)
class MintedSvid:
    """An X.509-SVID issued on one stream, with what it was issued from and when to renew it."""

    key: tuple[Any, ...]
    svid: X509Svid
    renew_at: dt.datetime


class WorkloadApiService(SpiffeWorkloadAPIBase):
    """The five Workload API methods over one provider's CA and configuration."""

    def __init__(
        self,
        ca: LocalCA,
        identities: Sequence[Identity],
        federation: Sequence[FederatedBundle] = (),
        *,
        x509_ttl: dt.timedelta = DEFAULT_X509_TTL,
        jwt_ttl: dt.timedelta = DEFAULT_JWT_TTL,
    ) -> None:
        self._ca = ca
        self._x509_ttl = x509_ttl
        self._jwt_ttl = jwt_ttl
        self._state = _State(tuple(identities), tuple(federation))
        self._changed = asyncio.Event()
        self._calls = CallTracker(self.wake)

    @property
    def identities(self) -> tuple[Identity, ...]:
        """The identities being served, in order."""
        return self._state.identities

    @property
    def federation(self) -> tuple[FederatedBundle, ...]:
        """The federated bundles being served."""
        return self._state.federation

    def reload(self, identities: Sequence[Identity], federation: Sequence[FederatedBundle]) -> None:
        """Swap in new configuration; every open stream re-evaluates and pushes what changed."""
        self._state = _State(tuple(identities), tuple(federation))
        self.wake()

    @property
    def changed(self) -> asyncio.Event:
        """Set (and replaced) at the next configuration change; read it before reading state."""
        return self._changed

    def wake(self) -> None:
        """Wake every stream waiting on :attr:`changed` (they re-read the state)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def shutdown(self, grace: float = _CLOSE_TIMEOUT) -> None:
        """End every call with UNAVAILABLE (clients retry elsewhere) and wait for them to finish.

        Afterwards new calls get UNAVAILABLE too. Connections are left to the caller,
        see :meth:`close_connections`.
        """
        await self._calls.shutdown(grace)

    def close_connections(self) -> None:
        """Close the transport of every connection that made a call (idle ones included)."""
        self._calls.close_connections()

    def _check_open(self) -> None:
        self._calls.check_open()

    # -- admission ---------------------------------------------------------

    def _admit(self, stream: Stream[Any, Any], method: str) -> PeerCredentials:
        """Check the security header, then attest the caller from the kernel."""
        self._calls.enter(stream)
        creds = peer_credentials(stream)
        metadata = stream.metadata
        if metadata is None or metadata.get(SECURITY_HEADER) != SECURITY_VALUE:
            self._deny(creds, method, "security header missing")
            raise GRPCError(Status.INVALID_ARGUMENT, MSG_NO_HEADER)
        if creds is None:
            self._deny(None, method, "not a Unix socket peer")
            raise GRPCError(
                Status.PERMISSION_DENIED,
                "no identity issued: caller has no peer credentials (not a Unix socket)",
            )
        return creds

    def _deny(self, creds: PeerCredentials | None, method: str, reason: str) -> None:
        if creds is None:
            event(logger, logging.INFO, "workload.denied", method=method, reason=reason)
        else:
            event(
                logger,
                logging.INFO,
                "workload.denied",
                method=method,
                pid=creds.pid,
                uid=creds.uid,
                gid=creds.gid,
                reason=reason,
            )

    def choose(self, creds: PeerCredentials, now: dt.datetime) -> tuple[Identity, ...]:
        """The identities issued to ``creds`` now, later duplicates of a hint dropped.

        The Workload API standard makes a hint unique within one response; the
        first identity (in file order) with a given hint wins, as in SPIRE.
        """
        chosen: list[Identity] = []
        hints: set[str] = set()
        for identity in entitled(self._state.identities, creds, now):
            if identity.hint:
                if identity.hint in hints:
                    continue
                hints.add(identity.hint)
            chosen.append(identity)
        return tuple(chosen)

    def _selected(
        self, creds: PeerCredentials, method: str, now: dt.datetime
    ) -> tuple[Identity, ...]:
        """:meth:`choose`, or PERMISSION_DENIED when the caller gets nothing."""
        self._check_open()
        chosen = self.choose(creds, now)
        if not chosen:
            self._deny(creds, method, "matches no workload_identity rule")
            raise GRPCError(
                Status.PERMISSION_DENIED,
                f"no identity issued: caller pid={creds.pid} uid={creds.uid} gid={creds.gid} "
                "matches no workload_identity rule",
            )
        return chosen

    def next_expiry(self, now: dt.datetime) -> dt.datetime | None:
        """When the next configured identity expires (entitlements change then)."""
        times = [
            i.expires for i in self._state.identities if i.expires is not None and i.expires > now
        ]
        return min(times, default=None)

    # -- bundles -----------------------------------------------------------

    def federated_x509(self) -> dict[str, bytes]:
        """Federated X.509 bundles keyed by trust domain ID, DER (own trust domain excluded)."""
        return {
            fed.trust_domain.id: fed.x509.der()
            for fed in self._state.federation
            if fed.x509 is not None
        }

    def x509_bundle_map(self) -> dict[str, bytes]:
        """The own and federated X.509 bundles keyed by trust domain ID ("spiffe://td"), DER."""
        return {self._ca.trust_domain.id: self._ca.bundle.der(), **self.federated_x509()}

    def _jwt_bundles(self) -> dict[TrustDomain, JwtBundle]:
        bundles = {self._ca.trust_domain: self._ca.jwt_bundle}
        for fed in self._state.federation:
            if fed.jwt is not None:
                bundles[fed.trust_domain] = fed.jwt
        return bundles

    def jwt_bundle_map(self) -> dict[str, bytes]:
        """The own and federated JWT bundles keyed by trust domain ID, as JWKS documents."""
        return {td.id: bundle.to_jwks() for td, bundle in self._jwt_bundles().items()}

    # -- X.509 profile -----------------------------------------------------

    def _ttl(self, configured: dt.timedelta, identity: Identity, now: dt.datetime) -> dt.timedelta:
        if identity.expires is not None:
            return min(configured, identity.expires - now)
        return configured

    def _mint(
        self, identity: Identity, creds: PeerCredentials, now: dt.datetime, key: tuple[Any, ...]
    ) -> MintedSvid:
        ttl = self._ttl(identity.x509_ttl or self._x509_ttl, identity, now)
        svid = self._ca.issue_x509_svid(
            identity.spiffe_id,
            ttl,
            hint=identity.hint,
            dns_sans=identity.dns_sans,
            ip_sans=identity.ip_sans,
            now=now,
        )
        event(
            logger,
            logging.INFO,
            "svid.issued",
            kind="x509",
            identity=identity.name,
            spiffe_id=svid.spiffe_id,
            serial=f"{svid.serial:x}",
            expires=utc_text(svid.not_after),
            pid=creds.pid,
            uid=creds.uid,
            gid=creds.gid,
        )
        return MintedSvid(key, svid, now + max((svid.not_after - now) / 2, _MIN_RENEW))

    def renew(
        self,
        minted: Mapping[str, MintedSvid],
        identities: Iterable[Identity],
        creds: PeerCredentials,
        now: dt.datetime,
    ) -> dict[str, MintedSvid]:
        """One stream's X.509-SVIDs for ``identities`` now, by identity name.

        An SVID from ``minted`` is kept while its identity is unchanged and it
        is younger than half its lifetime; any other is minted afresh.
        """
        current: dict[str, MintedSvid] = {}
        for identity in identities:
            key = (
                identity.spiffe_id,
                identity.hint,
                identity.dns_sans,
                identity.ip_sans,
                identity.x509_ttl,
                identity.expires,
            )
            previous = minted.get(identity.name)
            if previous is not None and previous.key == key and now < previous.renew_at:
                current[identity.name] = previous
            else:
                current[identity.name] = self._mint(identity, creds, now, key)
        return current

    def wake_time(self, minted: Mapping[str, MintedSvid], now: dt.datetime) -> dt.datetime | None:
        """When a stream holding ``minted`` must look again: a renewal or an identity's expiry."""
        wake = [m.renew_at for m in minted.values()]
        expiry = self.next_expiry(now)
        if expiry is not None:
            wake.append(expiry)
        return min(wake, default=None)

    async def FetchX509SVID(self, stream: Stream[pb.X509SVIDRequest, pb.X509SVIDResponse]) -> None:
        """Stream the caller's X.509-SVIDs: at once, at each half-life, and on config change."""
        creds = self._admit(stream, "FetchX509SVID")
        self._selected(creds, "FetchX509SVID", utcnow())
        await read_request(stream)
        minted: dict[str, MintedSvid] = {}
        last: tuple[Any, ...] | None = None
        while True:
            changed = self._changed
            now = utcnow()
            minted = self.renew(minted, self._selected(creds, "FetchX509SVID", now), creds, now)
            federated = self.federated_x509()
            own = self._ca.bundle.der()
            fingerprint = (
                tuple((name, m.svid.serial) for name, m in minted.items()),
                tuple(sorted(federated.items())),
                own,
            )
            if fingerprint != last:
                await stream.send_message(
                    pb.X509SVIDResponse(
                        svids=[
                            pb.X509SVID(
                                spiffe_id=str(m.svid.spiffe_id),
                                x509_svid=m.svid.chain_der(),
                                x509_svid_key=m.svid.key_der(),
                                bundle=own,
                                hint=m.svid.hint,
                            )
                            for m in minted.values()
                        ],
                        federated_bundles=federated,
                    )
                )
                last = fingerprint
            await wait_for_any(self.wake_time(minted, now), changed)

    async def FetchX509Bundles(
        self, stream: Stream[pb.X509BundlesRequest, pb.X509BundlesResponse]
    ) -> None:
        """Stream the own and federated X.509 bundles (DER): at once and on change."""
        await self._stream_bundles(
            stream,
            "FetchX509Bundles",
            self.x509_bundle_map,
            lambda bundles: pb.X509BundlesResponse(bundles=bundles),
        )

    async def _stream_bundles(
        self,
        stream: Stream[_Req, _Resp],
        method: str,
        current: Callable[[], dict[str, bytes]],
        response: Callable[[dict[str, bytes]], _Resp],
    ) -> None:
        """Send ``response(current())`` at once, then again whenever the bundles change."""
        creds = self._admit(stream, method)
        self._selected(creds, method, utcnow())
        await read_request(stream)
        last: dict[str, bytes] | None = None
        while True:
            changed = self._changed
            now = utcnow()
            self._selected(creds, method, now)
            bundles = current()
            if bundles != last:
                await stream.send_message(response(bundles))
                last = bundles
            await wait_for_any(self.next_expiry(now), changed)

    # -- JWT profile -------------------------------------------------------

    def issue_jwt(
        self, identity: Identity, audience: Sequence[str], creds: PeerCredentials, now: dt.datetime
    ) -> str:
        """A JWT-SVID of ``identity`` for ``audience``, issued to ``creds`` (and logged)."""
        ttl = max(self._ttl(identity.jwt_ttl or self._jwt_ttl, identity, now), _ONE_SECOND)
        token = self._ca.issue_jwt_svid(identity.spiffe_id, audience, ttl)
        event(
            logger,
            logging.INFO,
            "svid.issued",
            kind="jwt",
            identity=identity.name,
            spiffe_id=identity.spiffe_id,
            audience=",".join(audience),
            expires=utc_text(jwt_times(token)[1]),
            pid=creds.pid,
            uid=creds.uid,
            gid=creds.gid,
        )
        return token

    async def FetchJWTSVID(self, stream: Stream[pb.JWTSVIDRequest, pb.JWTSVIDResponse]) -> None:
        """Issue ES256 JWT-SVIDs for the requested audience (one per identity, or the one asked)."""
        creds = self._admit(stream, "FetchJWTSVID")
        self._selected(creds, "FetchJWTSVID", utcnow())
        request = await read_request(stream)
        audience = requested_audience(request.audience)
        wanted: SpiffeId | None = None
        if request.spiffe_id:
            try:
                wanted = SpiffeId.parse(request.spiffe_id)
            except InvalidSpiffeId as exc:
                raise GRPCError(
                    Status.INVALID_ARGUMENT, f"spiffe_id is not a SPIFFE ID: {exc}"
                ) from exc
        now = utcnow()
        identities = self._selected(creds, "FetchJWTSVID", now)
        if wanted is not None:
            # The first identity with that ID, even one whose hint lost to an earlier one.
            matching = [
                i for i in entitled(self._state.identities, creds, now) if i.spiffe_id == wanted
            ]
            identities = tuple(matching[:1])
            if not identities:
                self._deny(creds, "FetchJWTSVID", f"not entitled to {wanted}")
                raise GRPCError(
                    Status.PERMISSION_DENIED,
                    f"no identity issued: caller pid={creds.pid} uid={creds.uid} "
                    f"gid={creds.gid} is not entitled to {wanted}",
                )
        svids = [
            pb.JWTSVID(
                spiffe_id=str(identity.spiffe_id),
                svid=self.issue_jwt(identity, audience, creds, now),
                hint=identity.hint,
            )
            for identity in identities
        ]
        await stream.send_message(pb.JWTSVIDResponse(svids=svids))

    async def FetchJWTBundles(
        self, stream: Stream[pb.JWTBundlesRequest, pb.JWTBundlesResponse]
    ) -> None:
        """Stream JWKS documents per trust domain (own and federated): at once and on change."""
        await self._stream_bundles(
            stream,
            "FetchJWTBundles",
            self.jwt_bundle_map,
            lambda bundles: pb.JWTBundlesResponse(bundles=bundles),
        )

    async def ValidateJWTSVID(
        self, stream: Stream[pb.ValidateJWTSVIDRequest, pb.ValidateJWTSVIDResponse]
    ) -> None:
        """Validate a JWT-SVID against the own and federated JWT bundles (JWT-SVID section 4)."""
        creds = self._admit(stream, "ValidateJWTSVID")
        self._selected(creds, "ValidateJWTSVID", utcnow())
        request = await read_request(stream)
        check_audience([request.audience])
        if not request.audience:
            raise GRPCError(Status.INVALID_ARGUMENT, MSG_NO_AUDIENCE)
        if not request.svid:
            raise GRPCError(Status.INVALID_ARGUMENT, MSG_NO_SVID)
        self._selected(creds, "ValidateJWTSVID", utcnow())
        try:
            result = validate_jwt_svid(request.svid, request.audience, self._jwt_bundles())
        except InvalidJwt as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from exc
        response = pb.ValidateJWTSVIDResponse(spiffe_id=str(result.spiffe_id))
        response.claims.update(dict(result.claims))
        await stream.send_message(response)


class _Served(Protocol):
    """What an endpoint serves: a servicer that can end its streams and drop its clients."""

    async def shutdown(self, grace: float = ...) -> None: ...

    def close_connections(self) -> None: ...


class Endpoint:
    """One servicer on one Unix socket: :meth:`start` on a bound, listening socket,
    :meth:`close` in order (streams end UNAVAILABLE, connections close, the socket file
    goes if it is still the one bound). Shared by the Workload API and the admin socket.

    ``handshake_timeout`` and ``idle_timeout`` bound connections that never open a
    stream or hold none (see :class:`sds._util.grpcedge.GuardedServer`).
    """

    #: The request type an unknown method's body is read as (bounded), per endpoint.
    unknown_type: type[Message]
    #: The event logged for each closed connection.
    connection_event: str
    #: What ``start`` twice says is already started.
    what: str

    def __init__(
        self,
        service: _Served,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self._served = service
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self._server: GuardedServer | None = None
        self._listener: UnixListener | None = None

    async def start(self, listener: UnixListener | socket.socket) -> None:
        """Serve on ``listener`` (listening, non-blocking); returns once accepting.

        A UnixListener's socket file is removed by :meth:`close` while it is
        still ours; a bare socket's file is left to the caller.
        """
        if self._server is not None:
            raise RuntimeError(f"{self.what} already started")
        if isinstance(listener, UnixListener):
            self._listener, sock = listener, listener.sock
        else:
            sock = listener
        self._server = GuardedServer(
            [self._served],
            unknown_type=self.unknown_type,
            handshake_timeout=self.handshake_timeout,
            idle_timeout=self.idle_timeout,
            log=logger,
            connection_event=self.connection_event,
        )
        await self._server.start(sock=sock, backlog=DEFAULT_BACKLOG)

    async def close(self) -> None:
        """Stop serving and remove the socket file if it is still ours.

        Open streams end with UNAVAILABLE ("shutting down") so clients retry,
        then every client connection is closed.
        """
        server, self._server = self._server, None
        if server is not None:
            await self._served.shutdown()
            server.close()
            self._served.close_connections()
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await server.wait_closed()
            except TimeoutError:
                event(logger, logging.WARNING, "provider.close_timeout", seconds=_CLOSE_TIMEOUT)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.remove()


class WorkloadApiProvider(Endpoint):
    """A Workload API server for one trust domain, embeddable in any asyncio program.

    ``start(listener)`` serves on an already bound, listening socket (normally
    a :class:`sds._util.peercred.UnixListener` from ``listen_unix``); ``close()``
    stops serving and removes the Unix socket file if it is still the one we
    bound; ``reload()`` swaps the configuration. ``handshake_timeout`` and
    ``idle_timeout`` bound connections that never open a stream or hold none
    (see :class:`sds._util.grpcedge.GuardedServer`).
    """

    unknown_type = pb.X509SVIDRequest
    connection_event = "workload.connection_closed"
    what = "provider"

    def __init__(
        self,
        ca: LocalCA,
        identities: Sequence[Identity],
        federation: Sequence[FederatedBundle] = (),
        x509_ttl: dt.timedelta = DEFAULT_X509_TTL,
        jwt_ttl: dt.timedelta = DEFAULT_JWT_TTL,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.ca = ca
        self.service = WorkloadApiService(
            ca, identities, federation, x509_ttl=x509_ttl, jwt_ttl=jwt_ttl
        )
        super().__init__(
            self.service, handshake_timeout=handshake_timeout, idle_timeout=idle_timeout
        )

    @property
    def trust_domain(self) -> TrustDomain:
        """The trust domain this provider issues for."""
        return self.ca.trust_domain

    @property
    def identities(self) -> tuple[Identity, ...]:
        """The identities being served, in order."""
        return self.service.identities

    @property
    def federation(self) -> tuple[FederatedBundle, ...]:
        """The federated bundles being served."""
        return self.service.federation

    def reload(self, identities: Sequence[Identity], federation: Sequence[FederatedBundle]) -> None:
        """Replace identities and federated bundles; open streams push what changed for them."""
        self.service.reload(identities, federation)
