"""The bridge core: merge upstream X.509 state, build named secrets, publish them to the cache.

One upstream watch per Workload API address feeds one in-memory state; every
change is turned into secret specs once and published to the
:class:`SecretCache`, which notifies only the streams that need it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from .._log import event
from .._spiffe import TrustDomain
from .._x509 import BundleSet, X509Bundle, X509Context, X509Svid
from .cache import SecretCache
from .config import BridgeConfig
from .jwt import JWT_PREFIX, JwtSvidManager, audience_of
from .metrics import Metrics
from .resources import GenericSpec, SecretSpec, TlsSpec, build_specs, own_trust_domain

__all__ = ["Bridge", "UpstreamSource", "merge_contexts"]

log = logging.getLogger("sds.bridge")


class UpstreamSource(Protocol):
    """An X.509 source that also says when it changed (a Workload API watcher, or test material)."""

    def current(self) -> X509Context | None: ...

    def subscribe(self, callback: Callable[[], None]) -> None: ...


def merge_contexts(contexts: Sequence[X509Context | None]) -> X509Context:
    """SVIDs in upstream order (the first upstream's first SVID is the default); bundles united,
    the first upstream winning for a trust domain that several provide."""
    svids: list[X509Svid] = []
    bundles: dict[TrustDomain, X509Bundle] = {}
    for ctx in contexts:
        if ctx is None:
            continue
        svids.extend(ctx.svids)
        for td, bundle in ctx.bundles.items():
            bundles.setdefault(td, bundle)
    return X509Context(tuple(svids), BundleSet(bundles.values()))


class Bridge:
    """Keeps the cache equal to what ``config`` says should be served from ``sources``."""

    def __init__(
        self,
        config: BridgeConfig,
        sources: Sequence[UpstreamSource],
        *,
        cache: SecretCache | None = None,
        metrics: Metrics | None = None,
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
        self.refresh()

    def refresh(self) -> None:
        """Recompute every secret from the sources' latest state and publish the changes."""
        ctx = merge_contexts([source.current() for source in self.sources])
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
