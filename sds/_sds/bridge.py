"""The bridge core: choose upstream X.509 state, build named secrets, publish them to the cache.

One upstream watch per Workload API address feeds one in-memory state; with
several addresses the :class:`~.upstreams.Selector` picks, per identity, the
upstream that serves it (redundancy with sticky failover, not a merge). Every
change is turned into secret specs once and published to the
:class:`SecretCache`, which notifies only the streams that need it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from .._log import event
from .._spiffe import TrustDomain
from .._x509 import BundleSet, X509Context
from .cache import SecretCache
from .config import BridgeConfig
from .jwt import JWT_PREFIX, JwtSvidManager, audience_of
from .metrics import Metrics
from .resources import GenericSpec, SecretSpec, TlsSpec, build_specs, own_trust_domain
from .upstreams import Selection, Selector, UpstreamState

__all__ = ["Bridge", "UpstreamSource"]

log = logging.getLogger("sds.bridge")


class UpstreamSource(Protocol):
    """An X.509 source that also says when it changed (a Workload API watcher, or test material)."""

    @property
    def address(self) -> object: ...

    @property
    def connected(self) -> bool: ...

    def current(self) -> X509Context | None: ...

    def subscribe(self, callback: Callable[[], None]) -> None: ...


class Bridge:
    """Keeps the cache equal to what ``config`` says should be served from ``sources``."""

    def __init__(
        self,
        config: BridgeConfig,
        sources: Sequence[UpstreamSource],
        *,
        cache: SecretCache | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.sources = list(sources)
        self.cache = cache or SecretCache()
        self.metrics = metrics
        self.context = X509Context((), BundleSet())
        self._was_ready = False
        self._own: TrustDomain | None = None
        self._listeners: list[Callable[[], None]] = []
        self.jwt: JwtSvidManager | None = None
        self._clock = clock
        self.selector = Selector(config.failover, clock)
        self.selection = Selection(self.context)
        self._recheck: asyncio.TimerHandle | None = None
        for source in self.sources:
            source.subscribe(self.refresh)

    def default_spiffe_id(self) -> str | None:
        """The SPIFFE ID of the SVID served as ``default`` (JWT-SVIDs are issued for it)."""
        spec = self.cache.spec(self.config.names.default_svid)
        return str(spec.svid.spiffe_id) if isinstance(spec, TlsSpec) else None

    def demand(self, names: Iterable[str]) -> None:
        """Called by the SDS server with names it cannot serve yet: start JWT-SVID fetches."""
        if self.jwt is None:
            return
        audiences = [aud for name in names if (aud := audience_of(name)) is not None]
        if audiences:
            self.jwt.want(audiences)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every refresh that changed something."""
        self._listeners.append(callback)

    @property
    def ready(self) -> bool:
        """At least one valid SVID is being served."""
        return self.cache.ready()

    def reconfigure(self, config: BridgeConfig) -> None:
        """Apply a reloaded config (names, selectors, policies) and push what changed."""
        self.config = config
        self.selector.policy = config.failover
        self.refresh()

    def upstreams_view(self) -> list[dict[str, object]]:
        """Per upstream: connection, health, and which SPIFFE IDs it serves (``/upstreams``)."""
        now = self._clock()
        return [view.as_dict(now) for view in self.selection.upstreams]

    def upstreams_text(self) -> str:
        """One line per upstream for ``/readyz``."""
        lines = []
        now = self._clock()
        for view in self.selection.upstreams:
            since = view.disconnected_for(now)
            if since is None:
                state = "connected"
            else:
                state = f"disconnected for {since:.1f}s"
                state += " (in grace period)" if view.healthy else ""
            serving = ",".join(view.serving) or "nothing"
            lines.append(f"upstream {view.upstream}: {state}, serving {serving}\n")
        return "".join(lines)

    def _select(self) -> X509Context:
        """Run the upstream selection; log failovers and arm a timer for the next deadline."""
        selection = self.selector.select(
            [UpstreamState(str(s.address), s.current(), s.connected) for s in self.sources]
        )
        self.selection = selection
        for spiffe_id, old, new in selection.switched:
            event(log, logging.WARNING, "upstream.failover", spiffe_id=spiffe_id, old=old, new=new)
        if self.metrics is not None:
            self.metrics.upstreams_changed(selection.upstreams)
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if selection.recheck_at is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # driven synchronously (tests): the caller refreshes
                return selection.context
            delay = max(0.0, selection.recheck_at - self._clock()) + 0.01
            self._recheck = loop.call_later(delay, self.refresh)
        return selection.context

    def refresh(self) -> None:
        """Recompute every secret from the sources' latest state and publish the changes."""
        ctx = self._select()
        self._own = own_trust_domain(ctx, self.config, self._own)
        specs: dict[str, SecretSpec] = build_specs(ctx, self.config, self._own)
        if self.jwt is not None:
            for audience, token in self.jwt.tokens().items():
                specs[JWT_PREFIX + audience] = GenericSpec("Bearer " + token.token)
        before = {n: self.cache.spec(n) for n in self.cache.names()}
        changed = self.cache.update(specs)
        self.context = ctx
        if self.metrics is not None:
            self.metrics.state_changed(ctx, self.cache.ready(), time.time())
        if not changed:
            return
        for name in sorted(changed):
            spec = specs.get(name)
            if spec is None:
                event(log, logging.WARNING, "secret.withdrawn", name=name)
            elif isinstance(spec, GenericSpec):
                event(log, logging.INFO, "secret.generic_updated", name=name)
            elif isinstance(spec, TlsSpec):
                old = before.get(name)
                if isinstance(old, TlsSpec) and old.svid.serial == spec.svid.serial:
                    continue
                event(
                    log,
                    logging.INFO,
                    "secret.tls_updated",
                    name=name,
                    spiffe_id=str(spec.svid.spiffe_id),
                    serial=f"{spec.svid.serial:x}",
                    not_after=spec.svid.not_after.isoformat(),
                )
            else:
                event(
                    log,
                    logging.INFO,
                    "secret.validation_updated",
                    name=name,
                    trust_domains=",".join(b.trust_domain.name for b in spec.bundles),
                    allow=",".join(spec.exact + tuple(p + "*" for p in spec.prefixes)),
                )
        ready = self.cache.ready()
        if ready != self._was_ready:
            if ready:
                event(log, logging.INFO, "bridge.ready", secrets=len(specs))
            else:
                event(
                    log,
                    logging.ERROR,
                    "bridge.not_ready",
                    reason="no valid SVID to serve: every SVID expired or was withdrawn upstream",
                )
            self._was_ready = ready
        for callback in self._listeners:
            callback()
