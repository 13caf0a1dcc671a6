"""SPIRE's Delegated Identity API, served by the embedded provider on its admin socket.

A trusted node component (the bridge in per-caller mode) names a workload by
its pid and receives that workload's SVIDs, attested with the provider's own
``workload_identity`` rules, so the bridge has one code path for SPIRE and for
this provider. The behaviour follows SPIRE v1.13.3
(``pkg/agent/api/delegatedidentity/v1/service.go``) wherever it is observable:

* **Caller authorization**, on every call and again before every update of a
  stream: the caller is attested by SO_PEERCRED with the provider's rules; a
  caller that gets no identity is PERMISSION_DENIED "no identity issued", one
  none of whose identities' SPIFFE IDs is in ``authorized_delegates`` is
  PERMISSION_DENIED "caller not configured as an authorized delegate". A peer
  without credentials (never on a Unix socket) is INTERNAL "workload
  attestation failed"; one whose process has exited since it connected (its
  socket handed to another process) is UNAUTHENTICATED "could not verify
  existence of the original caller: ..." (SPIRE's ``PeerTrackerAttestor``),
  checked when the call starts. No security header is required (SPIRE asks
  for it only on the Workload API).
* **Naming the workload**: exactly one of ``selectors`` and a non-zero ``pid``,
  else INVALID_ARGUMENT "must provide either selectors or non-zero PID, but not
  both". Selectors are **refused** (INVALID_ARGUMENT, :data:`MSG_SELECTORS`):
  SPIRE trusts delegate-supplied selectors, but this provider's rules test a
  process's uid, gid *and* pid, and a partial selector set (``unix:uid:N``
  with no gid or pid) cannot decide ``not_eq``/``not_in`` conditions without
  guessing, so only a pid, attested here, names a workload.
* **Attesting a pid**: the process is held by a pidfd
  (:class:`sds._util.process.Process`) and its effective uid/gid are read
  from ``/proc`` and checked against the pidfd; the identities are chosen with
  the same rule as the Workload API (:meth:`WorkloadApiService.choose`). A pid
  whose process is gone is what SPIRE makes of a failed attestation: its
  workload attestor logs the plugin error and returns no selectors, so the
  X.509 stream answers with an empty SVID list and FetchJWTSVIDs is
  PERMISSION_DENIED "no identity issued". A workload with no matching
  identity likewise gets responses with an empty SVID list, not an error.
* **The X.509 stream of a pid ends (status OK) when that process exits**
  (the pidfd becomes readable), because the pid may be reused; for a pid
  already gone, after its one empty response. SPIRE leaves this to the
  delegate; doing it here too means no stream outlives its workload.
* SVIDs are minted and renewed at half their lifetime exactly as
  ``FetchX509SVID`` does (:meth:`WorkloadApiService.renew`), per stream;
  ``federates_with`` lists the trust domain IDs ("spiffe://td") of the
  federated X.509 bundles an identity gets (every one, here; none when no
  SVID is issued). Bundle maps are keyed by trust domain ID: concatenated DER
  certificates for X.509, JWKS documents for JWT.

Order of checks per method, as SPIRE: X.509 SVIDs and bundles authorize the
caller first; FetchJWTSVIDs checks the audience ("audience must be
specified") before authorizing. Requests are read as the Workload API reads
them (:func:`sds.provider.service.read_request`: at most MAX_REQUEST_BYTES,
within REQUEST_TIMEOUT) and audiences are capped the same way; connections are
served by :class:`sds._util.grpcedge.GuardedServer` with the provider's
handshake and idle timeouts. gRPC status codes for this API are chosen here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from cryptography.hazmat.primitives.serialization import Encoding
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from sds._proto import delegatedidentity_pb2 as dpb
from sds._proto.delegatedidentity_grpc import DelegatedIdentityBase
from sds._util.grpcedge import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IDLE_TIMEOUT
from sds._util.log import event
from sds._util.peercred import PeerCredentials, peer_credentials
from sds._util.process import Process, peer_process
from sds.errors import ProcessExited
from sds.provider.identities import Identity, entitled
from sds.provider.service import (
    CallTracker,
    Endpoint,
    MintedSvid,
    WorkloadApiService,
    jwt_times,
    read_request,
    requested_audience,
    wait_for_any,
)
from sds.spiffe.id import SpiffeId
from sds.spiffe.x509 import utcnow

__all__ = [
    "MSG_ATTESTATION_FAILED",
    "MSG_CALLER_GONE",
    "MSG_EITHER",
    "MSG_NOT_DELEGATE",
    "MSG_NO_IDENTITY",
    "MSG_SELECTORS",
    "AdminApi",
    "DelegatedIdentityService",
]

logger = logging.getLogger("sds.provider")

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

_CLOSE_TIMEOUT = 5.0

# SPIRE's messages, word for word.
MSG_NO_IDENTITY = "no identity issued"
MSG_NOT_DELEGATE = "caller not configured as an authorized delegate"
MSG_ATTESTATION_FAILED = "workload attestation failed"
MSG_CALLER_GONE = "could not verify existence of the original caller"
MSG_EITHER = "must provide either selectors or non-zero PID, but not both"
# Ours: SPIRE would accept the selectors.
MSG_SELECTORS = (
    "selectors are not supported by this provider: its rules match a process's uid, gid "
    "and pid, which only an attested pid supplies; give pid instead"
)


@contextlib.contextmanager
def _exit_watch(proc: Process) -> Iterator[asyncio.Event]:
    """An event set once ``proc`` exits (its pidfd turns readable); stops watching on exit."""
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    fd = proc.fileno()

    def on_exit() -> None:
        loop.remove_reader(fd)  # level-triggered: once is enough
        exited.set()

    loop.add_reader(fd, on_exit)
    try:
        yield exited
    finally:
        loop.remove_reader(fd)


class DelegatedIdentityService(DelegatedIdentityBase):
    """The four Delegated Identity methods over a Workload API service's CA and configuration.

    Configuration (identities, federation) is the Workload API service's own, so a
    reload there applies here at once; ``delegates`` are the SPIFFE IDs whose
    holders may call (``authorized_delegates``).
    """

    def __init__(self, workload: WorkloadApiService, delegates: Iterable[SpiffeId]) -> None:
        self._workload = workload
        self.delegates = frozenset(delegates)
        self._calls = CallTracker(workload.wake)

    async def shutdown(self, grace: float = _CLOSE_TIMEOUT) -> None:
        """End every call with UNAVAILABLE and wait for them; new calls get UNAVAILABLE."""
        await self._calls.shutdown(grace)

    def close_connections(self) -> None:
        """Close every connection that made a call."""
        self._calls.close_connections()

    # -- the caller (the delegate) ---------------------------------------------------------

    def _admit(self, stream: Stream[Any, Any], method: str) -> PeerCredentials | None:
        """Track the call; the caller's SO_PEERCRED credentials, its process checked alive."""
        self._calls.enter(stream)
        creds = peer_credentials(stream)
        if creds is not None:
            try:
                peer_process(stream, creds).close()
            except ProcessExited as exc:
                self._deny(creds, method, "the connecting process has exited")
                raise GRPCError(Status.UNAUTHENTICATED, f"{MSG_CALLER_GONE}: {exc}") from exc
        return creds

    def _authorize(self, creds: PeerCredentials | None, method: str) -> None:
        """Raise unless the caller holds an identity listed as an authorized delegate now."""
        self._calls.check_open()
        if creds is None:
            self._deny(None, method, "not a Unix socket peer")
            raise GRPCError(Status.INTERNAL, MSG_ATTESTATION_FAILED)
        identities = entitled(self._workload.identities, creds, utcnow())
        if not identities:
            self._deny(creds, method, "matches no workload_identity rule")
            raise GRPCError(Status.PERMISSION_DENIED, MSG_NO_IDENTITY)
        if not any(identity.spiffe_id in self.delegates for identity in identities):
            self._deny(creds, method, f"{identities[0].spiffe_id} is not an authorized delegate")
            raise GRPCError(Status.PERMISSION_DENIED, MSG_NOT_DELEGATE)

    @staticmethod
    def _deny(creds: PeerCredentials | None, method: str, reason: str) -> None:
        fields: dict[str, Any] = (
            {} if creds is None else {"pid": creds.pid, "uid": creds.uid, "gid": creds.gid}
        )
        event(logger, logging.INFO, "delegate.denied", method=method, **fields, reason=reason)

    # -- the workload it names -------------------------------------------------------------

    @staticmethod
    def _workload_process(pid: int, selectors: Sequence[Any], method: str) -> Process | None:
        """The process ``pid`` names, held by a pidfd; None when attestation fails (it is gone)."""
        if bool(selectors) == bool(pid):
            raise GRPCError(Status.INVALID_ARGUMENT, MSG_EITHER)
        if selectors:
            raise GRPCError(Status.INVALID_ARGUMENT, MSG_SELECTORS)
        try:
            return Process.of_pid(pid)
        except (ProcessExited, OSError) as exc:
            event(
                logger,
                logging.INFO,
                "delegate.attestation_failed",
                method=method,
                pid=pid,
                error=str(exc),
            )
            return None

    @staticmethod
    def _credentials(proc: Process, method: str) -> PeerCredentials | None:
        """The workload's uid/gid now, or None once it has exited (or cannot be read)."""
        try:
            return proc.credentials()
        except (ProcessExited, OSError) as exc:
            event(
                logger,
                logging.INFO,
                "delegate.attestation_failed",
                method=method,
                pid=proc.pid,
                error=str(exc),
            )
            return None

    # -- X.509 -----------------------------------------------------------------------------

    async def SubscribeToX509SVIDs(
        self, stream: Stream[dpb.SubscribeToX509SVIDsRequest, dpb.SubscribeToX509SVIDsResponse]
    ) -> None:
        """Stream the X.509-SVIDs of the workload ``pid`` names, until it exits."""
        method = "SubscribeToX509SVIDs"
        creds = self._admit(stream, method)
        self._authorize(creds, method)
        request = await read_request(stream)
        proc = self._workload_process(request.pid, request.selectors, method)
        if proc is None:
            await stream.send_message(dpb.SubscribeToX509SVIDsResponse())
            return
        with proc, _exit_watch(proc) as exited:
            await self._stream_x509(stream, creds, proc, exited, method)
        event(logger, logging.INFO, "delegate.workload_exited", method=method, pid=proc.pid)

    async def _stream_x509(
        self,
        stream: Stream[dpb.SubscribeToX509SVIDsRequest, dpb.SubscribeToX509SVIDsResponse],
        creds: PeerCredentials | None,
        proc: Process,
        exited: asyncio.Event,
        method: str,
    ) -> None:
        workload = self._workload
        minted: dict[str, MintedSvid] = {}
        last: tuple[Any, ...] | None = None
        while not exited.is_set():
            changed = workload.changed
            now = utcnow()
            self._authorize(creds, method)
            target = self._credentials(proc, method)
            if target is not None:
                minted = workload.renew(minted, workload.choose(target, now), target, now)
            if target is None or proc.exited():
                # Gone: nothing minted for it is sent (its pid may be another's). Gone
                # before the first answer is a failed attestation, as for a dead pid.
                if last is None:
                    await stream.send_message(dpb.SubscribeToX509SVIDsResponse())
                return
            federates_with = sorted(workload.federated_x509()) if minted else []
            fingerprint = (tuple((n, m.svid.serial) for n, m in minted.items()), federates_with)
            if fingerprint != last:
                await stream.send_message(
                    dpb.SubscribeToX509SVIDsResponse(
                        x509_svids=[
                            dpb.X509SVIDWithKey(
                                x509_svid=dpb.X509SVID(
                                    cert_chain=[
                                        cert.public_bytes(Encoding.DER) for cert in m.svid.chain
                                    ],
                                    id=_id(m.svid.spiffe_id),
                                    expires_at=int(m.svid.not_after.timestamp()),
                                    hint=m.svid.hint,
                                ),
                                x509_svid_key=m.svid.key_der(),
                            )
                            for m in minted.values()
                        ],
                        federates_with=federates_with,
                    )
                )
                last = fingerprint
            await wait_for_any(workload.wake_time(minted, now), changed, exited)

    async def SubscribeToX509Bundles(
        self,
        stream: Stream[dpb.SubscribeToX509BundlesRequest, dpb.SubscribeToX509BundlesResponse],
    ) -> None:
        """Stream the own and federated X.509 bundles (concatenated DER): at once and on change."""
        await self._stream_bundles(
            stream,
            "SubscribeToX509Bundles",
            self._workload.x509_bundle_map,
            lambda bundles: dpb.SubscribeToX509BundlesResponse(ca_certificates=bundles),
        )

    # -- JWT -------------------------------------------------------------------------------

    async def FetchJWTSVIDs(
        self, stream: Stream[dpb.FetchJWTSVIDsRequest, dpb.FetchJWTSVIDsResponse]
    ) -> None:
        """JWT-SVIDs of the workload ``pid`` names for the audience; PERMISSION_DENIED if none."""
        method = "FetchJWTSVIDs"
        creds = self._admit(stream, method)
        request = await read_request(stream)
        audience = requested_audience(request.audience)
        self._authorize(creds, method)
        proc = self._workload_process(request.pid, request.selectors, method)
        svids: list[dpb.JWTSVID] = []
        if proc is not None:
            with proc:
                target = self._credentials(proc, method)
                now = utcnow()
                identities: tuple[Identity, ...] = (
                    () if target is None else self._workload.choose(target, now)
                )
                for identity in identities:
                    assert target is not None
                    token = self._workload.issue_jwt(identity, audience, target, now)
                    issued, expires = jwt_times(token)
                    svids.append(
                        dpb.JWTSVID(
                            token=token,
                            id=_id(identity.spiffe_id),
                            expires_at=int(expires.timestamp()),
                            issued_at=int(issued.timestamp()),
                            hint=identity.hint,
                        )
                    )
                if proc.exited():  # issued to a process that is gone: its pid may be another's
                    svids = []
        if not svids:
            self._deny(creds, method, f"workload pid={request.pid} gets no identity")
            raise GRPCError(Status.PERMISSION_DENIED, MSG_NO_IDENTITY)
        await stream.send_message(dpb.FetchJWTSVIDsResponse(svids=svids))

    async def SubscribeToJWTBundles(
        self, stream: Stream[dpb.SubscribeToJWTBundlesRequest, dpb.SubscribeToJWTBundlesResponse]
    ) -> None:
        """Stream the own and federated JWT bundles (JWKS): at once and on change."""
        await self._stream_bundles(
            stream,
            "SubscribeToJWTBundles",
            self._workload.jwt_bundle_map,
            lambda bundles: dpb.SubscribeToJWTBundlesResponse(bundles=bundles),
        )

    async def _stream_bundles(
        self,
        stream: Stream[_Req, _Resp],
        method: str,
        current: Callable[[], dict[str, bytes]],
        response: Callable[[dict[str, bytes]], _Resp],
    ) -> None:
        """Send ``response(current())`` at once, then on every change, re-authorizing each time."""
        creds = self._admit(stream, method)
        self._authorize(creds, method)
        await read_request(stream)
        last: dict[str, bytes] | None = None
        while True:
            changed = self._workload.changed
            self._authorize(creds, method)
            bundles = current()
            if bundles != last:
                await stream.send_message(response(bundles))
                last = bundles
            await wait_for_any(self._workload.next_expiry(utcnow()), changed)


def _id(spiffe_id: SpiffeId) -> dpb.SPIFFEID:
    return dpb.SPIFFEID(trust_domain=spiffe_id.trust_domain.name, path=spiffe_id.path)


class AdminApi(Endpoint):
    """The provider's admin endpoint: the Delegated Identity API on its own Unix socket.

    ``start(listener)`` serves on a bound, listening socket; ``close()`` ends
    every stream with UNAVAILABLE, closes the connections and removes the
    socket file if it is still the one that was bound.
    """

    unknown_type = dpb.SubscribeToX509SVIDsRequest
    connection_event = "delegate.connection_closed"
    what = "admin API"

    def __init__(
        self,
        workload: WorkloadApiService,
        delegates: Iterable[SpiffeId],
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.service = DelegatedIdentityService(workload, delegates)
        super().__init__(
            self.service, handshake_timeout=handshake_timeout, idle_timeout=idle_timeout
        )
