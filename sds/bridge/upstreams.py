"""Redundant upstreams: which Workload API serves each identity, with sticky failover.

Several ``workload_api`` addresses are redundancy for one workload (two SPIRE
agents, or SPIRE plus tbot), not a merge. For every identity, keyed by
(SPIFFE ID, hint), :class:`Selector` serves the SVID of exactly one upstream
and sticks to it while that upstream is *healthy* (connected, or disconnected
for at most ``grace`` seconds) and its SVID is *fresh* (more than ``margin``
of its lifetime left). It fails over to another upstream that holds the same
identity only when the serving one is unhealthy or its SVID is stale and the
other's is better on that (healthy, fresh) ranking; ties keep the serving
upstream, so two upstreams rotating at different times never cause switching
back and forth. An identity only one upstream has is served from it while it
lasts (the last good state, as with a single upstream).

Identities are served in the order of one *leading* upstream (the first
configured one holding SVIDs, kept while it holds any), then any others'
identities: with one upstream that is its own order (the Workload API's first
SVID is the default), and a recovered upstream does not reorder them.
Each trust domain's bundle comes from the upstream serving that trust
domain's first identity, united with the other upstreams' bundles (first
healthy upstream wins for the rest), so a served chain always comes with the
bundle that signed it.

The clock is injected (seconds since the epoch) so the policy is testable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sds.spiffe.id import TrustDomain
from sds.spiffe.x509 import BundleSet, X509Bundle, X509Context, X509Svid

__all__ = ["FailoverPolicy", "Selection", "Selector", "UpstreamState", "UpstreamView"]

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """``grace``: seconds a disconnected upstream keeps serving before failover;
    ``margin``: fraction of an SVID's lifetime below which a fresher copy is preferred."""

    grace: float = 5.0
    margin: float = 0.2


@dataclass(frozen=True, slots=True)
class UpstreamState:
    """What one upstream holds now: its name (address), latest context and connectivity."""

    name: str
    context: X509Context | None
    connected: bool


@dataclass(frozen=True, slots=True)
class UpstreamView:
    """One upstream as the selection saw it (for /upstreams, /readyz and metrics)."""

    upstream: str
    connected: bool
    healthy: bool  # connected, or disconnected for less than the grace period
    disconnected_since: float | None  # epoch seconds, None while connected
    svids: int
    serving: tuple[str, ...]  # SPIFFE IDs served from this upstream

    def disconnected_for(self, now: float) -> float | None:
        """Seconds since the disconnect was noticed, or None while connected."""
        since = self.disconnected_since
        return None if since is None else round(max(0.0, now - since), 3)

    def as_dict(self, now: float) -> dict[str, object]:
        return {
            "upstream": self.upstream,
            "connected": self.connected,
            "healthy": self.healthy,
            "disconnected_for": self.disconnected_for(now),
            "svids": self.svids,
            "serving": list(self.serving),
        }


@dataclass(frozen=True, slots=True)
class Selection:
    """The served context, who serves what, and when the choice must be looked at again."""

    context: X509Context
    serving: dict[str, str] = field(default_factory=dict)  # SPIFFE ID -> upstream name
    upstreams: tuple[UpstreamView, ...] = ()
    recheck_at: float | None = None  # epoch seconds, or None when nothing is pending
    switched: tuple[tuple[str, str, str], ...] = ()  # (spiffe_id, from, to)


def _key(svid: X509Svid) -> Key:
    return (str(svid.spiffe_id), svid.hint)


class Selector:
    """Remembers which upstream serves each identity; :meth:`select` applies the policy."""

    def __init__(
        self, policy: FailoverPolicy | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.policy = policy or FailoverPolicy()
        self._clock = clock
        self._serving: dict[Key, str] = {}
        self._leader: str | None = None  # the upstream whose SVID order is served
        self._down_since: dict[str, float] = {}

    def _stale_at(self, svid: X509Svid) -> float:
        """When ``svid`` has only ``margin`` of its lifetime left (epoch seconds)."""
        start, end = svid.not_before.timestamp(), svid.not_after.timestamp()
        return end - self.policy.margin * (end - start)

    def select(self, upstreams: Sequence[UpstreamState]) -> Selection:
        """Choose an SVID per identity and the bundles that go with them."""
        now = self._clock()
        names = [u.name for u in upstreams]
        recheck: list[float] = []
        healthy: dict[str, bool] = {}
        for up in upstreams:
            if up.connected:
                self._down_since.pop(up.name, None)
                healthy[up.name] = True
                continue
            since = self._down_since.setdefault(up.name, now)
            healthy[up.name] = now - since < self.policy.grace
            if healthy[up.name] and len(upstreams) > 1:
                recheck.append(since + self.policy.grace)
        for name in list(self._down_since):
            if name not in names:
                del self._down_since[name]

        offers: dict[Key, dict[str, X509Svid]] = {}
        listed: dict[str, list[Key]] = {}
        for up in upstreams:
            if up.context is None:
                continue
            for svid in up.context.svids:
                if svid.not_after.timestamp() > now:
                    offers.setdefault(_key(svid), {}).setdefault(up.name, svid)
                    listed.setdefault(up.name, []).append(_key(svid))
        if self._leader not in listed:
            self._leader = next((n for n in names if n in listed), None)
        leader = listed.get(self._leader or "", [])
        order = list(dict.fromkeys(leader + [k for n in names for k in listed.get(n, ())]))

        chosen: list[tuple[X509Svid, str]] = []
        switched: list[tuple[str, str, str]] = []
        for key in order:
            offer = offers[key]

            def rank(name: str, offer: dict[str, X509Svid] = offer) -> tuple[bool, bool]:
                return healthy.get(name, False), self._stale_at(offer[name]) > now

            current = self._serving.get(key)
            best = max(offer, key=lambda n: (rank(n), -names.index(n)))
            if current in offer and rank(current) >= rank(best):
                best = current
            elif current is not None and current != best:
                switched.append((key[0], current, best))
            self._serving[key] = best
            svid = offer[best]
            chosen.append((svid, best))
            if len(offer) > 1 and self._stale_at(svid) > now:
                recheck.append(self._stale_at(svid))
        for key in list(self._serving):
            if key not in offers:
                del self._serving[key]

        bundles = self._bundles(upstreams, chosen, healthy)
        serving: dict[str, str] = {}
        for svid, name in chosen:
            serving.setdefault(str(svid.spiffe_id), name)
        views = tuple(
            UpstreamView(
                upstream=up.name,
                connected=up.connected,
                healthy=healthy[up.name],
                disconnected_since=self._down_since.get(up.name),
                svids=len(up.context.svids) if up.context else 0,
                serving=tuple(sorted({str(s.spiffe_id) for s, n in chosen if n == up.name})),
            )
            for up in upstreams
        )
        return Selection(
            context=X509Context(tuple(s for s, _ in chosen), BundleSet(bundles.values())),
            serving=serving,
            upstreams=views,
            recheck_at=min(recheck, default=None),
            switched=tuple(switched),
        )

    @staticmethod
    def _bundles(
        upstreams: Sequence[UpstreamState],
        chosen: Sequence[tuple[X509Svid, str]],
        healthy: dict[str, bool],
    ) -> dict[TrustDomain, X509Bundle]:
        by_name = {u.name: u.context for u in upstreams if u.context is not None}
        bundles: dict[TrustDomain, X509Bundle] = {}
        for svid, name in chosen:
            td = svid.spiffe_id.trust_domain
            ctx = by_name[name]
            if td not in bundles and td in ctx.bundles:
                bundles[td] = ctx.bundles[td]
        ordered = sorted(upstreams, key=lambda u: not healthy[u.name])  # stable: healthy first
        for up in ordered:
            if up.context is None:
                continue
            for td, bundle in up.context.bundles.items():
                bundles.setdefault(td, bundle)
        return bundles
