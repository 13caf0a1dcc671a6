"""The Envoy Secret Discovery Service (``envoy.service.secret.v3.SecretDiscoveryService``).

StreamSecrets (state of the world), DeltaSecrets (incremental) and
FetchSecrets (unary) over grpclib, following the xDS protocol
("xDS REST and gRPC protocol", sections "ACK/NACK and resource type instance
version", "When to send an update", "Incremental xDS"):

- Every new stream is answered at once with the current secrets it names.
- Before the first response on a stream any ``response_nonce`` is accepted
  (Envoy reconnecting to a restarted bridge carries an old one); afterwards a
  request whose nonce is not the last one sent is stale: its subscription is
  ignored, but the ACK or NACK it carries is credited to the push it names.
- Each push is recorded under its nonce (version, names, serials) before it is
  sent, so an ACK or NACK updates exactly that push, whatever was sent since.
- A NACK (``error_detail`` set) is logged with Envoy's message (truncated) and
  node id, counted, and not answered by resending the same content.
- Pushes go only to streams subscribed to a changed name, and carry the
  latest state (coalesced), never a queue of intermediate ones.
- Names nobody can serve are logged (one line per request, rate-limited per
  stream) and left unanswered, so Envoy keeps waiting as for a secret that is
  not ready yet.

Hostile or broken clients are bounded by :class:`Limits` (message size, names
per request, name and node sizes) and by :class:`SdsServer` (handshake and
idle timeouts, listen backlog); malformed frames and protobuf end the stream
with INVALID_ARGUMENT, oversized messages with RESOURCE_EXHAUSTED (as gRPC
does), unknown methods with UNIMPLEMENTED, never with a traceback.

``sds inspect`` identifies itself with node id and cluster ``sds-inspect``;
such streams are served but are not Envoys: they are left out of
:attr:`SdsServicer.streams` (``/envoys``) and of per-node metrics.

gRPC status codes are chosen here and nowhere else. The caller's uid and gid
come from the kernel (SO_PEERCRED) and are checked on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpclib.const
from grpclib.exceptions import GRPCError, StreamTerminatedError

from sds._util.grpcedge import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    LISTEN_BACKLOG,
    GuardedServer,
    recv_request,
)
from sds._util.log import event
from sds._util.peercred import PeerCredentials, peer_credentials
from sds._util.ratelimit import RateLimiter
from sds.errors import NotEntitled, TooManyCallers
from sds.xds.cache import SecretCache, Watch
from sds.xds.codec import (
    SECRET_TYPE_URL,
    DeltaDiscoveryResponse,
    DeltaRequest,
    DiscoveryResponse,
    LiteDeltaRequest,
    LiteRequest,
    NodeInfo,
    SotwRequest,
    WireError,
    delta_request,
    delta_response,
    node_info,
    sotw_request,
    sotw_response,
)
from sds.xds.resources import TlsSpec

_Request = TypeVar("_Request", SotwRequest, DeltaRequest)
_Message = TypeVar("_Message", LiteRequest, LiteDeltaRequest)

if TYPE_CHECKING:
    from grpclib.server import Stream

    SotwStream = Stream[LiteRequest, DiscoveryResponse]
    DeltaStream = Stream[LiteDeltaRequest, DeltaDiscoveryResponse]

__all__ = [
    "INSPECTOR_NODE",
    "LISTEN_BACKLOG",
    "Lease",
    "Limits",
    "NullServerEvents",
    "SdsServer",
    "SdsServicer",
    "ServerEvents",
    "SharedCache",
    "StreamInfo",
    "Tenancy",
]

log = logging.getLogger("sds.server")

_SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"
Status = grpclib.const.Status

#: Node id and cluster that ``sds inspect`` sends; such streams are not listed as Envoys.
INSPECTOR_NODE = "sds-inspect"
#: Pushes remembered per stream while waiting for their ACK or NACK.
_PENDING_PUSHES = 16
#: Per-stream log reasons whose suppressed counts are reported when the stream closes.
_STREAM_REASONS = ("sds.unknown_name", "sds.nack", "sds.node_metadata_ignored")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one client may make the server hold or log (defaults in parentheses).

    - ``max_message_bytes`` (4 MiB): largest request message; the length prefix is checked
      before the body is read, so a declared 4 GB message costs nothing. Envoy 1.40's first
      request carries a ~61 kB Node; 4 MiB is gRPC's own default.
    - ``max_names`` (1,000): resource names in one request, and subscribed per delta stream.
    - ``max_name_bytes`` (1 KiB): one resource name, node id or node cluster.
    - ``max_node_metadata_bytes`` (64 KiB): node metadata larger than this is ignored (the
      global ``disable_spiffe_cert_validation`` applies) and logged.
    - ``max_logged_bytes`` (1 KiB): NACK messages and other client text are truncated to
      this in logs, the ACK view and status messages.
    """

    max_message_bytes: int = 4 * 1024 * 1024
    max_names: int = 1000
    max_name_bytes: int = 1024
    max_node_metadata_bytes: int = 64 * 1024
    max_logged_bytes: int = 1024


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


@dataclass(slots=True)
class Push:
    """One response as sent on a stream: what an ACK or NACK of its nonce refers to."""

    seq: int
    version: str
    resources: dict[str, str]  # name -> resource version
    serials: dict[str, str]  # name -> leaf serial (hex), TLS certificates only
    removed: tuple[str, ...] = ()


@dataclass(eq=False)
class StreamInfo:
    """What we know about one connected Envoy stream, for logs, metrics and inspection."""

    id: int
    kind: str
    creds: PeerCredentials | None
    #: Who the stream is attested as now (per-caller mode: the workload's SPIFFE IDs), else "".
    workload: Callable[[], str] = str
    tenant: Hashable = None  # the lease's key: streams with the same one share a cache
    node: NodeInfo | None = None
    names: frozenset[str] | None = frozenset()
    inspector: bool = False
    sent_version: str = ""
    acked_version: str = ""
    acked: dict[str, str] = field(default_factory=dict)
    acked_serials: dict[str, str] = field(default_factory=dict)
    nacks: int = 0
    nacked_version: str = ""
    nack_error: str = ""
    rejected: dict[str, str] = field(default_factory=dict)
    opened_at: float = field(default_factory=time.time)
    pending: dict[str, Push] = field(default_factory=dict, repr=False)
    _seq: int = 0
    _acked_seq: int = 0
    _acked_at: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def node_id(self) -> str:
        return self.node.id if self.node is not None else ""

    def record(
        self, nonce: str, version: str, resources: dict[str, str], serials: dict[str, str]
    ) -> Push:
        """Remember a push under ``nonce`` before it is sent (the last few are kept)."""
        self._seq += 1
        push = Push(self._seq, version, resources, serials)
        self.pending[nonce] = push
        while len(self.pending) > _PENDING_PUSHES:
            del self.pending[next(iter(self.pending))]
        self.sent_version = version
        return push

    def accept(self, push: Push, *, complete: bool) -> None:
        """Envoy ACKed ``push``. ``complete`` (state of the world): it replaces what Envoy
        holds; otherwise (delta) it updates the names it carries. An ACK of an older push
        never overwrites what a newer ACK recorded."""
        if complete:
            if push.seq <= self._acked_seq:
                return
            self.acked = dict(push.resources)
            self.acked_serials = dict(push.serials)
            self._acked_at = dict.fromkeys(push.resources, push.seq)
        else:
            for name, version in push.resources.items():
                if push.seq > self._acked_at.get(name, 0):
                    self._acked_at[name] = push.seq
                    self.acked[name] = version
                    serial = push.serials.get(name)
                    if serial is None:
                        self.acked_serials.pop(name, None)
                    else:
                        self.acked_serials[name] = serial
            for name in push.removed:
                if push.seq > self._acked_at.get(name, 0):
                    self._acked_at[name] = push.seq
                    self.acked.pop(name, None)
                    self.acked_serials.pop(name, None)
        if push.seq > self._acked_seq:
            self._acked_seq = push.seq
            self.acked_version = push.version

    def reject(self, push: Push, message: str) -> None:
        """Envoy NACKed ``push``: it keeps what it had; the rejected push is recorded."""
        self.nacks += 1
        self.nacked_version = push.version
        self.nack_error = message
        self.rejected = dict(push.resources)

    def forget(self, name: str) -> None:
        """Envoy unsubscribed from ``name``."""
        self.acked.pop(name, None)
        self.acked_serials.pop(name, None)
        self._acked_at.pop(name, None)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view: who is connected, what it last accepted and last rejected."""
        return {
            "stream": self.id,
            "kind": self.kind,
            "node_id": self.node_id,
            "node_cluster": self.node.cluster if self.node else "",
            "envoy_version": self.node.build_version if self.node else "",
            "pid": self.creds.pid if self.creds else None,
            "uid": self.creds.uid if self.creds else None,
            "workload": self.workload(),
            "names": sorted(self.names) if self.names is not None else ["*"],
            "sent_version": self.sent_version,
            "acked_version": self.acked_version,
            "acked": dict(sorted(self.acked.items())),
            "acked_serials": dict(sorted(self.acked_serials.items())),
            "nacks": self.nacks,
            "nacked_version": self.nacked_version,
            "nack_error": self.nack_error,
            "rejected": dict(sorted(self.rejected.items())),
        }


class ServerEvents(Protocol):
    """Callbacks from the SDS server (the metrics seam; the core stays free of Prometheus).

    Called synchronously on the event loop; they must not block. The bodies
    here do nothing, so an implementation overrides only what it needs.
    """

    def stream_opened(self, info: StreamInfo) -> None:
        """A stream was admitted."""
        return None

    def stream_closed(self, info: StreamInfo) -> None:
        """A stream ended."""
        return None

    def pushed(self, info: StreamInfo, names: list[str], latency: float) -> None:
        """A response with ``names`` was sent, ``latency`` s after the state changed."""
        return None

    def acked(self, info: StreamInfo) -> None:
        """Envoy accepted a response on ``info`` (``info.acked`` is updated)."""
        return None

    def nacked(self, info: StreamInfo, message: str) -> None:
        """Envoy rejected a response with ``message`` (truncated)."""
        return None

    def denied(self, creds: PeerCredentials | None) -> None:
        """A caller was refused by uid/gid."""
        return None


class NullServerEvents(ServerEvents):
    """ServerEvents that do nothing."""


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may call: uids/gids from SO_PEERCRED (empty sets = anyone who can reach the socket)."""

    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()

    def admits(self, creds: PeerCredentials | None) -> bool:
        if not self.allowed_uids and not self.allowed_gids:
            return True
        if creds is None:
            return False
        return creds.uid in self.allowed_uids or creds.gid in self.allowed_gids


@dataclass(eq=False)
class Lease:
    """The cache one stream is served from while it is open, and who its caller is.

    ``fresh``: the cache was made for this caller just now and may not hold its
    secrets yet (FetchSecrets then waits briefly instead of answering NOT_FOUND).
    """

    cache: SecretCache
    workload: Callable[[], str] = str
    fresh: bool = False
    #: Called with names the caller asked for that its cache lacks (JWT-SVID demand).
    on_missing: Callable[[Iterable[str]], None] | None = None
    #: Which tenant this is (opaque to the server; copied to :attr:`StreamInfo.tenant`).
    key: Hashable = None


class Tenancy(Protocol):
    """Which cache serves a caller: one cache shared by all, or one per attested workload.

    ``acquire`` is called once per stream after the access policy admitted the
    caller; it raises :class:`sds.errors.NotEntitled` to refuse it. Every lease
    acquired is released exactly once, when its stream ends.
    """

    def acquire(self, stream: Any, creds: PeerCredentials | None) -> Lease: ...

    def release(self, lease: Lease) -> None: ...


class SharedCache(Tenancy):
    """Every caller is served the one cache (the bridge's own identity)."""

    def __init__(
        self, cache: SecretCache, on_missing: Callable[[Iterable[str]], None] | None = None
    ) -> None:
        self.lease = Lease(cache, on_missing=on_missing)

    def acquire(self, stream: Any, creds: PeerCredentials | None) -> Lease:
        return self.lease

    def release(self, lease: Lease) -> None:
        pass


#: Seconds FetchSecrets waits for a caller's freshly subscribed secrets before NOT_FOUND.
FRESH_FETCH_WAIT = 5.0


class SdsServicer:
    """Serves secrets from a :class:`SecretCache` (or, with a :class:`Tenancy`, from each
    caller's own) to Envoy over SDS v3."""

    def __init__(
        self,
        cache: SecretCache,
        *,
        tenancy: Tenancy | None = None,
        access: AccessPolicy | None = None,
        disable_spiffe_cert_validation: bool = False,
        events: ServerEvents | None = None,
        on_missing: Callable[[Iterable[str]], None] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.cache = cache
        self.tenancy: Tenancy = tenancy or SharedCache(cache, on_missing)
        self.access = access or AccessPolicy()
        self.disable_spiffe_cert_validation = disable_spiffe_cert_validation
        self.events: ServerEvents = events or NullServerEvents()
        self.limits = limits or Limits()
        #: Connected Envoy streams by id (``sds inspect`` streams are left out).
        self.streams: dict[int, StreamInfo] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        # Per stream and reason: 5 lines a minute. Server-wide (opens, denials): 100 per 10 s.
        self._stream_log = RateLimiter(5, 60.0)
        self._server_log = RateLimiter(100, 10.0, max_keys=1000)

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        cardinality = grpclib.const.Cardinality
        return {
            f"{_SERVICE}/StreamSecrets": grpclib.const.Handler(
                self._stream_secrets,
                cardinality.STREAM_STREAM,
                LiteRequest,
                DiscoveryResponse,
            ),
            f"{_SERVICE}/DeltaSecrets": grpclib.const.Handler(
                self._delta_secrets,
                cardinality.STREAM_STREAM,
                LiteDeltaRequest,
                DeltaDiscoveryResponse,
            ),
            f"{_SERVICE}/FetchSecrets": grpclib.const.Handler(
                self._fetch_secrets,
                cardinality.UNARY_UNARY,
                LiteRequest,
                DiscoveryResponse,
            ),
        }

    # -- logging ------------------------------------------------------------------------------

    def _note(
        self, limiter: RateLimiter, key: Hashable, level: int, name: str, **fields: Any
    ) -> None:
        """Log ``name`` unless ``key`` is over its rate; report what was suppressed before."""
        if not log.isEnabledFor(level):
            return
        allowed, suppressed = limiter.allow(key)
        if not allowed:
            return
        if suppressed:
            fields["suppressed"] = suppressed
        event(log, level, name, **fields)

    def _flush_stream_log(self, info: StreamInfo) -> None:
        for reason in _STREAM_REASONS:
            suppressed = self._stream_log.flush((reason, info.id))
            if suppressed:
                event(
                    log,
                    logging.WARNING,
                    "sds.log_suppressed",
                    event=reason,
                    stream=info.id,
                    node=info.node_id,
                    suppressed=suppressed,
                )

    # -- shared helpers -------------------------------------------------------------------

    def _admit(self, stream: SotwStream | DeltaStream, kind: str) -> StreamInfo:
        creds = peer_credentials(stream)
        if not self.access.admits(creds):
            self.events.denied(creds)
            who = f"uid={creds.uid} gid={creds.gid} pid={creds.pid}" if creds else "a TCP peer"
            key = ("sds.denied", creds.uid if creds else None)
            self._note(self._server_log, key, logging.WARNING, "sds.denied", peer=who)
            raise GRPCError(
                Status.PERMISSION_DENIED,
                f"{who} is not allowed to fetch secrets (not in allowed_uids/allowed_gids)",
            )
        return StreamInfo(next(self._ids), kind, creds)

    def _trusted_ca(self, info: StreamInfo) -> bool:
        if info.node is not None and info.node.disable_spiffe is not None:
            return info.node.disable_spiffe
        return self.disable_spiffe_cert_validation

    def _nonce(self, cache: SecretCache) -> str:
        return f"{cache.instance_id}-n{next(self._nonces)}"

    def _set_node(self, info: StreamInfo, node: bytes | None) -> None:
        # Keep the node from the first request that carries one (Envoy may omit it later);
        # later copies are not even decoded.
        if info.node is not None or node is None:
            return
        limits = self.limits
        try:
            parsed = node_info(node, max_metadata_bytes=limits.max_node_metadata_bytes)
        except WireError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, f"malformed node: {exc}") from exc
        for what, value in (("node id", parsed.id), ("node cluster", parsed.cluster)):
            size = len(value.encode())
            if size > limits.max_name_bytes:
                raise GRPCError(
                    Status.INVALID_ARGUMENT,
                    f"{what} is {size} bytes; the limit is {limits.max_name_bytes}",
                )
        info.node = parsed
        if parsed.metadata_ignored:
            self._note(
                self._stream_log,
                ("sds.node_metadata_ignored", info.id),
                logging.WARNING,
                "sds.node_metadata_ignored",
                node=parsed.id,
                stream=info.id,
                limit=limits.max_node_metadata_bytes,
                hint="node metadata over the limit; the global validator setting applies",
            )
        if parsed.id == INSPECTOR_NODE and parsed.cluster == INSPECTOR_NODE:
            info.inspector = True
            self.streams.pop(info.id, None)

    def _check_names(self, names: Iterable[str], count: int) -> None:
        limits = self.limits
        if count > limits.max_names:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"request names {count} secrets; the limit is {limits.max_names} per request",
            )
        for name in names:
            if len(name) > limits.max_name_bytes // 4 and len(name.encode()) > (
                limits.max_name_bytes
            ):
                raise GRPCError(
                    Status.INVALID_ARGUMENT,
                    f"a resource name is {len(name.encode())} bytes; "
                    f"the limit is {limits.max_name_bytes}",
                )

    def _read(self, info: StreamInfo, request: _Request) -> _Request:
        """Check a request (the server's view of it, so the message itself can be dropped):
        its type and limits; keep its node once, drop the node bytes."""
        self._check_type(request.type_url)
        if isinstance(request, SotwRequest):
            self._check_names(request.resource_names, len(request.resource_names))
        else:
            count = len(request.subscribe) + len(request.unsubscribe)
            count += len(request.initial_versions)
            self._check_names(
                itertools.chain(request.subscribe, request.unsubscribe, request.initial_versions),
                count,
            )
        self._set_node(info, request.node)
        request.node = None
        return request

    def _check_type(self, type_url: str) -> None:
        if type_url and type_url != SECRET_TYPE_URL:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"this server serves only {SECRET_TYPE_URL}, not {_truncate(type_url, 200)}",
            )

    def _lease(self, stream: Any, info: StreamInfo) -> Lease:
        """The caller's cache from the tenancy; a caller it refuses gets PERMISSION_DENIED."""
        try:
            lease = self.tenancy.acquire(stream, info.creds)
        except NotEntitled as exc:
            self.events.denied(info.creds)
            self._note(
                self._server_log,
                ("sds.not_entitled",),
                logging.WARNING,
                "sds.not_entitled",
                pid=info.creds.pid if info.creds else "",
                uid=info.creds.uid if info.creds else "",
                reason=str(exc),
            )
            raise GRPCError(Status.PERMISSION_DENIED, str(exc)) from exc
        except TooManyCallers as exc:
            self._note(
                self._server_log,
                ("sds.too_many_callers",),
                logging.WARNING,
                "sds.too_many_callers",
                pid=info.creds.pid if info.creds else "",
                reason=str(exc),
            )
            raise GRPCError(Status.RESOURCE_EXHAUSTED, str(exc)) from exc
        info.workload = lease.workload
        info.tenant = lease.key
        return lease

    @staticmethod
    def _check_open(cache: SecretCache) -> None:
        if cache.closed is not None:
            raise GRPCError(Status.UNAVAILABLE, cache.closed)

    def _log_unknown(
        self, lease: Lease, info: StreamInfo, unknown: Iterable[str], logged: set[str]
    ) -> None:
        unknown = set(unknown)
        if unknown and lease.on_missing is not None:
            lease.on_missing(unknown)
        new = sorted(unknown - logged)
        if not new:
            return
        if len(logged) < self.limits.max_names:
            logged.update(new)
        shown = new[:10]
        self._note(
            self._stream_log,
            ("sds.unknown_name", info.id),
            logging.WARNING,
            "sds.unknown_name",
            names=",".join(shown),
            count=len(new),
            node=info.node_id,
            stream=info.id,
            hint="not served now; Envoy will wait until it exists",
        )

    def _opened(self, info: StreamInfo) -> None:
        self.streams[info.id] = info
        self.events.stream_opened(info)
        self._note(
            self._server_log,
            ("sds.stream_opened",),
            logging.INFO,
            "sds.stream_opened",
            stream=info.id,
            kind=info.kind,
            pid=info.creds.pid if info.creds else "",
            uid=info.creds.uid if info.creds else "",
        )

    def _closed(self, info: StreamInfo) -> None:
        self.streams.pop(info.id, None)
        self.events.stream_closed(info)
        self._flush_stream_log(info)
        self._note(
            self._server_log,
            ("sds.stream_closed",),
            logging.INFO,
            "sds.stream_closed",
            stream=info.id,
            node=info.node_id,
        )

    def _credit(self, info: StreamInfo, nonce: str, error: str | None, *, complete: bool) -> None:
        """Apply an ACK or NACK to the push ``nonce`` names, if it is one we are waiting on."""
        push = info.pending.pop(nonce, None) if nonce else None
        if push is None:
            return
        if error is None:
            info.accept(push, complete=complete)
            self.events.acked(info)
            return
        message = _truncate(error, self.limits.max_logged_bytes)
        info.reject(push, message)
        self.events.nacked(info, message)
        self._note(
            self._stream_log,
            ("sds.nack", info.id),
            logging.ERROR,
            "sds.nack",
            node=info.node_id,
            stream=info.id,
            version=push.version,
            names=",".join(sorted(push.resources)[:10]),
            error=message,
        )

    def _record(
        self,
        cache: SecretCache,
        info: StreamInfo,
        nonce: str,
        resources: dict[str, str],
        removed: Iterable[str] = (),
    ) -> Push:
        serials = {}
        for name in resources:
            spec = cache.spec(name)
            if isinstance(spec, TlsSpec):
                serials[name] = f"{spec.svid.serial:x}"
        push = info.record(nonce, cache.version, resources, serials)
        push.removed = tuple(removed)
        return push

    # -- stream plumbing ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _session(
        self, stream: SotwStream | DeltaStream, kind: str
    ) -> AsyncIterator[tuple[StreamInfo, Lease, Watch]]:
        """Admit the caller, lease its cache, register its watch, and always clean up (also
        on a reset stream)."""
        info = self._admit(stream, kind)
        lease = self._lease(stream, info)
        cache = lease.cache
        watch = cache.watch(frozenset())
        self._opened(info)
        try:
            yield info, lease, watch
        except StreamTerminatedError:
            pass
        finally:
            cache.cancel(watch)
            self.tenancy.release(lease)
            self._closed(info)

    async def _inputs(
        self, stream: Stream[_Message, Any], watch: Watch
    ) -> AsyncGenerator[_Message | None, None]:
        """Each request from Envoy (its Node undecoded), or None when the watch fired (a
        coalesced state change). Ends when Envoy half-closes the stream.

        Nothing here keeps a request alive while waiting for the next one: Envoy sends
        its whole Node (tens of kB) on every request, and a thousand idle streams would
        otherwise each pin their last one.
        """
        limit = self.limits.max_message_bytes
        recv: asyncio.Future[Any] = asyncio.ensure_future(recv_request(stream, limit))
        wake: asyncio.Future[Any] = asyncio.ensure_future(watch.event.wait())
        try:
            while True:
                done, _ = await asyncio.wait({recv, wake}, return_when=asyncio.FIRST_COMPLETED)
                got_request, woken = recv in done, wake in done
                del done
                if got_request:
                    message = recv.result()
                    recv = asyncio.ensure_future(recv_request(stream, limit))
                    if message is None:
                        return
                    yield message
                    del message
                if woken:
                    watch.event.clear()
                    wake = asyncio.ensure_future(watch.event.wait())
                    yield None
        finally:
            recv.cancel()
            wake.cancel()
            # A failed receive that nobody awaited must not be reported as "never retrieved".
            for future in (recv, wake):
                if future.done() and not future.cancelled():
                    future.exception()

    # -- state of the world -----------------------------------------------------------------

    async def _stream_secrets(self, stream: SotwStream) -> None:
        last_nonce: str | None = None
        sent: dict[str, str] = {}
        logged_unknown: set[str] = set()
        async with (
            self._session(stream, "sotw") as (info, lease, watch),
            contextlib.aclosing(self._inputs(stream, watch)) as inputs,
        ):
            cache = lease.cache
            async for message in inputs:
                self._check_open(cache)
                if message is not None:
                    request = self._read(info, sotw_request(message))
                    del message  # release it (and its Node bytes) before waiting again
                    self._credit(info, request.response_nonce, request.error, complete=True)
                    if last_nonce is not None and request.response_nonce != last_nonce:
                        continue  # stale: it answers an older response
                    names = frozenset(request.resource_names) if request.resource_names else None
                    info.names = watch.names = names
                wanted = cache.names() if info.names is None else sorted(info.names)
                current = {n: v for n in wanted if (v := cache.resource_version(n)) is not None}
                if info.names is not None:
                    self._log_unknown(lease, info, info.names - current.keys(), logged_unknown)
                # A new stream has sent == {}, so it is always answered when anything exists;
                # after that, identical content (e.g. the answer to a NACK) is never resent.
                if not current or current == sent:
                    continue
                trusted_ca = self._trusted_ca(info)
                rendered = [cache.render(n, trusted_ca=trusted_ca) for n in current]
                last_nonce = self._nonce(cache)
                response = sotw_response(
                    cache.version, [r for r in rendered if r is not None], last_nonce
                )
                del rendered
                push = self._record(cache, info, last_nonce, current)
                sent = current
                await stream.send_message(response)
                del response
                self._pushed(cache, info, push)

    def _pushed(self, cache: SecretCache, info: StreamInfo, push: Push) -> None:
        latency = time.monotonic() - cache.updated_at
        names = list(push.resources)
        self.events.pushed(info, names, latency)
        if log.isEnabledFor(logging.DEBUG):
            event(
                log,
                logging.DEBUG,
                "sds.push",
                stream=info.id,
                node=info.node_id,
                version=push.version,
                names=",".join(names),
                serials=",".join(f"{n}={s}" for n, s in push.serials.items()),
            )

    # -- incremental --------------------------------------------------------------------------

    async def _delta_secrets(self, stream: DeltaStream) -> None:
        subscribed: set[str] = set()
        wildcard = False
        known: dict[str, str] = {}  # what Envoy holds (or was last sent): name -> version
        logged_unknown: set[str] = set()
        first = True
        max_names = self.limits.max_names
        async with (
            self._session(stream, "delta") as (info, lease, watch),
            contextlib.aclosing(self._inputs(stream, watch)) as inputs,
        ):
            cache = lease.cache
            async for message in inputs:
                self._check_open(cache)
                if message is not None:
                    request = self._read(info, delta_request(message))
                    del message  # release it (and its Node bytes) before waiting again
                    if first:
                        # Envoy reconnecting says what it holds; versions from another bridge
                        # instance never match ours, so those secrets are sent again.
                        first = False
                        known.update(request.initial_versions)
                        wildcard = not request.subscribe
                    self._credit(info, request.response_nonce, request.error, complete=False)
                    for name in request.subscribe:
                        if name == "*":
                            wildcard = True
                        else:
                            subscribed.add(name)
                    for name in request.unsubscribe:
                        if name == "*":
                            wildcard = False
                        subscribed.discard(name)
                        known.pop(name, None)
                        info.forget(name)
                    if len(subscribed) > max_names:
                        raise GRPCError(
                            Status.INVALID_ARGUMENT,
                            f"stream subscribes to {len(subscribed)} secrets; "
                            f"the limit is {max_names}",
                        )
                    info.names = watch.names = None if wildcard else frozenset(subscribed)
                names = set(cache.names()) if wildcard else subscribed
                if not wildcard:
                    missing = {n for n in subscribed if cache.resource_version(n) is None}
                    self._log_unknown(lease, info, missing, logged_unknown)
                trusted_ca = self._trusted_ca(info)
                updates: list[tuple[str, str, bytes]] = []
                for name in sorted(names):
                    version = cache.resource_version(name)
                    if version is None or known.get(name) == version:
                        continue
                    rendered = cache.render(name, trusted_ca=trusted_ca)
                    if rendered is not None:
                        updates.append((name, version, rendered))
                removed = sorted(
                    n
                    for n in known
                    if cache.resource_version(n) is None and (wildcard or n in subscribed)
                )
                if not updates and not removed:
                    continue
                nonce = self._nonce(cache)
                push = self._record(cache, info, nonce, {n: v for n, v, _ in updates}, removed)
                for name, version, _ in updates:
                    known[name] = version
                for name in removed:
                    known.pop(name, None)
                await stream.send_message(delta_response(cache.version, updates, removed, nonce))
                del updates
                self._pushed(cache, info, push)

    # -- unary ----------------------------------------------------------------------------------

    async def _fetch_secrets(self, stream: SotwStream) -> None:
        info = self._admit(stream, "fetch")
        message = await recv_request(stream, self.limits.max_message_bytes)
        if message is None:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                "FetchSecrets needs a DiscoveryRequest; the call ended without one",
            )
        request = self._read(info, sotw_request(message))
        del message
        lease = self._lease(stream, info)
        try:
            await self._fetch_answer(stream, info, lease, list(request.resource_names))
        finally:
            self.tenancy.release(lease)

    async def _fetch_answer(
        self, stream: SotwStream, info: StreamInfo, lease: Lease, names: list[str]
    ) -> None:
        cache = lease.cache

        def found() -> list[str]:
            return [n for n in (names or cache.names()) if cache.resource_version(n) is not None]

        if lease.fresh and not found():
            watch = cache.watch(frozenset(names) if names else None)
            try:
                async with asyncio.timeout(FRESH_FETCH_WAIT):
                    while not found() and cache.closed is None:
                        await watch.event.wait()
                        watch.event.clear()
            except TimeoutError:
                pass
            finally:
                cache.cancel(watch)
        self._check_open(cache)
        wanted = names or cache.names()
        available = found()
        if not available:
            listed = ", ".join(wanted[:10]) + (
                f" (and {len(wanted) - 10} more)" * (len(wanted) > 10)
            )
            raise GRPCError(
                Status.NOT_FOUND,
                f"no secret named {listed or '(none)'} is available",
            )
        trusted_ca = self._trusted_ca(info)
        rendered = [cache.render(n, trusted_ca=trusted_ca) for n in available]
        response = sotw_response(cache.version, [r for r in rendered if r is not None])
        await stream.send_message(response)


class SdsServer(GuardedServer):
    """The :class:`~sds._util.grpcedge.GuardedServer` for one :class:`SdsServicer`.

    Messages go through grpclib's ProtoCodec (requests as the lite messages of
    :mod:`sds.xds.codec`); closed connections are logged as ``sds.connection_closed``.
    Timeouts: ``handshake_timeout`` (10 s), ``idle_timeout`` (300 s); listen backlog
    :data:`LISTEN_BACKLOG`.
    """

    def __init__(
        self,
        servicer: SdsServicer,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        super().__init__(
            [servicer],
            unknown_type=LiteRequest,
            handshake_timeout=handshake_timeout,
            idle_timeout=idle_timeout,
            log=log,
            connection_event="sds.connection_closed",
        )
