"""The Watcher: the latest valid Workload API state, kept forever, for ``sds run``.

It follows the X.509-SVID and JWT bundle streams of one
:class:`~sds.workloadapi.client.WorkloadApiClient` (domain values only: the
client is the one reader of protobuf), reconnects with :class:`Backoff`, and
on a Unix socket reconnects at once when :class:`SocketWatch` sees the socket
come back. SPIFFE Workload API sections 4.2-4.4 and 5: every message is the
complete state; ``PERMISSION_DENIED`` withdraws the SVIDs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Protocol

from sds._util.log import event
from sds.errors import (
    InvalidBundle,
    InvalidSvid,
    WorkloadApiDenied,
    WorkloadApiError,
    WorkloadApiMisconfigured,
    WorkloadApiUnavailable,
)
from sds.spiffe.id import TrustDomain
from sds.spiffe.jwt import JwtBundle
from sds.spiffe.x509 import X509Bundle, X509Context, X509Svid, utc_text, utcnow
from sds.workloadapi.address import Address, as_address
from sds.workloadapi.backoff import Backoff
from sds.workloadapi.client import WorkloadApiClient, X509Update
from sds.workloadapi.socketwatch import SocketWatch, inode

__all__ = [
    "FIRST_MESSAGE_TIMEOUT",
    "SILENCE_FRACTION",
    "SILENCE_MAX",
    "SILENCE_MIN",
    "ExpiryTimer",
    "NullEvents",
    "SocketWake",
    "Watcher",
    "WatcherEvents",
    "first_state",
    "last_good",
    "retry_delay",
    "same_jwt",
    "same_x509",
    "svid_expiry",
]

logger = logging.getLogger("sds.workloadapi")

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


def svid_expiry(svid: X509Svid) -> dt.datetime:
    """When the SVID stops being usable: the earliest not-after in its chain."""
    return min(cert.not_valid_after_utc for cert in svid.chain)


def _fingerprint(svid: X509Svid) -> tuple[str, str, bytes, bytes]:
    return (str(svid.spiffe_id), svid.hint, svid.chain_der(), svid.key_der())


def same_x509(a: X509Context, b: X509Context) -> bool:
    """Whether two contexts hold the same bundles and the same SVIDs (keys included), in order."""
    return a.bundles == b.bundles and [_fingerprint(s) for s in a.svids] == [
        _fingerprint(s) for s in b.svids
    ]


def same_jwt(a: Mapping[TrustDomain, JwtBundle], b: Mapping[TrustDomain, JwtBundle]) -> bool:
    """Whether two JWT bundle maps hold the same keys for the same trust domains."""
    return {td: x.to_jwks() for td, x in a.items()} == {td: x.to_jwks() for td, x in b.items()}


def last_good(last: X509Svid | None, bundles: Mapping[TrustDomain, X509Bundle]) -> X509Svid | None:
    """``last`` if it is still unexpired and chains to its trust domain's bundle in ``bundles``,
    else None: what may stand in for a new SVID that failed validation."""
    if last is None:
        return None
    try:
        last.verify(bundles.get(last.spiffe_id.trust_domain))
    except InvalidSvid:
        return None
    return last


def retry_delay(exc: WorkloadApiError, backoff: Backoff) -> float:
    """Seconds to wait before retrying a stream that failed with ``exc``; counts the attempt.

    ``INVALID_ARGUMENT`` (WorkloadApiMisconfigured) waits the backoff's maximum:
    Workload Endpoint s.6 says not to retry it, but a sidecar must not give up
    for good, so it retries slowly. Anything else takes the next jittered delay.
    """
    if isinstance(exc, WorkloadApiMisconfigured):
        backoff.attempt += 1
        return backoff.maximum
    return backoff.next_delay()


async def first_state(
    ready: asyncio.Event,
    timeout: float,  # noqa: ASYNC109 - the watchers' wait_ready(timeout) passes it on
    where: str,
    last_error: Callable[[], WorkloadApiError | None],
    current: Callable[[], X509Context | None],
) -> X509Context:
    """Wait up to ``timeout`` seconds for ``ready`` (the first X.509 state) and return it.

    On timeout raises the class of ``last_error()`` with its reason, or
    WorkloadApiUnavailable naming ``where`` if no error was seen.
    """
    try:
        async with asyncio.timeout(timeout):
            await ready.wait()
    except TimeoutError:
        err = last_error()
        if err is None:
            raise WorkloadApiUnavailable(
                f"{where} sent no X.509-SVIDs within {timeout:g}s"
            ) from None
        raise type(err)(f"no X.509-SVIDs within {timeout:g}s: {err}") from err
    ctx = current()
    assert ctx is not None
    return ctx


class ExpiryTimer:
    """One loop timer (no polling) at the earliest expiry among the SVIDs it was armed with.

    When it fires it calls ``on_expired(expired)`` with the SVIDs whose chains
    have expired; woken a little early (the loop's monotonic clock against the
    wall clock) it tries again shortly. The callback re-arms it with what is
    left. :meth:`unexpired` hides SVIDs that expired before the timer ran.
    """

    def __init__(self, on_expired: Callable[[list[X509Svid]], None]) -> None:
        self._on_expired = on_expired
        self._svids: tuple[X509Svid, ...] = ()
        self._handle: asyncio.TimerHandle | None = None
        self.expires_at: dt.datetime | None = None

    def arm(self, svids: Iterable[X509Svid], minimum: float = 0.0) -> None:
        """Replace the timer by one at the earliest expiry in ``svids`` (none if empty)."""
        self.cancel()
        self._svids = tuple(svids)
        self.expires_at = min((svid_expiry(s) for s in self._svids), default=None)
        if self.expires_at is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(minimum, (self.expires_at - utcnow()).total_seconds())
        self._handle = loop.call_at(loop.time() + delay, self._fire)

    def cancel(self) -> None:
        """Stop the timer (``expires_at`` is kept, so :meth:`unexpired` still filters)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def unexpired(self, ctx: X509Context) -> X509Context:
        """``ctx`` without the SVIDs that have expired by now (``ctx`` itself if none has)."""
        if self.expires_at is not None:
            now = utcnow()
            if self.expires_at <= now:
                return X509Context(tuple(s for s in ctx.svids if svid_expiry(s) > now), ctx.bundles)
        return ctx

    def _fire(self) -> None:
        self._handle = None
        now = utcnow()
        expired = [s for s in self._svids if svid_expiry(s) <= now]
        if not expired:
            self.arm(self._svids, minimum=0.01)
            return
        self._on_expired(expired)


class SocketWake:
    """When to reconnect to a Unix socket early: the socket's directory is watched while
    disconnected, and a socket that appears (or is replaced) wakes the retry at once.

    After it appeared, :data:`FAST_RETRIES` connection failures are retried every
    :data:`FAST_RETRY_DELAY` seconds (a server binds before it serves). Disabled
    for TCP addresses or ``enabled=False``: :meth:`wait` then just sleeps.
    """

    def __init__(self, address: Address, *, enabled: bool = True) -> None:
        self._enabled = enabled and address.scheme == "unix"
        self._path = address.path
        self.watch: SocketWatch | None = None
        self._known: tuple[int, int, int] | None = None
        self.fast_retries = 0

    def up(self) -> None:
        """The stream is up: stop watching, remember which socket file it connected to."""
        self.fast_retries = 0
        self.stop()
        self._known = inode(self._path) if self._enabled else None

    def take_fast_retry(self) -> bool:
        """Whether this failure is retried after FAST_RETRY_DELAY (and count it)."""
        if self.fast_retries:
            self.fast_retries -= 1
            return True
        return False

    async def wait(self, delay: float) -> bool:
        """Sleep ``delay``; True if woken early because the socket file appeared."""
        if not self._enabled:
            await asyncio.sleep(delay)
            return False
        if self.watch is None:
            self.watch = SocketWatch(self._path, self._known)
        appeared = await self.watch.wait(delay)
        if appeared:
            self.fast_retries = FAST_RETRIES
        return appeared

    def stop(self) -> None:
        """Stop watching the directory (connected, or the owner is stopping)."""
        if self.watch is not None:
            self.watch.close()
            self.watch = None


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
        self.address = as_address(address)
        self._events: WatcherEvents = events if events is not None else NullEvents()
        Backoff(backoff_initial, backoff_max)  # validate the arguments early
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self.first_message_timeout = first_message_timeout
        self.silence_max = silence_max
        self._wake = SocketWake(self.address, enabled=watch_socket)
        self._reconnected = asyncio.Event()
        self._ctx: X509Context | None = None
        self._jwt: dict[TrustDomain, JwtBundle] = {}
        self._listeners: list[Callable[[], None]] = []
        self._ready = asyncio.Event()
        self._last_error: WorkloadApiError | None = None
        self._expiry = ExpiryTimer(self._on_expired)
        self._connected = False
        self._notified = 0  # notifications sent so far

    # -- public state ------------------------------------------------------

    def current(self) -> X509Context | None:
        """The latest validated X.509 state (never holding an expired SVID), or None before any."""
        ctx = self._ctx
        return None if ctx is None else self._expiry.unexpired(ctx)

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
        return await first_state(
            self._ready,
            timeout,
            f"workload API at {self.address}",
            lambda: self._last_error,
            self.current,
        )

    # -- running -----------------------------------------------------------

    async def run(self) -> None:
        """Follow the Workload API until cancelled (never returns otherwise)."""
        client = WorkloadApiClient(self.address)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._x509_loop(client))
                group.create_task(self._jwt_loop(client))
        finally:
            self._expiry.cancel()
            client.close()

    async def _x509_loop(self, client: WorkloadApiClient) -> None:
        backoff = Backoff(self._backoff_initial, self._backoff_max)
        try:
            while True:
                try:
                    await self._follow_x509(client, backoff)
                    continue  # the stream went silent: reconnect at once
                except WorkloadApiUnavailable as exc:
                    if self._wake.take_fast_retry():
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
        finally:
            self._wake.stop()

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
        async with contextlib.aclosing(client.x509_updates()) as responses:
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
        self._wake.up()
        self._reconnected.set()
        self._reconnected.clear()
        self._events.on_connected()
        event(logger, logging.INFO, "workload_api.connected", address=self.address)

    def _silence_limit(self) -> float:
        """How long the X.509 stream may stay silent: 3/4 of the earliest SVID's remaining life."""
        expires_at = self._expiry.expires_at
        if expires_at is None:
            return self.silence_max
        remaining = (expires_at - utcnow()).total_seconds()
        return min(max(remaining * SILENCE_FRACTION, SILENCE_MIN), self.silence_max)

    async def _retry_wait(self, delay: float) -> bool:
        """Sleep ``delay`` before reconnecting; on a Unix socket, wake early (True) when the
        socket file is created or replaced. The directory is watched only while disconnected."""
        appeared = await self._wake.wait(delay)
        if appeared:
            event(logger, logging.INFO, "workload_api.socket_appeared", address=self.address)
        return appeared

    def _x509_failed(self, exc: WorkloadApiError, backoff: Backoff) -> float:
        """Record a failed X.509 stream attempt; return the delay before the next one."""
        self._last_error = exc
        if self._connected:
            self._connected = False
            self._notify()
        self._events.on_disconnected(exc)
        delay = retry_delay(exc, backoff)
        if isinstance(exc, WorkloadApiMisconfigured):
            self._events.on_misconfigured(exc)
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
                retry_in=f"{delay:.3f}",
            )
            return delay
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
                async with contextlib.aclosing(client.jwt_bundle_updates()) as responses:
                    async for update in responses:
                        self._apply_jwt(update)
                        backoff.reset()
                raise WorkloadApiUnavailable(
                    f"workload API at {self.address} ended the JWT bundle stream"
                )
            except Exception as exc:  # noqa: BLE001 - policy: log, then retry like an outage
                if not isinstance(exc, WorkloadApiError):
                    exc = WorkloadApiError(f"workload API at {self.address}: {exc!r}")
                delay = retry_delay(exc, backoff)
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

    def _apply_x509(self, update: X509Update | InvalidBundle) -> bool:
        """Take one X.509-SVID message with per-SVID isolation; False if rejected whole."""
        if isinstance(update, InvalidBundle):
            event(
                logger,
                logging.ERROR,
                "x509.update_rejected",
                reason=update,
                action="kept the last good state",
            )
            return False
        previous: dict[tuple[str, str], X509Svid] = {}
        for svid in self._ctx.svids if self._ctx else ():
            previous.setdefault((str(svid.spiffe_id), svid.hint), svid)  # first wins (s.5.2.1)
        bundles = update.bundles
        svids: list[X509Svid] = []
        for item in update.svids:
            if isinstance(item, X509Svid):
                svids.append(item)
            else:
                self._events.on_svid_rejected(item.error)
                kept = last_good(previous.get((item.spiffe_id, item.hint)), bundles)
                if kept is not None:
                    svids.append(kept)
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
                    spiffe_id=item.spiffe_id,
                    hint=item.hint,
                    reason=item.error,
                    action=action,
                )
        self._set_x509(X509Context(tuple(svids), bundles))
        return True

    def _set_x509(self, ctx: X509Context) -> None:
        old = self._ctx
        self._ready.set()
        if old is not None and same_x509(old, ctx):
            return
        self._ctx = ctx
        self._expiry.arm(ctx.svids)
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

    def _apply_jwt(self, update: dict[TrustDomain, JwtBundle] | InvalidBundle) -> None:
        if isinstance(update, InvalidBundle):
            event(
                logger,
                logging.ERROR,
                "jwt_bundles.rejected",
                reason=update,
                action="kept the last good JWT bundles",
            )
            return
        bundles = update
        if same_jwt(self._jwt, bundles):
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

    def _on_expired(self, expired: list[X509Svid]) -> None:
        ctx = self._ctx
        if ctx is None:
            return
        now = utcnow()
        for svid in expired:
            self._events.on_svid_expired(svid)
            event(
                logger,
                logging.ERROR,
                "svid.expired",
                spiffe_id=svid.spiffe_id,
                hint=svid.hint,
                not_after=utc_text(svid_expiry(svid)),
                action="dropped: the workload API sent no replacement in time",
            )
        self._set_x509(
            X509Context(tuple(s for s in ctx.svids if svid_expiry(s) > now), ctx.bundles)
        )
