"""The Envoy Secret Discovery Service (``envoy.service.secret.v3.SecretDiscoveryService``).

StreamSecrets (state of the world), DeltaSecrets (incremental) and
FetchSecrets (unary) over grpclib, following the xDS protocol
("xDS REST and gRPC protocol", sections "ACK/NACK and resource type instance
version", "When to send an update", "Incremental xDS"):

- Every new stream is answered at once with the current secrets it names.
- Before the first response on a stream any ``response_nonce`` is accepted
  (Envoy reconnecting to a restarted bridge carries an old one); afterwards a
  request whose nonce is not the last one sent is stale and ignored.
- A NACK (``error_detail`` set) is logged with Envoy's message and node id,
  counted, and not answered by resending the same content.
- Pushes go only to streams subscribed to a changed name, and carry the
  latest state (coalesced), never a queue of intermediate ones.
- Names nobody can serve are logged once per stream and left unanswered,
  so Envoy keeps waiting as for a secret that is not ready yet.

gRPC status codes are chosen here and nowhere else. The caller's uid and gid
come from the kernel (SO_PEERCRED) and are checked on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpclib.const
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError, StreamTerminatedError

from .._log import event
from .._peercred import PeerCredentials, peer_credentials
from .cache import SecretCache, Watch
from .envoy import (
    SECRET_TYPE_URL,
    DeltaRequest,
    NodeInfo,
    SotwRequest,
    WireError,
    decode_delta_request,
    decode_sotw_request,
    delta_response,
    node_info,
    sotw_body,
    with_nonce,
)
from .resources import TlsSpec

__all__ = ["NullServerEvents", "PassthroughCodec", "SdsServicer", "ServerEvents", "StreamInfo"]

log = logging.getLogger("sds.server")

_SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"


class RawMessage:
    """Marker message type: the codec hands over and takes bytes, undecoded (see envoy.py)."""


class PassthroughCodec(ProtoCodec):
    """grpclib codec for :class:`RawMessage`: requests arrive as bytes, responses are sent as
    pre-serialized bytes (one serialization shared by every stream)."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        result: bytes = super().encode(message, message_type)
        return result

    def decode(self, data: bytes, message_type: Any) -> Any:
        if message_type is RawMessage:
            return data
        return super().decode(data, message_type)


@dataclass(eq=False)
class StreamInfo:
    """What we know about one connected Envoy stream, for logs, metrics and inspection."""

    id: int
    kind: str
    creds: PeerCredentials | None
    node: NodeInfo | None = None
    names: frozenset[str] | None = frozenset()
    sent_version: str = ""
    acked_version: str = ""
    acked: dict[str, str] = field(default_factory=dict)
    sent_serials: dict[str, str] = field(default_factory=dict)
    acked_serials: dict[str, str] = field(default_factory=dict)
    nacks: int = 0
    opened_at: float = field(default_factory=time.time)

    @property
    def node_id(self) -> str:
        return self.node.id if self.node is not None else ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view: who is connected and what it last accepted."""
        return {
            "stream": self.id,
            "kind": self.kind,
            "node_id": self.node_id,
            "node_cluster": self.node.cluster if self.node else "",
            "envoy_version": self.node.build_version if self.node else "",
            "pid": self.creds.pid if self.creds else None,
            "uid": self.creds.uid if self.creds else None,
            "names": sorted(self.names) if self.names is not None else ["*"],
            "sent_version": self.sent_version,
            "acked_version": self.acked_version,
            "acked": dict(sorted(self.acked.items())),
            "acked_serials": dict(sorted(self.acked_serials.items())),
            "nacks": self.nacks,
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
        """Envoy accepted the last response on ``info``."""
        return None

    def nacked(self, info: StreamInfo, message: str) -> None:
        """Envoy rejected a response with ``message``."""
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


class SdsServicer:
    """Serves secrets from a :class:`SecretCache` to Envoy over SDS v3."""

    def __init__(
        self,
        cache: SecretCache,
        *,
        access: AccessPolicy | None = None,
        disable_spiffe_cert_validation: bool = False,
        events: ServerEvents | None = None,
        on_missing: Callable[[Iterable[str]], None] | None = None,
    ) -> None:
        self.cache = cache
        self.on_missing = on_missing
        self.access = access or AccessPolicy()
        self.disable_spiffe_cert_validation = disable_spiffe_cert_validation
        self.events: ServerEvents = events or NullServerEvents()
        self.streams: dict[int, StreamInfo] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        cardinality = grpclib.const.Cardinality
        return {
            f"{_SERVICE}/StreamSecrets": grpclib.const.Handler(
                self._stream_secrets,
                cardinality.STREAM_STREAM,
                RawMessage,
                RawMessage,
            ),
            f"{_SERVICE}/DeltaSecrets": grpclib.const.Handler(
                self._delta_secrets,
                cardinality.STREAM_STREAM,
                RawMessage,
                RawMessage,
            ),
            f"{_SERVICE}/FetchSecrets": grpclib.const.Handler(
                self._fetch_secrets,
                cardinality.UNARY_UNARY,
                RawMessage,
                RawMessage,
            ),
        }

    # -- shared helpers -------------------------------------------------------------------

    def _admit(self, stream: Any, kind: str) -> StreamInfo:
        creds = peer_credentials(stream)
        if not self.access.admits(creds):
            self.events.denied(creds)
            who = f"uid={creds.uid} gid={creds.gid} pid={creds.pid}" if creds else "a TCP peer"
            event(log, logging.WARNING, "sds.denied", peer=who)
            raise GRPCError(
                grpclib.const.Status.PERMISSION_DENIED,
                f"{who} is not allowed to fetch secrets (not in allowed_uids/allowed_gids)",
            )
        return StreamInfo(next(self._ids), kind, creds)

    def _trusted_ca(self, info: StreamInfo) -> bool:
        if info.node is not None and info.node.disable_spiffe is not None:
            return info.node.disable_spiffe
        return self.disable_spiffe_cert_validation

    def _nonce(self) -> str:
        return f"{self.cache.instance_id}-n{next(self._nonces)}"

    def _set_node(self, info: StreamInfo, node: bytes | None) -> None:
        # Keep the node from the first request that carries one (Envoy may omit it later);
        # later copies are not even decoded.
        if info.node is None and node is not None:
            try:
                info.node = node_info(node)
            except WireError as exc:
                raise GRPCError(
                    grpclib.const.Status.INVALID_ARGUMENT, f"malformed node: {exc}"
                ) from exc

    def _read(self, info: StreamInfo, raw: bytes, decoder: Any) -> Any:
        """Decode a request, check its type, keep its node once, and drop the node bytes."""
        try:
            request = decoder(raw)
        except WireError as exc:
            raise GRPCError(
                grpclib.const.Status.INVALID_ARGUMENT, f"malformed request: {exc}"
            ) from exc
        self._check_type(request.type_url)
        self._set_node(info, request.node)
        request.node = None
        return request

    def _check_type(self, type_url: str) -> None:
        if type_url and type_url != SECRET_TYPE_URL:
            raise GRPCError(
                grpclib.const.Status.INVALID_ARGUMENT,
                f"this server serves only {SECRET_TYPE_URL}, not {type_url}",
            )

    def _log_unknown(self, info: StreamInfo, unknown: Iterable[str], logged: set[str]) -> None:
        unknown = set(unknown)
        if unknown and self.on_missing is not None:
            self.on_missing(unknown)
        for name in sorted(unknown - logged):
            logged.add(name)
            event(
                log,
                logging.WARNING,
                "sds.unknown_name",
                name=name,
                node=info.node_id,
                stream=info.id,
                hint="not served now; Envoy will wait until it exists",
            )

    def _opened(self, info: StreamInfo) -> None:
        self.streams[info.id] = info
        self.events.stream_opened(info)
        event(
            log,
            logging.INFO,
            "sds.stream_opened",
            stream=info.id,
            kind=info.kind,
            node=info.node_id,
            pid=info.creds.pid if info.creds else "",
            uid=info.creds.uid if info.creds else "",
        )

    def _closed(self, info: StreamInfo) -> None:
        self.streams.pop(info.id, None)
        self.events.stream_closed(info)
        event(log, logging.INFO, "sds.stream_closed", stream=info.id, node=info.node_id)

    def _nack(self, info: StreamInfo, version: str, message: str) -> None:
        info.nacks += 1
        self.events.nacked(info, message)
        event(
            log,
            logging.ERROR,
            "sds.nack",
            node=info.node_id,
            stream=info.id,
            version=version,
            error=message,
        )

    # -- stream plumbing ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _session(self, stream: Any, kind: str) -> AsyncIterator[tuple[StreamInfo, Watch]]:
        """Admit the caller, register its watch, and always clean up (also on a reset stream)."""
        info = self._admit(stream, kind)
        watch = self.cache.watch(frozenset())
        self._opened(info)
        try:
            yield info, watch
        except StreamTerminatedError:
            pass
        finally:
            self.cache.cancel(watch)
            self._closed(info)

    @staticmethod
    async def _inputs(stream: Any, watch: Watch) -> AsyncGenerator[bytes | None, None]:
        """Each request from Envoy (raw bytes), or None when the watch fired (a coalesced
        state change). Ends when Envoy half-closes the stream.

        Nothing here keeps a request alive while waiting for the next one: Envoy sends
        its whole Node (tens of kB) on every request, and a thousand idle streams would
        otherwise each pin their last one.
        """
        recv: asyncio.Future[Any] = asyncio.ensure_future(stream.recv_message())
        wake: asyncio.Future[Any] = asyncio.ensure_future(watch.event.wait())
        try:
            while True:
                done, _ = await asyncio.wait({recv, wake}, return_when=asyncio.FIRST_COMPLETED)
                got_request, woken = recv in done, wake in done
                del done
                if got_request:
                    raw = recv.result()
                    recv = asyncio.ensure_future(stream.recv_message())
                    if raw is None:
                        return
                    yield raw
                    del raw
                if woken:
                    watch.event.clear()
                    wake = asyncio.ensure_future(watch.event.wait())
                    yield None
        finally:
            recv.cancel()
            wake.cancel()

    # -- state of the world -----------------------------------------------------------------

    async def _stream_secrets(self, stream: Any) -> None:
        cache = self.cache
        last_nonce: str | None = None
        sent: dict[str, str] = {}
        logged_unknown: set[str] = set()
        async with (
            self._session(stream, "sotw") as (info, watch),
            contextlib.aclosing(self._inputs(stream, watch)) as inputs,
        ):
            async for raw in inputs:
                if raw is not None:
                    request: SotwRequest = self._read(info, raw, decode_sotw_request)
                    del raw  # release the bytes before waiting again
                    if last_nonce is not None:
                        if request.response_nonce != last_nonce:
                            continue  # stale: it answers an older response
                        if request.error is not None:
                            self._nack(info, request.version_info, request.error)
                        else:
                            info.acked_version = request.version_info
                            info.acked = dict(sent)
                            info.acked_serials = dict(info.sent_serials)
                            self.events.acked(info)
                    names = frozenset(request.resource_names) if request.resource_names else None
                    info.names = watch.names = names
                wanted = cache.names() if info.names is None else sorted(info.names)
                current = {n: v for n in wanted if (v := cache.resource_version(n)) is not None}
                if info.names is not None:
                    self._log_unknown(info, info.names - current.keys(), logged_unknown)
                # A new stream has sent == {}, so it is always answered when anything exists;
                # after that, identical content (e.g. the answer to a NACK) is never resent.
                if not current or current == sent:
                    continue
                trusted_ca = self._trusted_ca(info)
                rendered = [cache.render(n, trusted_ca=trusted_ca) for n in current]
                body = sotw_body(cache.version, [r for r in rendered if r is not None])
                last_nonce = self._nonce()
                await stream.send_message(with_nonce(body, last_nonce))
                sent = current
                info.sent_version = cache.version
                self._pushed(info, list(current))

    def _pushed(self, info: StreamInfo, names: list[str]) -> None:
        latency = time.monotonic() - self.cache.updated_at
        self.events.pushed(info, names, latency)
        serials = []
        for name in names:
            spec = self.cache.spec(name)
            if isinstance(spec, TlsSpec):
                info.sent_serials[name] = f"{spec.svid.serial:x}"
                serials.append(f"{name}={spec.svid.serial:x}")
        event(
            log,
            logging.DEBUG,
            "sds.push",
            stream=info.id,
            node=info.node_id,
            version=info.sent_version,
            names=",".join(names),
            serials=",".join(serials),
        )

    # -- incremental --------------------------------------------------------------------------

    async def _delta_secrets(self, stream: Any) -> None:
        cache = self.cache
        subscribed: set[str] = set()
        wildcard = False
        known: dict[str, str] = {}  # what Envoy holds (or was last sent): name -> version
        in_flight: dict[str, tuple[str, dict[str, str]]] = {}  # nonce -> (version, resources)
        logged_unknown: set[str] = set()
        first = True
        async with (
            self._session(stream, "delta") as (info, watch),
            contextlib.aclosing(self._inputs(stream, watch)) as inputs,
        ):
            async for raw in inputs:
                if raw is not None:
                    request: DeltaRequest = self._read(info, raw, decode_delta_request)
                    del raw  # release the bytes before waiting again
                    if first:
                        # Envoy reconnecting says what it holds; versions from another bridge
                        # instance never match ours, so those secrets are sent again.
                        first = False
                        known.update(request.initial_versions)
                        wildcard = not request.subscribe
                    self._delta_ack(info, request, in_flight)
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
                        info.acked.pop(name, None)
                    info.names = watch.names = None if wildcard else frozenset(subscribed)
                names = set(cache.names()) if wildcard else subscribed
                if not wildcard:
                    missing = {n for n in subscribed if cache.resource_version(n) is None}
                    self._log_unknown(info, missing, logged_unknown)
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
                nonce = self._nonce()
                await stream.send_message(delta_response(cache.version, updates, removed, nonce))
                for name, version, _ in updates:
                    known[name] = version
                for name in removed:
                    known.pop(name, None)
                in_flight[nonce] = (cache.version, {n: v for n, v, _ in updates})
                # Bounded: Envoy answers in order, so older nonces are superseded.
                for stale in list(in_flight)[:-8]:
                    del in_flight[stale]
                info.sent_version = cache.version
                self._pushed(info, [u[0] for u in updates])

    def _delta_ack(
        self,
        info: StreamInfo,
        request: DeltaRequest,
        in_flight: dict[str, tuple[str, dict[str, str]]],
    ) -> None:
        """Record the ACK or NACK of the response whose nonce ``request`` carries."""
        sent = in_flight.pop(request.response_nonce, None) if request.response_nonce else None
        if sent is None:
            return
        version, resources = sent
        if request.error is not None:
            self._nack(info, ",".join(resources.values()), request.error)
            return
        info.acked.update(resources)
        serials = info.sent_serials
        info.acked_serials.update({n: serials[n] for n in resources if n in serials})
        info.acked_version = version
        self.events.acked(info)

    # -- unary ----------------------------------------------------------------------------------

    async def _fetch_secrets(self, stream: Any) -> None:
        info = self._admit(stream, "fetch")
        request: SotwRequest = self._read(info, await stream.recv_message(), decode_sotw_request)
        cache = self.cache
        wanted = list(request.resource_names) or cache.names()
        found = [n for n in wanted if cache.resource_version(n) is not None]
        if not found:
            raise GRPCError(
                grpclib.const.Status.NOT_FOUND,
                f"no secret named {', '.join(wanted) or '(none)'} is available",
            )
        trusted_ca = self._trusted_ca(info)
        rendered = [cache.render(n, trusted_ca=trusted_ca) for n in found]
        await stream.send_message(sotw_body(cache.version, [r for r in rendered if r is not None]))
