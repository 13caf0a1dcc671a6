"""The bridge core: `default` never changes identity on its own; readiness names what is missing."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

import sds.bridge.state as bridge_module
from sds.bridge.config import parse_config
from sds.bridge.metrics import Metrics
from sds.bridge.state import Bridge
from sds.provider.ca import LocalCA
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.x509 import BundleSet, X509Context, X509Svid
from sds.xds.cache import SecretCache
from sds.xds.resources import TlsSpec
from tests.harness.static_upstream import StaticSource

TD = TrustDomain.parse("example.org")
HOUR = dt.timedelta(hours=1)


@pytest.fixture(autouse=True)
def _sds_logs_reach_caplog(sds_logs_reach_caplog: None) -> None:
    """Every test here reads ``sds`` logs through caplog."""


class Source(StaticSource):
    """A StaticSource that starts empty, with an address of its own (several per bridge)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.address = f"source-{id(self):x}"


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(bridge_module, "utcnow", clock)
    return clock


def _served_id(bridge: Bridge, name: str = "default") -> str | None:
    spec = bridge.cache.spec(name)
    return str(spec.svid.spiffe_id) if isinstance(spec, TlsSpec) else None


def _svid(ca: LocalCA, path: str, hint: str = "", ttl: dt.timedelta = HOUR) -> X509Svid:
    return ca.issue_x509_svid(SpiffeId.from_path(TD, path), ttl, hint=hint)


def test_expired_default_is_withdrawn_never_repointed(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    ca = LocalCA.ephemeral(TD)
    source = Source()
    metrics = Metrics()
    bridge = Bridge(
        parse_config({"listen": "unix:///x/s"}, "t"), [source], cache=SecretCache(), metrics=metrics
    )
    web = _svid(ca, "/web", ttl=dt.timedelta(minutes=5))
    other = _svid(ca, "/other")
    source.set(X509Context((web, other), BundleSet([ca.bundle])))
    assert _served_id(bridge) == "spiffe://example.org/web"
    assert bridge.ready

    # web expires locally and the (silent) upstream sent no replacement: the Watcher drops it.
    clock.now = web.not_after + dt.timedelta(seconds=1)
    with caplog.at_level(logging.INFO, logger="sds.bridge"):
        source.set(X509Context((other,), BundleSet([ca.bundle])))
        bridge.refresh()  # any later recomputation (a JWT refresh, a reload) keeps it withdrawn
    assert _served_id(bridge) is None
    assert _served_id(bridge, "spiffe://example.org/other") == "spiffe://example.org/other"
    assert bridge.default_spiffe_id() == "spiffe://example.org/web"  # JWT-SVIDs: still web's
    assert not bridge.ready
    reason = (
        f"default: SVID spiffe://example.org/web expired at {web.not_after.isoformat()} and the "
        "Workload API sent no replacement (not re-pointed to another identity)"
    )
    assert bridge.readiness_reason() == reason
    assert [r.getMessage() for r in caplog.records if "bridge.not_ready" in r.getMessage()] == [
        f'bridge.not_ready reason="{reason}"'
    ]
    assert b'sds_unservable{name="default"} 1.0' in metrics.render()
    assert b"sds_ready 0.0" in metrics.render()
    assert not any("default_changed" in r.getMessage() for r in caplog.records)

    # A fresh upstream message that makes `other` the default moves it, loudly.
    caplog.clear()
    other2 = _svid(ca, "/other")
    with caplog.at_level(logging.INFO, logger="sds.bridge"):
        source.set(X509Context((other2,), BundleSet([ca.bundle])))
    assert _served_id(bridge) == "spiffe://example.org/other"
    assert bridge.ready
    messages = [r.getMessage() for r in caplog.records]
    assert (
        "svid.default_changed name=default old=spiffe://example.org/web "
        "new=spiffe://example.org/other reason=\"the Workload API's latest message or the "
        'reloaded default_svid"'
    ) in messages
    assert "bridge.ready secrets=5" in messages
    assert b"sds_unservable{" not in metrics.render()


def test_replacement_for_the_default_keeps_it(clock: Clock) -> None:
    ca = LocalCA.ephemeral(TD)
    source = Source()
    bridge = Bridge(parse_config({"listen": "unix:///x/s"}, "t"), [source])
    web = _svid(ca, "/web", ttl=dt.timedelta(minutes=5))
    other = _svid(ca, "/other")
    source.set(X509Context((web, other), BundleSet([ca.bundle])))
    clock.now = web.not_after + dt.timedelta(seconds=1)
    source.set(X509Context((other,), BundleSet([ca.bundle])))
    assert _served_id(bridge) is None
    web2 = _svid(ca, "/web")
    source.set(X509Context((web2, other), BundleSet([ca.bundle])))
    spec = bridge.cache.spec("default")
    assert isinstance(spec, TlsSpec) and spec.svid.serial == web2.serial
    assert bridge.ready


def test_second_upstream_cannot_take_over_the_default(clock: Clock) -> None:
    ca = LocalCA.ephemeral(TD)
    first, second = Source(), Source()
    bridge = Bridge(parse_config({"listen": "unix:///x/s"}, "t"), [first, second])
    web = _svid(ca, "/web", ttl=dt.timedelta(minutes=5))
    first.set(X509Context((web,), BundleSet([ca.bundle])))
    second.set(X509Context((_svid(ca, "/other"),), BundleSet([ca.bundle])))
    clock.now = web.not_after + dt.timedelta(seconds=1)
    first.set(X509Context((), BundleSet([ca.bundle])))  # local expiry in the first watcher
    second.set(X509Context((_svid(ca, "/other"),), BundleSet([ca.bundle])))  # other rotates
    assert _served_id(bridge) is None


def test_upstream_that_drops_the_default_moves_it() -> None:
    ca = LocalCA.ephemeral(TD)
    source = Source()
    bridge = Bridge(parse_config({"listen": "unix:///x/s"}, "t"), [source])
    source.set(X509Context((_svid(ca, "/web"), _svid(ca, "/other")), BundleSet([ca.bundle])))
    source.set(X509Context((_svid(ca, "/other"),), BundleSet([ca.bundle])))
    assert _served_id(bridge) == "spiffe://example.org/other"


def test_readiness_lists_every_unservable_name(caplog: pytest.LogCaptureFixture) -> None:
    ca = LocalCA.ephemeral(TD)
    source = Source()
    config = parse_config(
        {
            "listen": "unix:///x/s",
            "default_svid": {"hint": "external"},
            "secrets": [{"name": "by-id", "spiffe_id": "spiffe://example.org/nope"}],
            "policies": [
                {"name": "partners", "trust_domains": ["partner.test"], "allow": ["spiffe://a/b"]},
                {"name": "own", "allow": ["spiffe://example.org/b"]},
            ],
        },
        "t",
    )
    bridge = Bridge(config, [source])
    assert bridge.readiness_reason() == "no X.509 context from the Workload API yet"
    with caplog.at_level(logging.INFO, logger="sds.bridge"):
        source.set(
            X509Context((_svid(ca, "/a"), _svid(ca, "/b", hint="internal")), BundleSet([ca.bundle]))
        )
        source.set(source.ctx)  # the same state again: logged once
    held = "[spiffe://example.org/a (hint ''), spiffe://example.org/b (hint 'internal')]"
    reason = (
        f"default: default_svid hint 'external' matches none of {held}; "
        "ROOTCA: own trust domain unknown: no default SVID, no trust_domain set; "
        f"by-id: spiffe_id 'spiffe://example.org/nope' matches none of {held}; "
        "partners: no bundle for trust domain(s) partner.test; "
        "own: own trust domain unknown: no default SVID, no trust_domain set"
    )
    assert bridge.readiness_reason() == reason
    assert len([r for r in caplog.records if "bridge.not_ready" in r.getMessage()]) == 1

    config = parse_config({"listen": "unix:///x/s", "trust_domain": "example.org"}, "t")
    bridge.reconfigure(config)
    assert bridge.ready
    assert _served_id(bridge) == "spiffe://example.org/a"


def test_serving_source_names_the_upstream_index_even_for_a_repeated_address() -> None:
    ca = LocalCA.ephemeral(TD)
    first, second = Source(), Source()
    second.address = first.address  # the same address twice: names "addr#0", "addr#1"
    bridge = Bridge(parse_config({"listen": "unix:///x/s"}, "t"), [first, second])
    web = _svid(ca, "/web")
    second.set(X509Context((web,), BundleSet([ca.bundle])))
    assert bridge.serving_source("spiffe://example.org/web") == 1
    assert bridge.serving_source("spiffe://example.org/nobody") == 0
    assert bridge.serving_source(None) == 0
