"""The Workload API client and Watcher, against the strict in-process fake (and the real provider).

Real-provider tests are at the end of the file.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib.const import Status

from sds.errors import (
    ConfigError,
    InvalidBundle,
    InvalidSvid,
    WorkloadApiDenied,
    WorkloadApiError,
    WorkloadApiMisconfigured,
    WorkloadApiUnavailable,
)
from sds.spiffe.id import TrustDomain
from sds.spiffe.jwt import validate_jwt_svid
from sds.spiffe.x509 import utcnow
from sds.workloadapi.address import Address, parse_address
from sds.workloadapi.backoff import Backoff
from sds.workloadapi.client import WorkloadApiClient
from tests.conftest import event_lines
from tests.harness.fake_workload_api import FakeWorkloadApi, JwtIssuer, eventually, x509_response
from tests.harness.material import Authority, rejection
from tests.harness.watcher import serials, watching

WORKLOAD_LOGGER = "sds.workloadapi"


@pytest.fixture(autouse=True)
def _capture_sds_logs(sds_debug_logs: None) -> None:
    """Make sds.* records reach caplog even if a CLI test configured logging in this process."""


@pytest.fixture
def ca() -> Authority:
    return Authority("example.org")


@pytest.fixture
def other_ca() -> Authority:
    return Authority("other.org")


@pytest.fixture
async def fake(sockdir: Path) -> AsyncIterator[FakeWorkloadApi]:
    api = FakeWorkloadApi()
    await api.start_unix(sockdir / "api.sock")
    yield api
    await api.stop()
    assert api.violations == []


def log_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return event_lines(caplog, WORKLOAD_LOGGER, name)


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("unix:///run/spire/agent.sock", Address("unix", path="/run/spire/agent.sock"), None),
        ("unix:/tmp/api.sock", Address("unix", path="/tmp/api.sock"), "unix:///tmp/api.sock"),
        ("tcp://127.0.0.1:8081", Address("tcp", host="127.0.0.1", port=8081), None),
        ("tcp://[::1]:8081", Address("tcp", host="::1", port=8081), None),
    ],
)
def test_parse_address_accepts(text: str, expected: Address, canonical: str | None) -> None:
    address = parse_address(text)
    assert address == expected
    assert str(address) == (canonical or text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("foo", "must be unix:///path or tcp://ip:port"),
        ("/tmp/api.sock", "must be unix:///path or tcp://ip:port"),
        ("http://127.0.0.1:80", "must be unix:///path or tcp://ip:port"),
        ("unix://host/api.sock", "must not name a host; use unix:///absolute/path"),
        ("unix:api.sock", "must have an absolute socket path (unix:///absolute/path)"),
        ("unix:///tmp/api.sock?x=1", "must not have a query or fragment"),
        ("tcp://localhost:8081", "must use an IP address, not the host name 'localhost'"),
        ("tcp://127.0.0.1", "must include a port (tcp://ip:port)"),
        ("tcp://127.0.0.1:99999", "has an invalid port"),
        ("tcp://127.0.0.1:8081/x", "must not have a path, query or fragment"),
        ("tcp://me@127.0.0.1:8081", "must not have user info"),
    ],
)
def test_parse_address_rejects(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text)
    assert str(info.value) == f"workload API address {text!r} {reason}"


def test_parse_address_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///run/api.sock")
    assert parse_address(None) == Address("unix", path="/run/api.sock")
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "api.sock")
    with pytest.raises(ConfigError) as info:
        parse_address(None)
    assert str(info.value) == (
        "workload API address 'api.sock' (from SPIFFE_ENDPOINT_SOCKET) "
        "must be unix:///path or tcp://ip:port"
    )
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET")
    with pytest.raises(ConfigError) as info:
        parse_address(None)
    assert str(info.value) == (
        "no workload API address: set SPIFFE_ENDPOINT_SOCKET or pass --workload-api"
    )


async def test_fetch_x509_context_converts_everything(
    fake: FakeWorkloadApi, ca: Authority, other_ca: Authority
) -> None:
    web = ca.svid("/web", hint="web", dns=["web.example.org"], ips=["10.0.0.1"])
    db = ca.svid("/db", hint="db")
    fake.set_x509(x509_response([web, db], [ca.bundle], [other_ca.bundle]))
    async with WorkloadApiClient(fake.address) as client:
        ctx = await client.fetch_x509_context()
    assert [(str(s.spiffe_id), s.hint) for s in ctx.svids] == [
        ("spiffe://example.org/web", "web"),
        ("spiffe://example.org/db", "db"),
    ]
    assert ctx.default_svid is not None and ctx.default_svid.chain_der() == web.chain_der()
    assert ctx.svids[0].key_der() == web.key_der()
    assert ctx.svids[0].dns_sans() == ["web.example.org"]
    assert ctx.svids[0].ip_sans() == ["10.0.0.1"]
    assert ctx.find(hint="db") is not None and ctx.find(hint="db").serial == db.serial  # type: ignore[union-attr]
    assert list(ctx.bundles) == [TrustDomain("example.org"), TrustDomain("other.org")]
    assert ctx.bundles[TrustDomain("other.org")].der() == other_ca.bundle.der()
    assert fake.count("FetchX509SVID") == 1


async def test_security_header_is_sent_on_every_call(fake: FakeWorkloadApi, ca: Authority) -> None:
    fake.set_x509(x509_response([ca.svid("/web")], [ca.bundle]))
    fake.x509_bundles = {ca.trust_domain.id: ca.bundle.der()}
    fake.jwt_issuer = JwtIssuer(ca.trust_domain, [(ca.spiffe_id("/web"), "")])
    fake.set_jwt_bundles([fake.jwt_issuer.bundle])
    async with WorkloadApiClient(fake.address) as client:
        await client.fetch_x509_context()
        await client.fetch_x509_bundles()
        [svid] = await client.fetch_jwt_svids(["db"])
        await client.fetch_jwt_bundles()
        await client.validate_jwt_svid(svid.token, "db")
    assert sorted(call.method for call in fake.calls) == [
        "FetchJWTBundles",
        "FetchJWTSVID",
        "FetchX509Bundles",
        "FetchX509SVID",
        "ValidateJWTSVID",
    ]
    assert all(call.metadata.get("workload.spiffe.io") == "true" for call in fake.calls)
    assert fake.violations == []


async def test_fake_rejects_a_call_without_the_security_header(fake: FakeWorkloadApi) -> None:
    """The fake is strict: without the header it answers INVALID_ARGUMENT (as SPIRE does)."""
    from grpclib.client import Channel

    from sds._proto import workload_pb2
    from sds._proto.workload_grpc import SpiffeWorkloadAPIStub

    channel = Channel(path=fake.address.removeprefix("unix://"))
    try:
        with pytest.raises(Exception, match="security header missing from request"):
            await SpiffeWorkloadAPIStub(channel).FetchX509SVID(workload_pb2.X509SVIDRequest())
    finally:
        channel.close()
    assert len(fake.violations) == 1
    fake.violations.clear()


@pytest.mark.parametrize("kind", ["key_mismatch", "expired", "two_uris", "ca_leaf"])
async def test_fetch_rejects_an_invalid_svid(
    fake: FakeWorkloadApi, ca: Authority, kind: str
) -> None:
    bad = getattr(ca, kind)("/web")
    fake.set_x509(x509_response([bad], [ca.bundle]))
    async with WorkloadApiClient(fake.address) as client:
        with pytest.raises(InvalidSvid) as info:
            await client.fetch_x509_context()
    assert str(info.value) == rejection(bad, kind)


async def test_fetch_rejects_a_bad_bundle(fake: FakeWorkloadApi, ca: Authority) -> None:
    fake.set_x509(x509_response([ca.svid("/web")], [ca.bundle], raw_bundle=b"garbage"))
    async with WorkloadApiClient(fake.address) as client:
        with pytest.raises(InvalidBundle) as info:
            await client.fetch_x509_context()
    assert str(info.value) == "bundle for spiffe://example.org: no DER SEQUENCE at byte 0"


async def test_an_svid_without_its_bundle_does_not_verify(
    fake: FakeWorkloadApi, ca: Authority, other_ca: Authority
) -> None:
    """The bundle field is mandatory (Workload API s.4.5): no borrowing a federated one."""
    fake.set_x509(x509_response([ca.svid("/web")], [ca.bundle], [other_ca.bundle], raw_bundle=b""))
    async with WorkloadApiClient(fake.address) as client:
        with pytest.raises(InvalidSvid) as info:
            await client.fetch_x509_context()
    assert (
        str(info.value) == "SVID spiffe://example.org/web: no bundle for trust domain example.org"
    )


async def test_an_svid_from_another_ca_does_not_verify(
    fake: FakeWorkloadApi, ca: Authority, other_ca: Authority
) -> None:
    forged = Authority("example.org").svid("/web")  # same trust domain, unknown CA
    fake.set_x509(x509_response([forged], [ca.bundle]))
    async with WorkloadApiClient(fake.address) as client:
        with pytest.raises(InvalidSvid) as info:
            await client.fetch_x509_context()
    assert str(info.value) == (
        "SVID spiffe://example.org/web: chain does not lead to the example.org bundle"
    )


async def test_x509_stream_yields_every_complete_state(
    fake: FakeWorkloadApi, ca: Authority
) -> None:
    first, second = ca.svid("/web"), ca.svid("/web")
    fake.set_x509(x509_response([first], [ca.bundle]))
    seen: list[int] = []
    async with WorkloadApiClient(fake.address) as client:
        async for ctx in client.x509_contexts():
            seen.append(ctx.svids[0].serial)
            if len(seen) == 1:
                fake.set_x509(x509_response([second], [ca.bundle]))
            else:
                break
    assert seen == [first.serial, second.serial]


async def test_bundle_streams(fake: FakeWorkloadApi, ca: Authority, other_ca: Authority) -> None:
    issuer = JwtIssuer(ca.trust_domain, [])
    fake.x509_bundles = {ca.trust_domain.id: ca.bundle.der()}
    fake.set_jwt_bundles([issuer.bundle])
    async with WorkloadApiClient(fake.address) as client:
        bundles = await client.fetch_x509_bundles()
        assert list(bundles) == [ca.trust_domain]
        async for x509_bundles in client.x509_bundles():
            assert x509_bundles[ca.trust_domain].der() == ca.bundle.der()
            break
        jwt_seen: list[list[str]] = []
        async for jwt in client.jwt_bundles():
            jwt_seen.append(sorted(td.name for td in jwt))
            if len(jwt_seen) == 1:
                fake.set_jwt_bundles([issuer.bundle, JwtIssuer(other_ca.trust_domain, []).bundle])
            else:
                break
    assert jwt_seen == [["example.org"], ["example.org", "other.org"]]


async def test_jwt_svids_bundles_and_validation(fake: FakeWorkloadApi, ca: Authority) -> None:
    web, db = ca.spiffe_id("/web"), ca.spiffe_id("/db")
    issuer = JwtIssuer(ca.trust_domain, [(web, "web"), (db, "db")])
    fake.jwt_issuer = issuer
    fake.set_jwt_bundles([issuer.bundle])
    async with WorkloadApiClient(fake.address) as client:
        svids = await client.fetch_jwt_svids(["payments"])
        only_db = await client.fetch_jwt_svids(["payments"], spiffe_id=str(db))
        bundles = await client.fetch_jwt_bundles()
        subject, claims = await client.validate_jwt_svid(svids[0].token, "payments")
        with pytest.raises(WorkloadApiMisconfigured) as info:
            await client.validate_jwt_svid(svids[0].token, "other-audience")
    assert [(s.spiffe_id, s.hint) for s in svids] == [(web, "web"), (db, "db")]
    assert [s.spiffe_id for s in only_db] == [db]
    expected = utcnow() + dt.timedelta(seconds=issuer.ttl)
    assert abs((svids[0].expiry - expected).total_seconds()) < 5
    assert validate_jwt_svid(svids[0].token, "payments", bundles).spiffe_id == web
    assert list(bundles[ca.trust_domain].keys) == [issuer.kid]
    assert subject == web
    assert claims["sub"] == str(web) and claims["aud"] == ["payments"]
    assert isinstance(claims["exp"], int)
    assert str(info.value) == (
        f"workload API at {fake.address} rejected the request as invalid: "
        "token audience ['payments'] does not include 'other-audience'"
    )
    assert "token" not in repr(svids[0])


async def test_client_over_tcp(ca: Authority) -> None:
    api = FakeWorkloadApi()
    address = await api.start_tcp()
    try:
        api.set_x509(x509_response([ca.svid("/web", hint="web")], [ca.bundle]))
        async with WorkloadApiClient(address) as client:
            ctx = await client.fetch_x509_context()
        assert [s.hint for s in ctx.svids] == ["web"]
    finally:
        await api.stop()
    assert api.violations == []


async def test_missing_socket_is_unavailable(sockdir: Path) -> None:
    address = f"unix://{sockdir}/missing.sock"
    async with WorkloadApiClient(address) as client:
        with pytest.raises(WorkloadApiUnavailable) as info:
            await client.fetch_x509_context()
    assert str(info.value) == f"workload API at {address} is unavailable: socket not found"


async def test_refused_connection_is_unavailable(sockdir: Path) -> None:
    path = sockdir / "dead.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))  # a socket file nobody listens on: a crashed server
    sock.close()
    async with WorkloadApiClient(f"unix://{path}") as client:
        with pytest.raises(WorkloadApiUnavailable) as info:
            await client.fetch_jwt_bundles()
    assert str(info.value) == f"workload API at unix://{path} is unavailable: connection refused"


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (Status.PERMISSION_DENIED, WorkloadApiDenied, "permission denied: no entry for uid 1000"),
        (
            Status.INVALID_ARGUMENT,
            WorkloadApiMisconfigured,
            "workload API at {address} rejected the request as invalid: no entry for uid 1000",
        ),
        (
            Status.UNAVAILABLE,
            WorkloadApiUnavailable,
            "workload API at {address} is unavailable: no entry for uid 1000",
        ),
        (
            Status.INTERNAL,
            WorkloadApiError,
            "workload API at {address} failed: INTERNAL: no entry for uid 1000",
        ),
    ],
)
async def test_status_codes_are_translated(
    fake: FakeWorkloadApi,
    ca: Authority,
    status: Status,
    error: type[WorkloadApiError],
    message: str,
) -> None:
    fake.set_x509(x509_response([ca.svid("/web")], [ca.bundle]))
    fake.fault("FetchX509SVID", status, "no entry for uid 1000")
    async with WorkloadApiClient(fake.address) as client:
        with pytest.raises(WorkloadApiError) as info:
            await client.fetch_x509_context()
    assert type(info.value) is error
    assert str(info.value) == message.format(address=fake.address)


async def test_no_identity_is_permission_denied(fake: FakeWorkloadApi) -> None:
    async with WorkloadApiClient(fake.address) as client:
        with pytest.raises(WorkloadApiDenied) as info:
            await client.fetch_x509_context()
    assert str(info.value) == "permission denied: no identity issued"


def test_backoff_doubles_up_to_the_maximum_and_resets() -> None:
    backoff = Backoff(0.1, 1.0, rng=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1, 1])
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.1)
    jittered = Backoff(0.1, 30.0)
    delays = [jittered.next_delay() for _ in range(200)]
    assert all(0 <= d <= 30.0 for d in delays)
    assert len(set(delays)) > 100  # full jitter: random, not fixed steps
    with pytest.raises(ValueError, match="backoff needs 0 < initial <= maximum"):
        Backoff(1.0, 0.5)


async def test_watcher_publishes_state_hints_and_jwt_bundles(
    fake: FakeWorkloadApi, ca: Authority, other_ca: Authority
) -> None:
    web, db = ca.svid("/web", hint="web"), ca.svid("/db", hint="db")
    issuer = JwtIssuer(ca.trust_domain, [])
    fake.set_x509(x509_response([web, db], [ca.bundle], [other_ca.bundle]))
    fake.set_jwt_bundles([issuer.bundle])
    async with watching(fake.address) as (watcher, rec):
        assert watcher.current() is None
        ctx = await watcher.wait_ready(5)
        assert [(str(s.spiffe_id), s.hint) for s in ctx.svids] == [
            ("spiffe://example.org/web", "web"),
            ("spiffe://example.org/db", "db"),
        ]
        assert ctx.find(spiffe_id="spiffe://example.org/db", hint="db") is not None
        assert list(ctx.bundles) == [ca.trust_domain, other_ca.trust_domain]
        await eventually(watcher.jwt_bundles, what="JWT bundles")
        assert list(watcher.jwt_bundles()[ca.trust_domain].keys) == [issuer.kid]
        assert rec.of("connected") == [None]
        assert len(rec.of("x509_update")) == 1 and len(rec.of("jwt_update")) == 1
        assert rec.notifications == 2

        fake.set_jwt_bundles([issuer.bundle, JwtIssuer(other_ca.trust_domain, []).bundle])
        await eventually(lambda: len(watcher.jwt_bundles()) == 2, what="second JWT bundle")
        assert rec.notifications == 3
    assert all(c.metadata.get("workload.spiffe.io") == "true" for c in fake.calls)


@pytest.mark.parametrize("kind", ["key_mismatch", "expired", "two_uris", "ca_leaf"])
async def test_watcher_skips_invalid_svid_and_keeps_last_good(
    fake: FakeWorkloadApi, ca: Authority, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    web, db = ca.svid("/web", hint="web"), ca.svid("/db", hint="db")
    fake.set_x509(x509_response([web, db], [ca.bundle]))
    async with watching(fake.address) as (watcher, rec):
        await watcher.wait_ready(5)
        bad_web = getattr(ca, kind)("/web", hint="web")
        bad_new = getattr(ca, kind)("/new", hint="new")
        new_db = ca.svid("/db", hint="db")
        fake.set_x509(x509_response([bad_web, new_db, bad_new], [ca.bundle]))
        await eventually(
            lambda: serials(watcher.current())["spiffe://example.org/db"] == new_db.serial,
            what="the new db SVID",
        )
        ctx = watcher.current()
        assert ctx is not None
        # web: last good kept; new: no last good, dropped; db: replaced.
        assert [(str(s.spiffe_id), s.hint, s.serial) for s in ctx.svids] == [
            ("spiffe://example.org/web", "web", web.serial),
            ("spiffe://example.org/db", "db", new_db.serial),
        ]
        assert [str(e) for e in rec.of("svid_rejected")] == [
            rejection(bad_web, kind),
            rejection(bad_new, kind),
        ]
    lines = log_lines(caplog, "svid.rejected")
    assert len(lines) == 2
    assert lines[0].startswith(
        "svid.rejected spiffe_id=spiffe://example.org/web hint=web "
        f'reason="{rejection(bad_web, kind)}" '
        f'action="kept the last good SVID (serial {web.serial:x}, expires '
    )
    assert lines[1] == (
        "svid.rejected spiffe_id=spiffe://example.org/new hint=new "
        f'reason="{rejection(bad_new, kind)}" '
        'action="dropped: no unexpired last good SVID"'
    )
    assert all(r.levelno == logging.ERROR for r in caplog.records if "svid.rejected" in r.message)


async def test_watcher_rejects_a_message_with_a_bad_bundle_whole(
    fake: FakeWorkloadApi, ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    web = ca.svid("/web")
    fake.set_x509(x509_response([web], [ca.bundle]))
    async with watching(fake.address) as (watcher, rec):
        before = await watcher.wait_ready(5)
        fake.set_x509(
            x509_response([ca.svid("/web"), ca.svid("/db")], [ca.bundle], raw_bundle=b"x")
        )
        await eventually(lambda: log_lines(caplog, "x509.update_rejected"), what="rejection")
        assert watcher.current() is before
        assert rec.notifications == 1
    assert log_lines(caplog, "x509.update_rejected") == [
        'x509.update_rejected reason="bundle for spiffe://example.org: no DER SEQUENCE at byte 0" '
        'action="kept the last good state"'
    ]


async def test_watcher_drops_a_last_good_svid_the_new_bundle_no_longer_trusts(
    fake: FakeWorkloadApi, ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    fake.set_x509(x509_response([ca.svid("/web")], [ca.bundle]))
    async with watching(fake.address) as (watcher, rec):
        await watcher.wait_ready(5)
        rotated = Authority("example.org")  # new CA; the old one left the bundle
        bad = rotated.key_mismatch("/web")
        fake.set_x509(x509_response([bad], [rotated.bundle]))
        await eventually(lambda: not watcher.current().svids, what="the drop")  # type: ignore[union-attr]
        assert [str(e) for e in rec.of("svid_rejected")] == [rejection(bad, "key_mismatch")]
    [line] = log_lines(caplog, "svid.rejected")
    assert line.endswith('action="dropped: no unexpired last good SVID"')


async def test_watcher_withdraws_svids_missing_from_a_message(
    fake: FakeWorkloadApi, ca: Authority
) -> None:
    web, db = ca.svid("/web", hint="web"), ca.svid("/db", hint="db")
    fake.set_x509(x509_response([web, db], [ca.bundle]))
    async with watching(fake.address) as (watcher, rec):
        await watcher.wait_ready(5)
        fake.set_x509(x509_response([db], [ca.bundle]))
        await eventually(lambda: len(serials(watcher.current())) == 1, what="withdrawal")
        assert serials(watcher.current()) == {"spiffe://example.org/db": db.serial}
        assert rec.notifications == 2


async def test_watcher_drops_no_op_updates(fake: FakeWorkloadApi, ca: Authority) -> None:
    resp = x509_response([ca.svid("/web", hint="web")], [ca.bundle])
    fake.set_x509(resp)
    async with watching(fake.address) as (watcher, rec):
        first = await watcher.wait_ready(5)
        copy = type(resp)()
        copy.CopyFrom(resp)
        fake.set_x509(copy)  # identical content, a new message
        marker = ca.svid("/marker")
        fake.set_x509(x509_response([ca.svid("/web", hint="web"), marker], [ca.bundle]))
        await eventually(
            lambda: "spiffe://example.org/marker" in serials(watcher.current()), what="marker"
        )
        # Messages arrive in order: the copy was processed before the marker, without a notice.
        assert rec.notifications == 2
        assert len(rec.of("x509_update")) == 2
        assert watcher.current() is not first


async def test_watcher_expiry_timer_drops_an_expired_svid(
    fake: FakeWorkloadApi, ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    short = ca.short_lived("/web", seconds=2, hint="web")
    db = ca.svid("/db", hint="db")
    fake.set_x509(x509_response([short, db], [ca.bundle]))
    async with watching(fake.address) as (watcher, rec):
        await watcher.wait_ready(5)
        assert len(serials(watcher.current())) == 2
        await eventually(lambda: rec.of("svid_expired"), timeout=6, what="expiry")
        assert serials(watcher.current()) == {"spiffe://example.org/db": db.serial}
        assert [s.serial for s in rec.of("svid_expired")] == [short.serial]
        assert rec.notifications == 2
    not_after = short.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert log_lines(caplog, "svid.expired") == [
        f"svid.expired spiffe_id=spiffe://example.org/web hint=web not_after={not_after} "
        'action="dropped: the workload API sent no replacement in time"'
    ]
    [record] = [r for r in caplog.records if r.getMessage().startswith("svid.expired")]
    assert record.levelno == logging.ERROR


async def test_watcher_withdraws_svids_on_permission_denied_and_recovers(
    fake: FakeWorkloadApi, ca: Authority, other_ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    resp = x509_response([ca.svid("/web")], [ca.bundle], [other_ca.bundle])
    fake.set_x509(resp)
    async with watching(fake.address) as (watcher, rec):
        before = await watcher.wait_ready(5)
        fake.deny("caller is no longer entitled")
        await eventually(lambda: not watcher.current().svids, what="withdrawal")  # type: ignore[union-attr]
        after = watcher.current()
        assert after is not None and after.bundles == before.bundles
        denied = [e for e in rec.of("disconnected") if isinstance(e, WorkloadApiDenied)]
        assert str(denied[0]) == "permission denied: caller is no longer entitled"
        assert log_lines(caplog, "workload_api.denied")[0].startswith(
            f"workload_api.denied address={fake.address} "
            'error="permission denied: caller is no longer entitled" '
            "withdrawn=spiffe://example.org/web attempt=1 "
        )
        fake.set_x509(resp)  # entitled again: the retry picks it up
        await eventually(lambda: watcher.current().svids, what="recovery")  # type: ignore[union-attr]


async def test_watcher_invalid_argument_is_misconfiguration_without_hot_loop(
    fake: FakeWorkloadApi, ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    fake.set_x509(x509_response([ca.svid("/web")], [ca.bundle]))
    fake.fault("FetchX509SVID", Status.INVALID_ARGUMENT, "security header missing", times=None)
    async with watching(fake.address, backoff_initial=0.001, backoff_max=0.3) as (watcher, rec):
        await eventually(lambda: fake.count("FetchX509SVID") >= 3, what="three attempts")
        times = [c.at for c in fake.calls if c.method == "FetchX509SVID"]
        assert watcher.current() is None
    # Retried only every backoff_max (0.3 s), never on the fast initial schedule.
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.29 for gap in gaps), gaps
    message = (
        f"workload API at {fake.address} rejected the request as invalid: security header missing"
    )
    assert str(rec.of("misconfigured")[0]) == message
    [line, *_] = log_lines(caplog, "workload_api.misconfigured")
    assert "configuration" in line and f'error="{message}"' in line


async def test_watcher_reconnects_when_the_server_restarts(
    sockdir: Path, ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    path = sockdir / "api.sock"
    first, second = FakeWorkloadApi(), FakeWorkloadApi()
    first.set_x509(x509_response([ca.svid("/web", hint="old")], [ca.bundle]))
    new_ca = Authority("example.org")  # a restarted ephemeral provider has a new CA
    second.set_x509(x509_response([new_ca.svid("/web", hint="new")], [new_ca.bundle]))
    await first.start_unix(path)
    try:
        async with watching(f"unix://{path}") as (watcher, rec):
            await watcher.wait_ready(5)
            await first.stop()
            await eventually(lambda: rec.of("disconnected"), what="disconnect")
            assert watcher.current().svids[0].hint == "old"  # type: ignore[union-attr]
            await second.start_unix(path)
            await eventually(
                lambda: watcher.current().svids[0].hint == "new",  # type: ignore[union-attr]
                what="the new server's SVID",
            )
            assert rec.of("connected") == [None, None]
            assert isinstance(rec.of("disconnected")[0], WorkloadApiUnavailable)
    finally:
        await first.stop()
        await second.stop()
    assert first.violations == [] and second.violations == []


async def test_watcher_backoff_resets_after_a_good_message(
    fake: FakeWorkloadApi, ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    fake.set_x509(x509_response([ca.svid("/web")], [ca.bundle]))
    fake.fault("FetchX509SVID", Status.UNAVAILABLE, "warming up", times=3)
    async with watching(fake.address, backoff_initial=0.01, backoff_max=5.0) as (watcher, rec):
        await watcher.wait_ready(5)
        fake.fail_streams("FetchX509SVID", Status.UNAVAILABLE, "restarting")
        await eventually(lambda: len(rec.of("connected")) == 2, what="reconnect")
    lines = log_lines(caplog, "workload_api.disconnected")
    attempts = [int(re.search(r" attempt=(\d+)", line)[1]) for line in lines]  # type: ignore[index]
    delays = [float(re.search(r" retry_in=([\d.]+)", line)[1]) for line in lines]  # type: ignore[index]
    assert attempts == [1, 2, 3, 1]
    ceilings = [0.01, 0.02, 0.04, 0.01]
    assert all(d <= c + 0.0005 for d, c in zip(delays, ceilings, strict=True)), delays


async def test_watcher_wait_ready_times_out_with_the_last_error(sockdir: Path) -> None:
    address = f"unix://{sockdir}/missing.sock"
    async with watching(address) as (watcher, rec):
        await eventually(lambda: rec.of("disconnected"), what="a failed attempt")
        with pytest.raises(WorkloadApiUnavailable) as info:
            await watcher.wait_ready(0.2)
    assert str(info.value) == (
        f"no X.509-SVIDs within 0.2s: workload API at {address} is unavailable: socket not found"
    )


async def test_watcher_keeps_jwt_bundles_when_a_jwks_is_bad(
    fake: FakeWorkloadApi, ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = JwtIssuer(ca.trust_domain, [])
    fake.set_x509(x509_response([ca.svid("/web")], [ca.bundle]))
    fake.set_jwt_bundles([issuer.bundle])
    async with watching(fake.address) as (watcher, rec):
        await eventually(watcher.jwt_bundles, what="JWT bundles")
        fake.set_raw_jwt_bundles({ca.trust_domain.id: b"not json"})
        await eventually(lambda: log_lines(caplog, "jwt_bundles.rejected"), what="rejection")
        assert list(watcher.jwt_bundles()[ca.trust_domain].keys) == [issuer.kid]
        assert len(rec.of("jwt_update")) == 1


async def test_a_failing_listener_does_not_stop_the_others(
    fake: FakeWorkloadApi, ca: Authority
) -> None:
    fake.set_x509(x509_response([ca.svid("/web")], [ca.bundle]))
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("listener bug")

    async with watching(fake.address) as (watcher, _):
        watcher.subscribe(broken)
        watcher.subscribe(lambda: calls.append("after"))
        await watcher.wait_ready(5)
        assert calls == ["after"]
