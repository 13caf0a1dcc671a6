"""Per-caller mode: each SDS caller is attested by its kernel pid and served only its own SVIDs.

With ``per_caller`` configured, the bridge holds no identity of its own. Every
SDS stream is attested when it opens (:meth:`Callers.acquire`, called by the
SDS servicer through its :class:`~sds.xds.service.Tenancy` seam):

1. the caller's process is taken from the kernel as a pidfd
   (:func:`sds._util.process.peer_process`: ``SO_PEERPIDFD``), so the pid
   handed on cannot silently name a later process;
2. one :class:`Workload` per process (keyed by pid and start time) holds a
   subscription on the caller's behalf to every configured Delegated Identity
   API (SPIRE agent's admin socket: ``SubscribeToX509SVIDs`` with the pid), a
   :class:`~sds.bridge.state.Bridge` that turns what that caller is entitled
   to into secrets (``default``, SPIFFE-ID names, ``ROOTCA``/``ALL``, the
   policies that apply to its SPIFFE ID) and its own cache, and JWT-SVIDs
   fetched by pid;
3. streams of the same process share the workload; the last one to close
   ends it, and so does the process's exit, seen on the pidfd at once (SPIRE
   documents that a delegate must end a pid's subscription when the pid may
   be reused): its cache is closed, so any stream still open on it (a socket
   inherited by a child) ends with UNAVAILABLE.

A caller thus never receives another workload's SVID, whatever names it asks
for: a name not in its own cache is simply not served. Nor the bridge's own:
the bridge subscribes for its own pid too, and any SVID with one of the
bridge's SPIFFE IDs (the delegate identity) is removed from every caller's
view, so a process attested like the bridge gets nothing for it; callers are
served only once the bridge's own identities are known. The X.509 and JWT
bundles come from one shared watch per Delegated Identity API (the agent
sends every bundle to the delegate); each workload's context carries only the
bundles of its own trust domain and those it federates with.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, cast

from sds._util.log import event
from sds._util.peercred import PeerCredentials
from sds._util.process import Process, peer_process
from sds.bridge.config import BridgeConfig
from sds.bridge.jwtsvids import JwtSvidManager, JwtToken, wanted_audiences
from sds.bridge.state import Bridge
from sds.errors import NotEntitled, TooManyCallers, WorkloadApiDenied
from sds.spiffe.x509 import X509Context
from sds.workloadapi.address import Address
from sds.workloadapi.delegated import DelegatedBundles, DelegatedIdentityClient, DelegatedWatcher
from sds.xds.cache import SecretCache
from sds.xds.service import Lease, StreamInfo, Tenancy

__all__ = ["Callers", "Workload"]

log = logging.getLogger("sds.callers")

Spawn = Callable[[str, Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class _WithoutDelegate:
    """A caller's upstream view with the bridge's own identities taken out."""

    def __init__(self, source: DelegatedWatcher, own: Callable[[], frozenset[str]]) -> None:
        self.source = source
        self._own = own
        self._withheld: frozenset[str] = frozenset()

    @property
    def address(self) -> object:
        return self.source.address

    @property
    def connected(self) -> bool:
        return self.source.connected

    def subscribe(self, callback: Callable[[], None]) -> None:
        self.source.subscribe(callback)

    def current(self) -> X509Context | None:
        ctx = self.source.current()
        own = self._own()
        if ctx is None or not own:
            return ctx
        kept = tuple(s for s in ctx.svids if str(s.spiffe_id) not in own)
        withheld = frozenset(str(s.spiffe_id) for s in ctx.svids) & own
        if withheld != self._withheld:
            self._withheld = withheld
            if withheld:
                event(
                    log,
                    logging.WARNING,
                    "caller.withheld",
                    pid=self.source.pid,
                    spiffe_ids=",".join(sorted(withheld)),
                    reason="the bridge's own identity (the delegate's) is never served to callers",
                )
        return ctx if len(kept) == len(ctx.svids) else X509Context(kept, ctx.bundles)


class Workload:
    """One attested caller process: its subscriptions, its secrets, its open streams."""

    def __init__(
        self,
        process: Process,
        creds: PeerCredentials,
        callers: Callers,
    ) -> None:
        self.process = process
        self.creds = creds
        self.streams = 0
        config = callers.config
        self.watchers = [
            DelegatedWatcher(
                address,
                process.pid,
                bundles,
                backoff_initial=config.upstream_backoff.initial,
                backoff_max=config.upstream_backoff.max,
            )
            for address, bundles in zip(callers.addresses, callers.bundles, strict=True)
        ]
        self.sources = [_WithoutDelegate(w, callers.own_ids) for w in self.watchers]
        self.bridge = Bridge(
            config, self.sources, cache=SecretCache(callers.instance_id), caller=process.pid
        )
        self._callers = callers
        self.bridge.jwt = JwtSvidManager(
            self._fetch_jwt,
            self.bridge.refresh,
            spiffe_id=self.bridge.default_spiffe_id,
            wanted=self.wanted_audiences,
            retry_initial=config.upstream_backoff.initial,
            retry_max=config.upstream_backoff.max,
            max_audiences=config.jwt_svids.max_audiences,
            idle_timeout=config.jwt_svids.idle_timeout,
            spawn=callers.spawn,
        )
        self.tasks = [
            callers.spawn(f"caller-{process.pid}-{i}", watcher.run())
            for i, watcher in enumerate(self.watchers)
        ]

    @property
    def cache(self) -> SecretCache:
        return self.bridge.cache

    def label(self) -> str:
        """Who this caller is attested as: its SPIFFE IDs, or why it has none yet."""
        svids = self.bridge.context.svids
        if svids:
            return ",".join(str(s.spiffe_id) for s in svids)
        return f"pid {self.process.pid}: no SVID yet"

    def wanted_audiences(self) -> set[str]:
        """The JWT-SVID audiences this caller's open streams name."""
        key = self.process.key
        return wanted_audiences(i.names for i in self._callers.streams() if i.tenant == key)

    async def _fetch_jwt(self, audience: str, spiffe_id: str | None) -> JwtToken:
        """A JWT-SVID for this caller, by pid, from the API whose X.509-SVID is served."""
        callers = self._callers
        index = self.bridge.serving_source(spiffe_id)
        if self.process.exited():
            raise WorkloadApiDenied(f"process {self.process.pid} has exited")
        svids = await callers.clients[index].fetch_jwt_svids(self.process.pid, [audience])
        if self.process.exited():  # the pid may name another process now: discard
            raise WorkloadApiDenied(f"process {self.process.pid} has exited")
        chosen = next((s for s in svids if str(s.spiffe_id) == spiffe_id), None)
        if chosen is None and svids and spiffe_id is None:
            chosen = svids[0]
        if chosen is None:
            raise WorkloadApiDenied(f"no JWT-SVID issued for audience {audience!r}")
        return JwtToken(chosen.token, str(chosen.spiffe_id), chosen.expiry.timestamp())

    def close(self, reason: str) -> None:
        """End everything done for this caller: subscriptions, JWT refreshes, its cache."""
        for task in self.tasks:
            task.cancel()
        if self.bridge.jwt is not None:
            self.bridge.jwt.abort()
        self.bridge.stop()
        self.cache.close(reason)
        self.process.close()


class Callers(Tenancy):
    """The SDS servicer's :class:`~sds.xds.service.Tenancy` in per-caller mode."""

    def __init__(
        self,
        config: BridgeConfig,
        addresses: Sequence[Address],
        spawn: Spawn,
        *,
        instance_id: str,
        on_change: Callable[[], None] = lambda: None,
        own_pid: int | None = None,
    ) -> None:
        self.config = config
        self.addresses = list(addresses)
        self.spawn = spawn
        self.instance_id = instance_id
        self.on_change = on_change
        backoff = config.upstream_backoff
        self.bundles = [
            DelegatedBundles(address, backoff_initial=backoff.initial, backoff_max=backoff.max)
            for address in self.addresses
        ]
        self.clients = [DelegatedIdentityClient(address) for address in self.addresses]
        # The bridge's own identities (the delegate's), learned the same way, never served.
        self.own = [
            DelegatedWatcher(
                address,
                own_pid or os.getpid(),
                bundles,
                backoff_initial=backoff.initial,
                backoff_max=backoff.max,
            )
            for address, bundles in zip(self.addresses, self.bundles, strict=True)
        ]
        self.workloads: dict[tuple[int, int], Workload] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: The open SDS streams (set by the app to the servicer's), for JWT-SVID demand.
        self.streams: Callable[[], Iterable[StreamInfo]] = tuple

    # -- life -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the shared bundle watches (one per Delegated Identity API)."""
        for bundles in self.bundles:
            bundles.subscribe(self.on_change)
        for own in self.own:
            own.subscribe(self._own_changed)
        self._tasks = [
            self.spawn(f"delegated-bundles-{i}", b.run()) for i, b in enumerate(self.bundles)
        ] + [self.spawn(f"delegated-own-{i}", w.run()) for i, w in enumerate(self.own)]

    def own_ids(self) -> frozenset[str]:
        """The bridge's own SPIFFE IDs (as its Delegated Identity APIs attest it)."""
        return frozenset(
            str(s.spiffe_id) for w in self.own if (ctx := w.current()) for s in ctx.svids
        )

    def _own_changed(self) -> None:
        for workload in self.workloads.values():
            workload.bridge.refresh()
        self.on_change()

    def close(self) -> None:
        """End every workload and the shared watches (the bridge is stopping)."""
        for key in list(self.workloads):
            self._end(key, "the bridge is stopping")
        for task in self._tasks:
            task.cancel()
        for client in self.clients:
            client.close()

    def reconfigure(self, config: BridgeConfig) -> None:
        """Apply a reloaded config (names, policies) to every attested caller."""
        self.config = config
        for workload in self.workloads.values():
            workload.bridge.reconfigure(config)

    # -- readiness ------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """Callers can be attested (the SDS socket may be bound)."""
        return self.ready

    @property
    def ready(self) -> bool:
        """Every Delegated Identity API has accepted the bridge as a delegate (bundles came)
        and told it its own identities (never served to callers)."""
        return all(b.current() is not None for b in self.bundles) and all(
            w.current() is not None for w in self.own
        )

    def readiness_reason(self) -> str:
        """Why the bridge cannot attest callers yet ('' when ready)."""
        reasons = []
        for address, bundles, own in zip(self.addresses, self.bundles, self.own, strict=True):
            if bundles.current() is None:
                error = bundles.last_error
                why = str(error) if error is not None else "no bundles yet"
                reasons.append(f"Delegated Identity API {address}: {why}")
            elif own.current() is None:
                error = own.last_error
                why = str(error) if error is not None else "not yet"
                reasons.append(
                    f"Delegated Identity API {address}: the bridge's own identity unknown: {why}"
                )
        return "; ".join(reasons)

    def upstreams_view(self) -> list[dict[str, object]]:
        """Per Delegated Identity API: connected, the last error, callers attested through it."""
        return [
            {
                "upstream": str(address),
                "kind": "delegated_identity_api",
                "connected": bundles.connected,
                "bundles": bundles.current() is not None,
                "error": str(bundles.last_error) if bundles.last_error is not None else None,
                "callers": len(self.workloads),
            }
            for address, bundles in zip(self.addresses, self.bundles, strict=True)
        ]

    def upstreams_text(self) -> str:
        """One line per Delegated Identity API and the count of attested callers, for /readyz."""
        lines = []
        for address, bundles in zip(self.addresses, self.bundles, strict=True):
            state = "connected" if bundles.connected else "disconnected"
            lines.append(f"delegated identity api {address}: {state}\n")
        lines.append(f"callers attested: {len(self.workloads)}\n")
        return "".join(lines)

    # -- the Tenancy seam -------------------------------------------------------------------

    def acquire(self, stream: Any, creds: PeerCredentials | None) -> Lease:
        """Attest the caller by its pidfd and lease its workload's cache (shared per process)."""
        if creds is None:
            raise NotEntitled(
                "per-caller mode serves only local callers on the Unix socket "
                "(a TCP peer cannot be attested)"
            )
        process = peer_process(stream, creds)
        workload = self.workloads.get(process.key)
        fresh = workload is None
        if workload is None:
            assert self.config.per_caller is not None
            limit = self.config.per_caller.max_callers
            if len(self.workloads) >= limit:
                process.close()
                raise TooManyCallers(
                    f"{len(self.workloads)} caller processes are attested already "
                    f"(per_caller.max_callers: {limit}); pid {creds.pid} refused"
                )
            workload = self._begin(process, creds)
        else:
            process.close()  # the workload holds its own pidfd for this process
        workload.streams += 1
        return Lease(
            workload.cache,
            workload.label,
            fresh=fresh,
            on_missing=workload.bridge.demand,
            key=workload.process.key,
        )

    def release(self, lease: Lease) -> None:
        """A stream closed: the workload ends with its last stream."""
        workload = self.workloads.get(cast("tuple[int, int]", lease.key))
        if workload is None or workload.cache is not lease.cache:
            return  # already ended (its process exited)
        workload.streams -= 1
        if workload.streams <= 0:
            self._end(workload.process.key, "its last SDS stream closed")

    # -- workloads --------------------------------------------------------------------------

    def _begin(self, process: Process, creds: PeerCredentials) -> Workload:
        workload = Workload(process, creds, self)
        self.workloads[process.key] = workload
        loop = asyncio.get_running_loop()
        loop.add_reader(process.fileno(), self._exited, process.key)
        event(
            log,
            logging.INFO,
            "caller.attesting",
            pid=process.pid,
            uid=creds.uid,
            gid=creds.gid,
            upstreams=",".join(str(a) for a in self.addresses),
        )
        return workload

    def _exited(self, key: tuple[int, int]) -> None:
        self._end(key, f"the attested process (pid {key[0]}) exited")

    def _end(self, key: tuple[int, int], why: str) -> None:
        workload = self.workloads.pop(key, None)
        if workload is None:
            return
        asyncio.get_running_loop().remove_reader(workload.process.fileno())
        label = workload.label()
        workload.close(why)
        event(log, logging.INFO, "caller.ended", pid=key[0], workload=label, reason=why)

    def states(self) -> list[tuple[str, int, list[tuple[str, float]]]]:
        """Per attested process: its label (SPIFFE IDs), open SDS streams, and each served
        SVID's (SPIFFE ID, not_after timestamp), for the metrics."""
        return [
            (
                w.label(),
                w.streams,
                [(str(s.spiffe_id), s.not_after.timestamp()) for s in w.bridge.context.svids],
            )
            for w in self.workloads.values()
        ]

    def view(self) -> list[dict[str, Any]]:
        """Per attested process: pid, uid, gid, SPIFFE IDs, open streams, readiness."""
        out = []
        for workload in self.workloads.values():
            bridge = workload.bridge
            out.append(
                {
                    "pid": workload.process.pid,
                    "uid": workload.creds.uid,
                    "gid": workload.creds.gid,
                    "spiffe_ids": [str(s.spiffe_id) for s in bridge.context.svids],
                    "streams": workload.streams,
                    "secrets": bridge.cache.names(),
                    "ready": bridge.ready,
                    "reason": bridge.readiness_reason(),
                }
            )
        return out
