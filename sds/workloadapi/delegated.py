"""SPIRE's Delegated Identity API, client side: each caller's own SVIDs, for ``sds run``.

The SPIRE agent's admin socket serves ``spire.api.agent.delegatedidentity.v1``
to authorized delegates (``authorized_delegates`` in the agent's config): a
delegate names a workload by its pid and receives that workload's SVIDs, as
if the workload had asked itself. This is the only client-side reader of
``delegatedidentity_pb2``; everything it hands out is a protobuf-free value of
:mod:`sds.spiffe`, and failures map to :mod:`sds.errors` through the same
table as the Workload API's (:class:`~sds.workloadapi.client.ApiClient`).

Behaviour followed (SPIRE v1.13.3, ``pkg/agent/api/delegatedidentity/v1``):

* ``SubscribeToX509SVIDs`` and ``FetchJWTSVIDs`` take either selectors or a
  non-zero pid (``INVALID_ARGUMENT`` "must provide either selectors or
  non-zero PID, but not both"); we always send the pid only.
* A delegate not in ``authorized_delegates`` gets ``PERMISSION_DENIED``
  "caller not configured as an authorized delegate"; a delegate with no
  entry of its own, "no identity issued".
* A workload with no entries gets messages with no SVIDs (not an error).
* SVIDs carry the chain as one DER certificate per element (leaf first), the
  ID as trust domain name and path, and a PKCS#8 DER key; ``federates_with``
  lists trust domain IDs; bundle maps are keyed by trust domain ID and hold
  the bundles of every trust domain the agent knows, not the workload's.
* The admin endpoint's middleware checks the ``workload.spiffe.io`` header
  only on ``/SpiffeWorkloadAPI/`` methods (``pkg/agent/endpoints/middleware.go``),
  so these calls carry no metadata.

:class:`DelegatedBundles` is the one long-running watch of the bundle streams,
shared by every workload; :class:`DelegatedWatcher` follows one workload's
SVID stream and serves, as an ``UpstreamSource``, only that workload's SVIDs
with the bundles of its own and its federated trust domains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, NoReturn, TypeVar

from grpclib.client import Channel

from sds._proto import delegatedidentity_pb2 as pb
from sds._proto.delegatedidentity_grpc import DelegatedIdentityStub
from sds._util.log import event
from sds.errors import (
    InvalidBundle,
    InvalidSpiffeId,
    InvalidSvid,
    WorkloadApiDenied,
    WorkloadApiError,
    WorkloadApiMisconfigured,
    WorkloadApiUnavailable,
)
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.jwt import JwtBundle
from sds.spiffe.x509 import BundleSet, X509Context, X509Svid, utc_text, utcnow
from sds.workloadapi.address import Address, as_address
from sds.workloadapi.backoff import Backoff
from sds.workloadapi.client import (
    ApiClient,
    JwtSvid,
    RejectedSvid,
    jwt_bundle_map,
    jwt_svid,
    trust_domain_key,
    x509_bundle_map,
)
from sds.workloadapi.watcher import (
    FAST_RETRY_DELAY,
    FIRST_MESSAGE_TIMEOUT,
    ExpiryTimer,
    SocketWake,
    first_state,
    last_good,
    retry_delay,
    same_jwt,
    same_x509,
    svid_expiry,
)

__all__ = [
    "DelegatedBundles",
    "DelegatedIdentityClient",
    "DelegatedWatcher",
    "DelegatedX509Update",
]

logger = logging.getLogger("sds.workloadapi")

_T = TypeVar("_T")
_MAX_PID = 2**31 - 1  # the request's pid is an int32


# --------------------------------------------------------------------------- conversion


@dataclass(frozen=True, slots=True)
class DelegatedX509Update:
    """One ``SubscribeToX509SVIDs`` message: the workload's SVIDs in order, each parsed
    (structure and key, X509-SVID s.4) or rejected, and the trust domains it federates with.

    SVIDs are not verified here: their bundles come on another stream
    (:meth:`DelegatedIdentityClient.x509_bundles`); :class:`DelegatedWatcher`
    verifies them.
    """

    svids: tuple[X509Svid | RejectedSvid, ...]
    federates_with: frozenset[TrustDomain]


def _spiffe_id(msg: pb.SPIFFEID) -> str:
    """SPIRE's ``{trust_domain: "example.org", path: "/web"}`` as ``spiffe://example.org/web``."""
    return f"spiffe://{msg.trust_domain}{msg.path}"


def _svid(item: pb.X509SVIDWithKey) -> X509Svid | RejectedSvid:
    msg = item.x509_svid
    sid = _spiffe_id(msg.id)
    try:
        return X509Svid.parse(sid, b"".join(msg.cert_chain), bytes(item.x509_svid_key), msg.hint)
    except InvalidSvid as exc:
        return RejectedSvid(sid, msg.hint, exc)
    except (ValueError, TypeError) as exc:  # e.g. cryptography on a malformed extension
        return RejectedSvid(sid, msg.hint, InvalidSvid(f"SVID {sid}: {exc}"))


def _x509_update(resp: pb.SubscribeToX509SVIDsResponse) -> DelegatedX509Update | InvalidBundle:
    """Convert one message SVID by SVID; a bad ``federates_with`` entry rejects it whole."""
    try:
        federates = frozenset(
            trust_domain_key(key, "federates_with") for key in resp.federates_with
        )
    except InvalidBundle as exc:
        return exc
    return DelegatedX509Update(tuple(_svid(item) for item in resp.x509_svids), federates)


def _check_pid(pid: int) -> int:
    if not 0 < pid <= _MAX_PID:
        raise ValueError(f"pid must be between 1 and {_MAX_PID}, got {pid}")
    return pid


# --------------------------------------------------------------------------- client


class DelegatedIdentityClient(ApiClient[DelegatedIdentityStub]):
    """One connection to a SPIRE agent's admin socket; calls of the Delegated Identity API.

    Errors as :class:`~sds.workloadapi.client.ApiClient` maps them (the same
    table as the Workload API client); bundles that do not parse raise
    InvalidBundle from the strict streams, JWT-SVIDs that do not, InvalidJwt.
    A pid outside 1..2**31-1 is a programming error (ValueError).
    """

    label: ClassVar[str] = "delegated identity API"
    protocol: ClassVar[str] = "SPIRE Delegated Identity API"
    metadata: ClassVar[Mapping[str, str]] = {}

    def _new_stub(self, channel: Channel) -> DelegatedIdentityStub:
        return DelegatedIdentityStub(channel)

    async def x509_svids(
        self, pid: int
    ) -> AsyncGenerator[DelegatedX509Update | InvalidBundle, None]:
        """Every ``SubscribeToX509SVIDs`` message for the workload ``pid``, each its complete
        state, until the server ends the stream. A message whose ``federates_with`` does not
        parse is yielded as its InvalidBundle; the stream goes on."""
        request = pb.SubscribeToX509SVIDsRequest(pid=_check_pid(pid))
        stream = self._stream(self._api().SubscribeToX509SVIDs, request)
        async with contextlib.aclosing(stream) as responses:
            async for resp in responses:
                yield _x509_update(resp)

    async def x509_bundle_updates(self) -> AsyncGenerator[BundleSet | InvalidBundle, None]:
        """Every ``SubscribeToX509Bundles`` message (every bundle the agent has), or its
        InvalidBundle when one entry does not parse; the stream goes on."""
        stream = self._stream(
            self._api().SubscribeToX509Bundles, pb.SubscribeToX509BundlesRequest()
        )
        async with contextlib.aclosing(stream) as responses:
            async for resp in responses:
                try:
                    bundles = BundleSet(x509_bundle_map(resp.ca_certificates, "X.509 bundle"))
                except InvalidBundle as exc:
                    yield exc
                else:
                    yield bundles

    async def x509_bundles(self) -> AsyncGenerator[BundleSet, None]:
        """Every ``SubscribeToX509Bundles`` message, strictly: a bad bundle raises InvalidBundle."""
        async with contextlib.aclosing(self.x509_bundle_updates()) as updates:
            async for update in updates:
                if isinstance(update, InvalidBundle):
                    raise update
                yield update

    async def fetch_jwt_svids(self, pid: int, audiences: Sequence[str]) -> list[JwtSvid]:
        """JWT-SVIDs of every identity of the workload ``pid``, for ``audiences``.

        SPIRE answers ``INVALID_ARGUMENT`` without an audience and
        ``PERMISSION_DENIED`` "no identity issued" when the workload has none.
        """
        request = pb.FetchJWTSVIDsRequest(audience=list(audiences), pid=_check_pid(pid))
        resp = await self._unary(self._api().FetchJWTSVIDs, request)
        return [jwt_svid(_spiffe_id(msg.id), msg.token, msg.hint) for msg in resp.svids]

    async def jwt_bundle_updates(
        self,
    ) -> AsyncGenerator[dict[TrustDomain, JwtBundle] | InvalidBundle, None]:
        """Every ``SubscribeToJWTBundles`` message, or its InvalidBundle; the stream goes on."""
        stream = self._stream(self._api().SubscribeToJWTBundles, pb.SubscribeToJWTBundlesRequest())
        async with contextlib.aclosing(stream) as responses:
            async for resp in responses:
                try:
                    bundles = jwt_bundle_map(resp.bundles)
                except InvalidBundle as exc:
                    yield exc
                else:
                    yield bundles

    async def jwt_bundles(self) -> AsyncGenerator[dict[TrustDomain, JwtBundle], None]:
        """Every ``SubscribeToJWTBundles`` message, strictly: a bad bundle raises InvalidBundle."""
        async with contextlib.aclosing(self.jwt_bundle_updates()) as updates:
            async for update in updates:
                if isinstance(update, InvalidBundle):
                    raise update
                yield update


# --------------------------------------------------------------------------- keeping streams open


async def _keep_open(
    what: str,
    where: str,
    open_stream: Callable[[], AsyncGenerator[_T, None]],
    take: Callable[[_T], bool],
    *,
    backoff: Backoff,
    first_message_timeout: float,
    up: Callable[[], None],
    down: Callable[[WorkloadApiError, float], None],
    wait: Callable[[float], Awaitable[bool]],
    hung: Callable[[], None],
    fast_retry: Callable[[], bool] = lambda: False,
) -> NoReturn:
    """Keep one server stream open until cancelled, giving each message to ``take``.

    ``up()`` runs when a connection delivers its first message (within
    ``first_message_timeout``); ``take`` returns True for a message it accepted,
    which resets the backoff. A failure or end of stream calls ``down(error,
    delay)`` and waits ``delay`` (the backoff's, :func:`retry_delay`) through
    ``wait``, which returns True when woken early because the server is back.
    A connection that sends no first message in time is dropped with ``hung()``
    (the next attempt opens a new one).
    """
    while True:
        try:
            async with contextlib.aclosing(open_stream()) as messages:
                try:
                    async with asyncio.timeout(first_message_timeout):
                        first = await anext(messages)
                except TimeoutError:
                    hung()
                    raise WorkloadApiUnavailable(
                        f"{where} sent no {what} message within {first_message_timeout:g}s "
                        "of connecting"
                    ) from None
                up()
                if take(first):
                    backoff.reset()
                async for message in messages:
                    if take(message):
                        backoff.reset()
            raise WorkloadApiUnavailable(f"{where} ended the {what} stream")
        except StopAsyncIteration:
            error: WorkloadApiError = WorkloadApiUnavailable(f"{where} ended the {what} stream")
            delay = retry_delay(error, backoff)
        except WorkloadApiUnavailable as exc:
            error = exc
            delay = FAST_RETRY_DELAY if fast_retry() else retry_delay(exc, backoff)
        except WorkloadApiError as exc:
            error = exc
            delay = retry_delay(exc, backoff)
        except Exception as exc:  # noqa: BLE001 - policy: log, then retry like an outage
            event(logger, logging.ERROR, "delegated_api.unexpected_error", error=repr(exc))
            error = WorkloadApiError(f"{where}: {exc!r}")
            delay = retry_delay(error, backoff)
        down(error, delay)
        if await wait(delay):
            backoff.reset()


class _Listeners:
    """Callbacks run synchronously on the loop after a change; a failing one is logged."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def remove(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def notify(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - one broken listener must not stop the rest
                event(logger, logging.ERROR, "watcher.listener_failed", error=repr(exc))


# --------------------------------------------------------------------------- bundles


class DelegatedBundles:
    """The agent's X.509 and JWT bundles, kept forever from one watch shared by every workload.

    :meth:`run` follows ``SubscribeToX509Bundles`` and ``SubscribeToJWTBundles``
    over one connection until cancelled, reconnecting with exponential backoff
    and full jitter (reset after each good message); on a Unix socket the
    socket's directory is watched while the X.509 stream is down and a
    reappearing socket is connected at once. Each message is the complete set
    (every trust domain the agent knows; :class:`DelegatedWatcher` picks a
    workload's). A message that does not parse is logged and the last good set
    kept; identical messages are dropped. Listeners registered with
    :meth:`subscribe` run after every change of either set or of
    :attr:`connected`.
    """

    def __init__(
        self,
        address: Address | str,
        *,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        first_message_timeout: float = FIRST_MESSAGE_TIMEOUT,
        watch_socket: bool = True,
    ) -> None:
        self.address = as_address(address)
        Backoff(backoff_initial, backoff_max)  # validate the arguments early
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.first_message_timeout = first_message_timeout
        self._wake = SocketWake(self.address, enabled=watch_socket)
        self._where = f"{DelegatedIdentityClient.label} at {self.address}"
        self._x509: BundleSet | None = None
        self._jwt: dict[TrustDomain, JwtBundle] = {}
        self._connected = False
        self._last_error: WorkloadApiError | None = None
        self._reconnected = asyncio.Event()
        self._listeners = _Listeners()

    # -- public state ------------------------------------------------------

    def current(self) -> BundleSet | None:
        """Every X.509 bundle the agent has (last good), or None before the first message."""
        return self._x509

    def jwt_bundles(self) -> Mapping[TrustDomain, JwtBundle]:
        """Every JWT bundle the agent has (read-only view; empty before the first message)."""
        return MappingProxyType(self._jwt)

    @property
    def connected(self) -> bool:
        """Whether the X.509 bundle stream is up now."""
        return self._connected

    @property
    def last_error(self) -> WorkloadApiError | None:
        """The most recent X.509 bundle stream failure, or None since it came back."""
        return self._last_error

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` synchronously on the loop after every change."""
        self._listeners.add(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback`` (a stopped workload's watcher); unknown ones are ignored."""
        self._listeners.remove(callback)

    async def wait_reconnected(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait up to ``timeout`` s; True if the X.509 bundle stream came up meanwhile.

        Other streams on the same socket sleep their backoff here, so a restarted
        agent is reconnected by all of them at once, with one directory watch.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._reconnected.wait()
        except TimeoutError:
            return False
        return True

    # -- running -----------------------------------------------------------

    async def run(self) -> None:
        """Follow both bundle streams until cancelled (never returns otherwise)."""
        client = DelegatedIdentityClient(self.address)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._x509_loop(client))
                group.create_task(self._jwt_loop(client))
        finally:
            self._wake.stop()
            self._connected = False
            client.close()

    async def _x509_loop(self, client: DelegatedIdentityClient) -> NoReturn:
        await _keep_open(
            "X.509 bundle",
            self._where,
            client.x509_bundle_updates,
            self._take_x509,
            backoff=Backoff(self.backoff_initial, self.backoff_max),
            first_message_timeout=self.first_message_timeout,
            up=self._x509_up,
            down=self._x509_down,
            wait=self._x509_wait,
            hung=client.close,
            fast_retry=self._wake.take_fast_retry,
        )

    async def _jwt_loop(self, client: DelegatedIdentityClient) -> NoReturn:
        attempts = Backoff(self.backoff_initial, self.backoff_max)

        def down(error: WorkloadApiError, delay: float) -> None:
            # The X.509 loop reports the connection; repeat failures here stay quiet.
            level = logging.WARNING if attempts.attempt <= 1 else logging.DEBUG
            event(
                logger,
                level,
                "delegated_api.jwt_bundles_failed",
                address=self.address,
                error=error,
                retry_in=f"{delay:.3f}",
            )

        await _keep_open(
            "JWT bundle",
            self._where,
            client.jwt_bundle_updates,
            self._take_jwt,
            backoff=attempts,
            first_message_timeout=self.first_message_timeout,
            up=lambda: None,
            down=down,
            wait=self.wait_reconnected,
            hung=client.close,
        )

    async def _x509_wait(self, delay: float) -> bool:
        appeared = await self._wake.wait(delay)
        if appeared:
            event(logger, logging.INFO, "delegated_api.socket_appeared", address=self.address)
        return appeared

    def _x509_up(self) -> None:
        self._last_error = None
        self._wake.up()
        self._reconnected.set()
        self._reconnected.clear()
        event(logger, logging.INFO, "delegated_api.connected", address=self.address)
        if not self._connected:
            self._connected = True
            self._listeners.notify()

    def _x509_down(self, error: WorkloadApiError, delay: float) -> None:
        self._last_error = error
        event(
            logger,
            logging.WARNING,
            "delegated_api.bundles_disconnected",
            address=self.address,
            error=error,
            retry_in=f"{delay:.3f}",
        )
        if self._connected:
            self._connected = False
            self._listeners.notify()

    def _take_x509(self, update: BundleSet | InvalidBundle) -> bool:
        if isinstance(update, InvalidBundle):
            event(
                logger,
                logging.ERROR,
                "x509_bundles.rejected",
                reason=update,
                action="kept the last good bundles",
            )
            return False
        if self._x509 is not None and self._x509 == update:
            return True
        self._x509 = update
        event(
            logger,
            logging.INFO,
            "x509_bundles.updated",
            bundles=",".join(td.name for td in update) or "none",
        )
        self._listeners.notify()
        return True

    def _take_jwt(self, update: dict[TrustDomain, JwtBundle] | InvalidBundle) -> bool:
        if isinstance(update, InvalidBundle):
            event(
                logger,
                logging.ERROR,
                "jwt_bundles.rejected",
                reason=update,
                action="kept the last good JWT bundles",
            )
            return False
        if same_jwt(self._jwt, update):
            return True
        self._jwt = update
        event(
            logger,
            logging.INFO,
            "jwt_bundles.updated",
            bundles=",".join(td.name for td in sorted(update)) or "none",
        )
        self._listeners.notify()
        return True


# --------------------------------------------------------------------------- one workload


class DelegatedWatcher:
    """One workload's X.509 state from the Delegated Identity API; an ``UpstreamSource``.

    :meth:`run` keeps ``SubscribeToX509SVIDs(pid)`` open until cancelled
    (the owner cancels it when the workload's process exits), reconnecting with
    backoff and waking early when the shared ``bundles`` watch reconnects; it
    closes its connection when it stops. :meth:`current` is an ``X509Context``
    whose SVIDs are the latest message's, each verified against the bundle of
    its own trust domain from ``bundles`` (X509-SVID s.5), and whose bundles
    are exactly those of its SVIDs' own trust domains and of its
    ``federates_with``, never another trust domain the agent knows. It is
    re-evaluated when either the SVID stream or the bundles change; listeners
    run only when it really changed or :attr:`connected` did. An SVID that
    fails is reported and the last good one with the same SPIFFE ID and hint
    is kept while it still verifies; a message whose ``federates_with`` does
    not parse is rejected whole. SVIDs are withdrawn at their local expiry
    (one timer, as :class:`~sds.workloadapi.watcher.Watcher` does) and on
    ``PERMISSION_DENIED`` (the bundles stay).
    """

    def __init__(
        self,
        address: Address | str,
        pid: int,
        bundles: DelegatedBundles,
        *,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        first_message_timeout: float = FIRST_MESSAGE_TIMEOUT,
    ) -> None:
        self.address = as_address(address)
        self.pid = _check_pid(pid)
        self.bundles = bundles
        Backoff(backoff_initial, backoff_max)  # validate the arguments early
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.first_message_timeout = first_message_timeout
        self._where = f"{DelegatedIdentityClient.label} at {self.address} (pid {pid})"
        self._update: DelegatedX509Update | None = None
        self._reported: set[str] = set()  # rejections logged for the current message
        self._ctx: X509Context | None = None
        self._expiry = ExpiryTimer(self._on_expired)
        self._connected = False
        self._last_error: WorkloadApiError | None = None
        self._ready = asyncio.Event()
        self._listeners = _Listeners()

    # -- public state ------------------------------------------------------

    def current(self) -> X509Context | None:
        """The workload's latest verified X.509 state (no expired SVID), or None before any."""
        ctx = self._ctx
        return None if ctx is None else self._expiry.unexpired(ctx)

    @property
    def connected(self) -> bool:
        """Whether the workload's SVID stream is up now."""
        return self._connected

    @property
    def last_error(self) -> WorkloadApiError | None:
        """The most recent SVID stream failure; before the first state, the bundle watch's."""
        if self._last_error is None and self._ctx is None:
            return self.bundles.last_error
        return self._last_error

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` synchronously on the loop after every change."""
        self._listeners.add(callback)

    async def wait_ready(self, timeout: float) -> X509Context:  # noqa: ASYNC109
        """Wait up to ``timeout`` seconds for the first X.509 state and return it.

        On timeout raises the class of :attr:`last_error` with its reason, or
        WorkloadApiUnavailable if none was seen.
        """
        return await first_state(
            self._ready, timeout, self._where, lambda: self.last_error, self.current
        )

    # -- running -----------------------------------------------------------

    async def run(self) -> None:
        """Follow the workload's SVID stream until cancelled (never returns otherwise)."""
        client = DelegatedIdentityClient(self.address)
        self.bundles.subscribe(self._evaluate)
        try:
            await _keep_open(
                "X.509-SVID",
                self._where,
                lambda: client.x509_svids(self.pid),
                self._take,
                backoff=Backoff(self.backoff_initial, self.backoff_max),
                first_message_timeout=self.first_message_timeout,
                up=self._up,
                down=self._down,
                wait=self.bundles.wait_reconnected,
                hung=client.close,
            )
        finally:
            self.bundles.unsubscribe(self._evaluate)
            self._expiry.cancel()
            self._connected = False
            client.close()

    def _up(self) -> None:
        self._last_error = None
        event(logger, logging.INFO, "delegated_api.svids_connected", pid=self.pid)
        if not self._connected:
            self._connected = True
            self._listeners.notify()

    def _down(self, error: WorkloadApiError, delay: float) -> None:
        self._last_error = error
        changed = self._connected
        self._connected = False
        if isinstance(error, WorkloadApiDenied) and self._withdraw():
            changed = False  # _withdraw notified
        refused = isinstance(error, WorkloadApiDenied | WorkloadApiMisconfigured)
        event(
            logger,
            logging.ERROR if refused else logging.WARNING,
            "delegated_api.svids_disconnected",
            pid=self.pid,
            error=error,
            retry_in=f"{delay:.3f}",
        )
        if changed:
            self._listeners.notify()

    def _take(self, update: DelegatedX509Update | InvalidBundle) -> bool:
        if isinstance(update, InvalidBundle):
            event(
                logger,
                logging.ERROR,
                "x509.update_rejected",
                pid=self.pid,
                reason=update,
                action="kept the last good state",
            )
            return False
        self._update = update
        self._reported.clear()
        self._evaluate()
        return True

    # -- state ---------------------------------------------------------------

    def _evaluate(self) -> None:
        """Publish the current message's SVIDs verified against the current bundles."""
        update = self._update
        bundles = self.bundles.current()
        if update is None or bundles is None:
            return  # nothing to verify yet, or nothing to verify against
        previous: dict[tuple[str, str], X509Svid] = {}
        for svid in self._ctx.svids if self._ctx else ():
            previous.setdefault((str(svid.spiffe_id), svid.hint), svid)  # first wins
        now = utcnow()
        domains = set(update.federates_with)
        svids: list[X509Svid] = []
        for item in update.svids:
            if isinstance(item, X509Svid):
                domains.add(item.spiffe_id.trust_domain)
                try:
                    item.verify(bundles.get(item.spiffe_id.trust_domain), now)
                except InvalidSvid as exc:
                    rejected = RejectedSvid(str(item.spiffe_id), item.hint, exc)
                else:
                    svids.append(item)
                    continue
            else:
                rejected = item
                with contextlib.suppress(InvalidSpiffeId):
                    domains.add(SpiffeId.parse(item.spiffe_id).trust_domain)
            kept = last_good(previous.get((rejected.spiffe_id, rejected.hint)), bundles)
            if kept is not None:
                svids.append(kept)
            self._report(rejected, kept)
        own = BundleSet(bundles[td] for td in domains if td in bundles)
        self._set(X509Context(tuple(svids), own))

    def _report(self, rejected: RejectedSvid, kept: X509Svid | None) -> None:
        """Log a rejected SVID once per message (re-evaluations on bundle changes stay quiet)."""
        key = f"{rejected.error}|{kept is not None}"
        if key in self._reported:
            return
        self._reported.add(key)
        if kept is not None:
            action = (
                f"kept the last good SVID (serial {kept.serial:x}, "
                f"expires {utc_text(svid_expiry(kept))})"
            )
        else:
            action = "dropped: no unexpired last good SVID"
        event(
            logger,
            logging.ERROR,
            "svid.rejected",
            pid=self.pid,
            spiffe_id=rejected.spiffe_id,
            hint=rejected.hint,
            reason=rejected.error,
            action=action,
        )

    def _set(self, ctx: X509Context) -> bool:
        """Publish ``ctx`` if it differs from the current state; True if it did."""
        old = self._ctx
        self._ready.set()
        if old is not None and same_x509(old, ctx):
            return False
        self._ctx = ctx
        self._expiry.arm(ctx.svids)
        event(
            logger,
            logging.INFO,
            "x509.updated",
            pid=self.pid,
            svids=",".join(str(s.spiffe_id) for s in ctx.svids) or "none",
            bundles=",".join(td.name for td in ctx.bundles) or "none",
        )
        self._listeners.notify()
        return True

    def _withdraw(self) -> bool:
        """Drop every SVID (the agent refused us); keep the bundles, and keep following them."""
        ctx = self._ctx
        if ctx is None or not ctx.svids:
            return False
        self._update = DelegatedX509Update((), frozenset(ctx.bundles))
        return self._set(X509Context((), ctx.bundles))

    def _on_expired(self, expired: list[X509Svid]) -> None:
        ctx = self._ctx
        if ctx is None:
            return
        now = utcnow()
        for svid in expired:
            event(
                logger,
                logging.ERROR,
                "svid.expired",
                pid=self.pid,
                spiffe_id=svid.spiffe_id,
                hint=svid.hint,
                not_after=utc_text(svid_expiry(svid)),
                action="dropped: the agent sent no replacement in time",
            )
        self._set(X509Context(tuple(s for s in ctx.svids if svid_expiry(s) > now), ctx.bundles))
