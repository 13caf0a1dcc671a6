"""The bridge core: choose upstream X.509 state, build named secrets, publish them to the cache.

One upstream watch per Workload API address feeds one in-memory state; with
several addresses the :class:`~.upstreams.Selector` picks, per identity, the
upstream that serves it (redundancy with sticky failover, not a merge). Every
change is turned into secret specs once and published to the
:class:`SecretCache`, which notifies only the streams that need it.

``default`` never changes identity on its own: once it serves a SPIFFE ID it
keeps that ID (rotations included). If that SVID expires locally (the upstream
that held it sent no replacement), ``default`` is withdrawn and readiness
fails with the reason; it moves to another ID only when a fresh upstream
message (or a reloaded ``default_svid``) makes that ID the default, logged as
``svid.default_changed``.

Readiness is true only when every configured name can be served now: the
default SVID, the own bundle, every ``secrets[]`` entry and every policy's
trust domains; :attr:`Bridge.unservable` says which name cannot and why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sds._util.log import event
from sds.bridge.config import BridgeConfig, SvidSelector
from sds.bridge.jwtsvids import JWT_PREFIX, JwtSvidManager, audience_of
from sds.bridge.names import build_specs, select_default
from sds.bridge.upstreams import Selection, Selector, UpstreamState
from sds.spiffe.id import TrustDomain
from sds.spiffe.x509 import BundleSet, X509Context, X509Svid, utcnow
from sds.xds.cache import SecretCache
from sds.xds.resources import GenericSpec, SecretSpec, TlsSpec

if TYPE_CHECKING:  # prometheus_client is loaded only when a listener serves /metrics
    from sds.bridge.metrics import Metrics

NO_CONTEXT = "no X.509 context from the Workload API yet"
_LISTED = 10  # SVIDs named in a "matches none of [...]" reason

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


def _describe(selector: SvidSelector) -> str:
    parts = []
    if selector.spiffe_id is not None:
        parts.append(f"spiffe_id {selector.spiffe_id!r}")
    if selector.hint is not None:
        parts.append(f"hint {selector.hint!r}")
    return " ".join(parts)


def _held(ctx: X509Context) -> str:
    shown = [f"{s.spiffe_id} (hint {s.hint!r})" for s in ctx.svids[:_LISTED]]
    if len(ctx.svids) > _LISTED:
        shown.append(f"... {len(ctx.svids) - _LISTED} more")
    return "[" + ", ".join(shown) + "]"


_Keys = dict[tuple[str, int], float]  # (SPIFFE ID, serial) -> not_after timestamp


def _keys(ctx: X509Context | None) -> _Keys:
    if ctx is None:
        return {}
    return {(str(s.spiffe_id), s.serial): s.not_after.timestamp() for s in ctx.svids}


def _epoch_now() -> float:
    """The selection's clock: :func:`utcnow` (looked up at call time) in epoch seconds."""
    return utcnow().timestamp()


class Bridge:
    """Keeps the cache equal to what ``config`` says should be served from ``sources``."""

    def __init__(
        self,
        config: BridgeConfig,
        sources: Sequence[UpstreamSource],
        *,
        cache: SecretCache | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] | None = None,
        caller: int | None = None,
    ) -> None:
        self.config = config
        # Per-caller mode: this is one caller's view; its log lines name the caller's pid and
        # its readiness is the caller's (caller.ready / caller.not_ready), not the bridge's.
        self._fields: dict[str, Any] = {} if caller is None else {"pid": caller}
        self._subject = "bridge" if caller is None else "caller"
        self.sources = list(sources)
        self.cache = cache or SecretCache()
        self.metrics = metrics
        self.context = X509Context((), BundleSet())
        self.unservable: dict[str, str] = {"*": NO_CONTEXT}
        self._reported: dict[str, str] | None = None
        self._own: TrustDomain | None = None
        self._default: X509Svid | None = None  # the SVID ``default`` stands for (may be expired)
        self._default_origin: int | None = None  # index of the source that supplied it
        self._default_withdrawn = False
        self._seen: list[_Keys] = [{} for _ in sources]
        self._rechoose = False
        self._listeners: list[Callable[[], None]] = []
        self.jwt: JwtSvidManager | None = None
        self._clock = clock or _epoch_now
        self.selector = Selector(config.failover, self._clock)
        names = [str(s.address) for s in self.sources]
        self._names = [  # a repeated address still names two upstreams apart
            n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)
        ]
        self.selection = Selection(self.context)
        self._recheck: asyncio.TimerHandle | None = None
        for source in self.sources:
            source.subscribe(self.refresh)

    def default_spiffe_id(self) -> str | None:
        """The SPIFFE ID ``default`` stands for (JWT-SVIDs are issued for it), also while its
        SVID is withdrawn: a JWT-SVID is never asked for on another identity's behalf."""
        if self._default is not None:
            return str(self._default.spiffe_id)
        spec = self.cache.spec(self.config.names.default_svid)
        return str(spec.svid.spiffe_id) if isinstance(spec, TlsSpec) else None

    def demand(self, names: Iterable[str]) -> None:
        """Called by the SDS server with names it cannot serve yet: start JWT-SVID fetches."""
        if self.jwt is None:
            return
        audiences = [aud for name in names if (aud := audience_of(name)) is not None]
        if audiences:
            self.jwt.want(audiences)

    def serving_source(self, spiffe_id: str | None) -> int:
        """Index in ``sources`` of the upstream serving ``spiffe_id``'s X.509-SVID (the first
        when none does): JWT-SVIDs are fetched from the same upstream."""
        name = self.selection.serving.get(spiffe_id or "")
        return self._names.index(name) if name in self._names else 0

    def stop(self) -> None:
        """Cancel the pending failover re-check (this bridge is being discarded)."""
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every refresh that changed something."""
        self._listeners.append(callback)

    @property
    def serving(self) -> bool:
        """At least one valid SVID is being served (the SDS socket may be bound)."""
        return self.cache.ready()

    @property
    def ready(self) -> bool:
        """Every configured name can be served now (see :attr:`unservable`)."""
        return not self.unservable

    def readiness_reason(self) -> str:
        """One line naming each unservable name and why ('' when ready)."""
        if "*" in self.unservable:
            return self.unservable["*"]
        return "; ".join(f"{name}: {why}" for name, why in self.unservable.items())

    def reconfigure(self, config: BridgeConfig) -> None:
        """Apply a reloaded config (names, selectors, policies) and push what changed."""
        self._rechoose = config.default_svid != self.config.default_svid
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

    def _select(self, contexts: Sequence[X509Context | None]) -> X509Context:
        """Run the upstream selection; log failovers and arm a timer for the next deadline."""
        selection = self.selector.select(
            [
                UpstreamState(name, ctx, s.connected)
                for name, s, ctx in zip(self._names, self.sources, contexts, strict=True)
            ]
        )
        self.selection = selection
        for spiffe_id, old, new in selection.switched:
            event(
                log,
                logging.WARNING,
                "upstream.failover",
                spiffe_id=spiffe_id,
                old=old,
                new=new,
                **self._fields,
            )
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

    def _fresh(self, contexts: Sequence[X509Context | None]) -> list[bool]:
        """Per source: did it change beyond local expiry since the last refresh?"""
        now = utcnow().timestamp()
        fresh = []
        for index, ctx in enumerate(contexts):
            keys = _keys(ctx)
            alive = {k: t for k, t in self._seen[index].items() if t > now}
            fresh.append(keys != alive)
            self._seen[index] = keys
        return fresh

    def _choose_default(
        self, ctx: X509Context, contexts: Sequence[X509Context | None]
    ) -> X509Svid | None:
        fresh = self._fresh(contexts)
        natural = select_default(ctx, self.config)
        pinned = self._default
        chosen: X509Svid | None
        if (
            pinned is None
            or self._rechoose
            or (natural is not None and natural.spiffe_id == pinned.spiffe_id)
        ):
            chosen = natural
        else:
            expired = pinned.not_after <= utcnow()
            origin = self._default_origin
            origin_fresh = origin is not None and origin < len(fresh) and fresh[origin]
            chosen = None if expired and not origin_fresh else natural
        self._rechoose = False
        self._default_withdrawn = chosen is None and pinned is not None
        if chosen is None:
            return None
        if pinned is not None and chosen.spiffe_id != pinned.spiffe_id:
            event(
                log,
                logging.WARNING,
                "svid.default_changed",
                name=self.config.names.default_svid,
                old=str(pinned.spiffe_id),
                new=str(chosen.spiffe_id),
                reason="the Workload API's latest message or the reloaded default_svid",
            )
        self._default = chosen
        self._default_origin = next(
            (
                i
                for i, c in enumerate(contexts)
                if c is not None and any(s is chosen for s in c.svids)
            ),
            None,
        )
        return chosen

    def _unservable(
        self,
        ctx: X509Context,
        contexts: Sequence[X509Context | None],
        default: X509Svid | None,
        own: TrustDomain | None,
    ) -> dict[str, str]:
        """Each configured name that cannot be served now, with the reason."""
        if all(c is None for c in contexts):
            return {"*": NO_CONTEXT}
        names = self.config.names
        out: dict[str, str] = {}
        if default is None:
            pinned = self._default
            if pinned is not None and pinned.not_after <= utcnow():
                out[names.default_svid] = (
                    f"SVID {pinned.spiffe_id} expired at {pinned.not_after.isoformat()} and the "
                    "Workload API sent no replacement (not re-pointed to another identity)"
                )
            elif self.config.default_svid is not None:
                out[names.default_svid] = (
                    f"default_svid {_describe(self.config.default_svid)} matches none of "
                    f"{_held(ctx)}"
                )
            else:
                out[names.default_svid] = "the Workload API holds no X.509-SVID for this workload"
        if own is None:
            out[names.own_bundle] = "own trust domain unknown: no default SVID, no trust_domain set"
        elif own not in ctx.bundles:
            out[names.own_bundle] = f"no bundle for own trust domain {own.name}"
        for secret in self.config.secrets:
            if ctx.find(spiffe_id=secret.selector.spiffe_id, hint=secret.selector.hint) is None:
                out[secret.name] = f"{_describe(secret.selector)} matches none of {_held(ctx)}"
        default_id = str(default.spiffe_id) if default is not None else None
        for policy in self.config.policies_for(default_id):
            wanted = policy.trust_domains or ((own,) if own is not None else ())
            if not wanted:
                out[policy.name] = "own trust domain unknown: no default SVID, no trust_domain set"
                continue
            missing = [td.name for td in wanted if td not in ctx.bundles]
            if missing:
                out[policy.name] = f"no bundle for trust domain(s) {', '.join(missing)}"
        return out

    def _report_readiness(self, secrets: int) -> None:
        if self.unservable == self._reported:
            return
        was_ready = self._reported == {}
        self._reported = dict(self.unservable)
        if self.metrics is not None:
            self.metrics.unservable_changed([] if "*" in self.unservable else list(self.unservable))
        if not self.unservable:
            event(log, logging.INFO, f"{self._subject}.ready", secrets=secrets, **self._fields)
        elif was_ready or "*" not in self.unservable:
            level = logging.ERROR if self._subject == "bridge" else logging.WARNING
            event(
                log,
                level,
                f"{self._subject}.not_ready",
                reason=self.readiness_reason(),
                **self._fields,
            )

    def refresh(self) -> None:
        """Recompute every secret from the sources' latest state and publish the changes."""
        contexts = [source.current() for source in self.sources]
        ctx = self._select(contexts)
        default = self._choose_default(ctx, contexts)
        if self.config.trust_domain is not None:
            self._own = self.config.trust_domain
        elif default is not None:
            self._own = default.spiffe_id.trust_domain
        specs: dict[str, SecretSpec] = build_specs(ctx, self.config, self._own, default=default)
        if self.jwt is not None:
            for audience, token in self.jwt.tokens().items():
                specs[JWT_PREFIX + audience] = GenericSpec("Bearer " + token.token)
        before = {n: self.cache.spec(n) for n in self.cache.names()}
        changed = self.cache.update(specs)
        self.context = ctx
        self.unservable = self._unservable(ctx, contexts, default, self._own)
        if self.metrics is not None:
            self.metrics.state_changed(ctx, self.ready, time.time())
        self._report_readiness(len(specs))
        if not changed:
            return
        for name in sorted(changed):
            spec = specs.get(name)
            if spec is None:
                event(log, logging.WARNING, "secret.withdrawn", name=name, **self._fields)
            elif isinstance(spec, GenericSpec):
                event(log, logging.INFO, "secret.generic_updated", name=name, **self._fields)
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
                    **self._fields,
                )
            else:
                event(
                    log,
                    logging.INFO,
                    "secret.validation_updated",
                    name=name,
                    trust_domains=",".join(b.trust_domain.name for b in spec.bundles),
                    allow=",".join(spec.exact + tuple(p + "*" for p in spec.prefixes)),
                    **self._fields,
                )
        for callback in self._listeners:
            callback()
