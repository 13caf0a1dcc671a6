"""Redundant upstreams: the selection policy alone, with fake upstreams and an injected clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from pathlib import Path

import pytest

from sds.bridge.config import BridgeConfig
from sds.bridge.state import Bridge
from sds.bridge.upstreams import FailoverPolicy, Selector, UpstreamState
from sds.spiffe.x509 import BundleSet, X509Bundle, X509Context, X509Svid
from sds.workloadapi.watcher import Watcher
from sds.xds.cache import SecretCache
from sds.xds.resources import TlsSpec
from tests.harness.fake_workload_api import FakeWorkloadApi, eventually, x509_response
from tests.harness.material import Authority

T0 = 2_000_000_000.0  # epoch seconds; every SVID below is dated relative to it
WEB = "spiffe://example.org/web"
DB = "spiffe://example.org/db"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def at(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(T0 + seconds, dt.UTC)


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority()


def svid(ca: Authority, start: float, end: float, path: str = "/web", hint: str = "") -> X509Svid:
    return ca.svid(path, hint=hint, not_before=at(start), not_after=at(end))


def up(name: str, *svids: X509Svid, connected: bool = True, ca: Authority) -> UpstreamState:
    return UpstreamState(name, X509Context(svids, BundleSet([ca.bundle])), connected)


def selector(clock: Clock, grace: float = 5.0, margin: float = 0.2) -> Selector:
    return Selector(FailoverPolicy(grace=grace, margin=margin), clock)


def test_one_identity_sticks_to_the_first_upstream(ca: Authority) -> None:
    clock = Clock()
    a, b = svid(ca, -10, 100), svid(ca, -5, 100)
    sel = selector(clock).select([up("a", a, ca=ca), up("b", b, ca=ca)])
    assert sel.context.svids == (a,)
    assert sel.serving == {WEB: "a"}
    assert [(v.upstream, v.serving) for v in sel.upstreams] == [("a", (WEB,)), ("b", ())]
    assert sel.switched == ()


def test_disconnect_fails_over_after_the_grace_period_and_never_back(ca: Authority) -> None:
    clock = Clock()
    s = selector(clock, grace=5)
    a, b = svid(ca, -10, 100), svid(ca, -5, 100)
    assert s.select([up("a", a, ca=ca), up("b", b, ca=ca)]).serving == {WEB: "a"}
    clock.now += 1
    down = s.select([up("a", a, connected=False, ca=ca), up("b", b, ca=ca)])
    assert down.serving == {WEB: "a"}  # within the grace period: keep serving a
    assert down.recheck_at == T0 + 1 + 5
    assert down.upstreams[0].healthy and not down.upstreams[0].connected
    clock.now += 4.9
    assert s.select([up("a", a, connected=False, ca=ca), up("b", b, ca=ca)]).serving[WEB] == "a"
    clock.now += 0.1
    over = s.select([up("a", a, connected=False, ca=ca), up("b", b, ca=ca)])
    assert over.serving == {WEB: "b"}
    assert over.context.svids == (b,)
    assert over.switched == ((WEB, "a", "b"),)
    assert over.upstreams[0].disconnected_for(clock.now) == 5.0
    clock.now += 10
    back = s.select([up("a", svid(ca, 15, 130), ca=ca), up("b", b, ca=ca)])
    assert back.serving == {WEB: "b"}  # a is back and fresh, but so is b: no switch back
    assert back.switched == ()


def test_a_short_blip_within_grace_does_not_switch(ca: Authority) -> None:
    clock = Clock()
    s = selector(clock, grace=5)
    a, b = svid(ca, -10, 100), svid(ca, -5, 100)
    s.select([up("a", a, ca=ca), up("b", b, ca=ca)])
    clock.now += 1
    s.select([up("a", a, connected=False, ca=ca), up("b", b, ca=ca)])
    clock.now += 3
    s.select([up("a", a, ca=ca), up("b", b, ca=ca)])  # reconnected: the clock resets
    clock.now += 4
    again = s.select([up("a", a, connected=False, ca=ca), up("b", b, ca=ca)])
    assert again.serving == {WEB: "a"}
    assert again.recheck_at == clock.now + 5


def test_near_expiry_moves_to_a_fresher_copy_only_if_one_exists(ca: Authority) -> None:
    clock = Clock()
    s = selector(clock, margin=0.2)
    a = svid(ca, 0, 100)  # stale from t=80
    b_stale, b_fresh = svid(ca, 0, 99), svid(ca, 60, 160)
    first = s.select([up("a", a, ca=ca), up("b", b_stale, ca=ca)])
    assert first.recheck_at == T0 + 80
    clock.now = T0 + 85
    kept = s.select([up("a", a, ca=ca), up("b", b_stale, ca=ca)])
    assert kept.serving == {WEB: "a"}  # both stale: no reason to move
    moved = s.select([up("a", a, ca=ca), up("b", b_fresh, ca=ca)])
    assert moved.serving == {WEB: "b"}
    assert moved.switched == ((WEB, "a", "b"),)


def test_a_healthy_stale_svid_beats_a_fresh_one_from_a_dead_upstream(ca: Authority) -> None:
    clock = Clock()
    s = selector(clock, grace=1)
    a, b = svid(ca, 0, 100), svid(ca, 50, 150)
    s.select([up("a", a, ca=ca), up("b", b, ca=ca)])
    clock.now = T0 + 60
    s.select([up("a", a, ca=ca), up("b", b, connected=False, ca=ca)])
    clock.now = T0 + 90
    sel = s.select([up("a", a, ca=ca), up("b", b, connected=False, ca=ca)])
    assert sel.serving == {WEB: "a"}


def test_a_dead_upstream_keeps_serving_what_nobody_else_has(ca: Authority) -> None:
    clock = Clock()
    s = selector(clock, grace=1)
    a_web, a_db, b_web = svid(ca, 0, 100), svid(ca, 0, 100, "/db"), svid(ca, 0, 100)
    s.select([up("a", a_web, a_db, ca=ca), up("b", b_web, ca=ca)])
    s.select([up("a", a_web, a_db, connected=False, ca=ca), up("b", b_web, ca=ca)])
    clock.now += 10
    sel = s.select([up("a", a_web, a_db, connected=False, ca=ca), up("b", b_web, ca=ca)])
    assert sel.serving == {WEB: "b", DB: "a"}
    assert sel.context.svids == (b_web, a_db)  # a leads (it still holds SVIDs): its order
    clock.now = T0 + 100
    gone = s.select([up("a", a_web, a_db, connected=False, ca=ca), up("b", b_web, ca=ca)])
    assert gone.context.svids == ()  # expired everywhere: nothing served


def test_identity_order_follows_the_leading_upstream_and_stays(ca: Authority) -> None:
    clock = Clock()
    s = selector(clock, grace=1)
    a_web, a_db = svid(ca, 0, 100), svid(ca, 0, 100, "/db")
    b_db, b_web = svid(ca, 0, 100, "/db"), svid(ca, 0, 100)
    first = s.select([up("a", a_web, a_db, ca=ca), up("b", b_db, b_web, ca=ca)])
    assert [str(v.spiffe_id) for v in first.context.svids] == [WEB, DB]
    clock.now += 5
    gone = s.select([UpstreamState("a", None, False), up("b", b_db, b_web, ca=ca)])
    assert gone.context.svids == (b_db, b_web)  # a holds nothing now: b's order
    clock.now += 5
    back = s.select([up("a", a_web, a_db, ca=ca), up("b", b_db, b_web, ca=ca)])
    assert [str(v.spiffe_id) for v in back.context.svids] == [DB, WEB]  # b stays leading
    assert back.serving == {DB: "b", WEB: "b"}


def test_a_withdrawn_identity_comes_back_in_the_upstreams_order(ca: Authority) -> None:
    clock = Clock()
    s = selector(clock)
    web, other = svid(ca, 0, 100), svid(ca, 0, 100, "/other")
    s.select([up("a", web, other, ca=ca)])
    s.select([up("a", other, ca=ca)])
    web2 = svid(ca, 10, 110)
    assert s.select([up("a", web2, other, ca=ca)]).context.svids == (web2, other)


def test_hints_are_separate_identities(ca: Authority) -> None:
    clock = Clock()
    s = selector(clock)
    a1, a2 = svid(ca, 0, 100, hint="one"), svid(ca, 0, 100, hint="two")
    b2 = svid(ca, 0, 100, hint="two")
    sel = s.select([up("a", a1, ca=ca), up("b", b2, a2, ca=ca)])
    assert sel.context.svids == (a1, b2)


def test_bundles_follow_the_serving_upstream_united_with_the_rest() -> None:
    ca_a, ca_b, fed = Authority(), Authority(), Authority("other.org")
    clock = Clock()
    s = selector(clock, grace=1)
    a = ca_a.svid("/web", not_before=at(0), not_after=at(100))
    b = ca_b.svid("/web", not_before=at(0), not_after=at(100))
    ua = UpstreamState("a", X509Context((a,), BundleSet([ca_a.bundle])), True)
    ub = UpstreamState("b", X509Context((b,), BundleSet([ca_b.bundle, fed.bundle])), True)
    sel = s.select([ua, ub])
    assert _bundle_certs(sel.context) == {"example.org": ca_a.cert, "other.org": fed.cert}
    clock.now += 1
    s.select([UpstreamState("a", ua.context, False), ub])
    clock.now += 1
    over = s.select([UpstreamState("a", ua.context, False), ub])
    assert over.serving == {WEB: "b"}
    assert _bundle_certs(over.context) == {"example.org": ca_b.cert, "other.org": fed.cert}


def _bundle_certs(ctx: X509Context) -> dict[str, object]:
    return {td.name: ctx.bundles[td].authorities[0] for td in ctx.bundles}


def test_single_upstream_is_served_as_before(ca: Authority) -> None:
    clock = Clock()
    s = selector(clock, grace=1)
    a = svid(ca, 0, 100)
    s.select([up("a", a, ca=ca)])
    clock.now += 50
    sel = s.select([up("a", a, connected=False, ca=ca)])
    assert sel.context.svids == (a,)
    assert sel.recheck_at is None  # nobody to fail over to: no timer


def test_staggered_rotations_never_switch_seeded(ca: Authority) -> None:
    """Two connected upstreams renewing at half-life, out of phase: 10,000 ticks, no switch."""
    rng = random.Random(20261202)
    pool = [svid(ca, start, start + 40) for start in range(-40, 10_100, 5)]
    by_start = {int(s.not_before.timestamp() - T0): s for s in pool}
    clock = Clock()
    s = selector(clock, grace=5, margin=0.2)
    held = {"a": by_start[-20], "b": by_start[-5]}
    switches = 0
    for tick in range(10_000):
        clock.now = T0 + tick
        for name, current in held.items():  # renew at 50-60 % of the lifetime, out of phase
            start = int(current.not_before.timestamp() - T0)
            if tick - start >= 20 + rng.choice((0, 5)):
                held[name] = by_start[tick - tick % 5]
        sel = s.select([up(n, held[n], ca=ca) for n in ("a", "b")])
        switches += len(sel.switched)
        assert sel.context.svids == (held[sel.serving[WEB]],)
    assert switches == 0


def test_random_outages_only_switch_for_a_reason_seeded(ca: Authority) -> None:
    """Random connects, disconnects and renewals over 10,000 steps: every switch is justified
    (the old upstream unhealthy or stale and the new one ranked higher), and the served SVID
    is always one an upstream holds now."""
    rng = random.Random(7)
    pool = {start: svid(ca, start, start + 40) for start in range(-40, 10_100, 5)}
    clock = Clock()
    grace, margin = 3.0, 0.2
    s = selector(clock, grace=grace, margin=margin)
    names = ("a", "b", "c")
    held = {n: pool[-rng.choice((5, 10, 15))] for n in names}
    connected = dict.fromkeys(names, True)
    down_since: dict[str, float] = {}
    previous: str | None = None
    switches = 0
    for tick in range(10_000):
        clock.now = T0 + tick
        for n in names:
            roll = rng.random()
            if roll < 0.02:
                connected[n] = not connected[n]
            if connected[n]:
                down_since.pop(n, None)
                if clock.now - held[n].not_before.timestamp() >= 20 and rng.random() < 0.3:
                    held[n] = pool[tick - tick % 5]
            else:
                down_since.setdefault(n, clock.now)
        states = [up(n, held[n], connected=connected[n], ca=ca) for n in names]
        live = [st for st in states if held[st.name].not_after.timestamp() > clock.now]
        sel = s.select(states)
        if not live:
            assert sel.context.svids == ()
            previous = None
            continue
        current = sel.serving[WEB]
        assert sel.context.svids == (held[current],)

        def rank(n: str) -> tuple[bool, bool]:
            healthy = connected[n] or clock.now - down_since[n] < grace
            cert = held[n]
            start, end = cert.not_before.timestamp(), cert.not_after.timestamp()
            return healthy, end - margin * (end - start) > clock.now

        if previous is not None and current != previous:
            switches += 1
            if held[previous].not_after.timestamp() > clock.now:
                assert rank(current) > rank(previous), (tick, previous, current)
            assert sel.switched == ((WEB, previous, current),)
        else:
            assert sel.switched == ()
        previous = current
    assert switches > 10  # the scenario exercised failover


def test_bundle_only_upstream_contributes_bundles() -> None:
    ca_a = Authority()
    clock = Clock()
    a = ca_a.svid("/web", not_before=at(0), not_after=at(100))
    ua = UpstreamState("a", X509Context((a,), BundleSet([ca_a.bundle])), True)
    other = Authority("other.org")
    ub = UpstreamState(
        "b", X509Context((), BundleSet([X509Bundle(other.trust_domain, (other.cert,))])), True
    )
    sel = selector(clock).select([ua, ub])
    assert sorted(td.name for td in sel.context.bundles) == ["example.org", "other.org"]


# --------------------------------------------------------------------------- wired up


@pytest.mark.chaos
async def test_bridge_fails_over_between_two_watchers_on_its_own_timer(sockdir: Path) -> None:
    """Real Watchers on two fake Workload APIs: stop the serving one; after the grace period
    (no upstream event, only the bridge's timer) the other's SVID is served, and a restarted
    first upstream does not take it back."""
    ca = Authority()
    fakes = [FakeWorkloadApi(), FakeWorkloadApi()]
    svids = [ca.svid("/web", hint="web"), ca.svid("/web", hint="web")]
    for index, fake in enumerate(fakes):
        await fake.start_unix(sockdir / f"api-{index}.sock")
        fake.set_x509(x509_response([svids[index]], [ca.bundle]))
    watchers = [Watcher(f.address, backoff_initial=0.01, backoff_max=0.05) for f in fakes]
    bridge = Bridge(
        BridgeConfig(failover=FailoverPolicy(grace=0.3, margin=0.2)),
        watchers,
        cache=SecretCache("t"),
    )
    tasks = [asyncio.create_task(w.run()) for w in watchers]

    def served() -> int | None:
        spec = bridge.cache.spec("default")
        return spec.svid.serial if isinstance(spec, TlsSpec) else None

    try:
        await eventually(lambda: all(w.connected for w in watchers), what="both connected")
        assert served() == svids[0].serial
        await fakes[0].stop()
        await eventually(lambda: not watchers[0].connected, what="disconnect seen")
        assert served() == svids[0].serial  # within the grace period
        await eventually(lambda: served() == svids[1].serial, 5, "failover to upstream 2")
        assert [v.serving for v in bridge.selection.upstreams] == [(), (WEB,)]
        await fakes[0].start_unix(sockdir / "api-0.sock")
        fakes[0].set_x509(x509_response([ca.svid("/web", hint="web")], [ca.bundle]))
        await eventually(lambda: watchers[0].connected, what="upstream 1 back")
        await asyncio.sleep(0.5)  # let a wrong switch-back happen, if it would
        assert served() == svids[1].serial
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for fake in fakes:
            await fake.stop()
