"""The Delegated Identity API client and watchers, against a strict in-process fake SPIRE agent.

The fake checks requests as SPIRE v1.13.3's admin endpoint does
(``pkg/agent/api/delegatedidentity/v1/service.go``): the delegate must be
authorized, then exactly one of selectors and a non-zero pid is given; a pid
with no entries gets messages without SVIDs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpclib.const import Status
from grpclib.server import Stream

from sds._proto import delegatedidentity_pb2 as pb
from sds.errors import (
    WorkloadApiDenied,
    WorkloadApiMisconfigured,
    WorkloadApiUnavailable,
)
from sds.spiffe.id import TrustDomain
from sds.spiffe.jwt import sign_jwt_svid
from sds.spiffe.x509 import BundleSet, X509Bundle, X509Svid
from sds.workloadapi.client import RejectedSvid
from sds.workloadapi.delegated import (
    DelegatedBundles,
    DelegatedIdentityClient,
    DelegatedWatcher,
    DelegatedX509Update,
)
from tests.conftest import event_lines
from tests.harness.fake_delegated import NOT_BOTH, NOT_DELEGATE, FakeAgent, svids_response
from tests.harness.fake_workload_api import eventually
from tests.harness.material import Authority, rejection

PID = 4242
_DER = serialization.Encoding.DER


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
async def agent(sockdir: Path) -> AsyncIterator[FakeAgent]:
    fake = FakeAgent()
    await fake.start(sockdir / "admin.sock")
    yield fake
    if fake._server is not None:
        await fake.stop()


def address(sockdir: Path) -> str:
    return f"unix://{sockdir / 'admin.sock'}"


@contextlib.asynccontextmanager
async def running(*runnables: DelegatedBundles | DelegatedWatcher) -> AsyncIterator[None]:
    """Run each ``run()`` in the background; cancel them on exit and surface any crash."""
    tasks = [asyncio.create_task(r.run()) for r in runnables]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def watchers(sockdir: Path, pid: int = PID) -> tuple[DelegatedBundles, DelegatedWatcher]:
    bundles = DelegatedBundles(address(sockdir), backoff_initial=0.01, backoff_max=0.2)
    watcher = DelegatedWatcher(
        address(sockdir), pid, bundles, backoff_initial=0.01, backoff_max=0.2
    )
    return bundles, watcher


def serials(watcher: DelegatedWatcher) -> list[int]:
    ctx = watcher.current()
    return [] if ctx is None else [s.serial for s in ctx.svids]


# --------------------------------------------------------------------------- the client


async def test_svids_arrive_converted_with_keys_hints_and_federated_trust_domains(
    agent: FakeAgent, sockdir: Path, ca: Authority
) -> None:
    web, admin = ca.svid("/web"), ca.svid("/admin", hint="internal")
    agent.set_workload(PID, svids_response([web, admin], [TrustDomain("other.org")]))
    async with DelegatedIdentityClient(address(sockdir)) as client:
        update = await anext(client.x509_svids(PID))
    assert isinstance(update, DelegatedX509Update)
    assert update.federates_with == frozenset({TrustDomain("other.org")})
    got = [s for s in update.svids if isinstance(s, X509Svid)]
    assert [(str(s.spiffe_id), s.hint) for s in got] == [
        ("spiffe://example.org/web", ""),
        ("spiffe://example.org/admin", "internal"),
    ]
    assert [(s.chain_der(), s.key_der()) for s in got] == [
        (web.chain_der(), web.key_der()),
        (admin.chain_der(), admin.key_der()),
    ]
    (request,) = agent.requests
    assert (request.message.pid, list(request.message.selectors)) == (PID, [])
    # SPIRE's admin middleware checks the security header only on /SpiffeWorkloadAPI/ methods.
    assert "workload.spiffe.io" not in request.metadata


async def test_a_workload_without_entries_gets_an_empty_update(
    agent: FakeAgent, sockdir: Path
) -> None:
    async with DelegatedIdentityClient(address(sockdir)) as client:
        update = await anext(client.x509_svids(PID))
    assert update == DelegatedX509Update((), frozenset())


async def test_a_malformed_svid_is_rejected_and_the_others_kept(
    agent: FakeAgent, sockdir: Path, ca: Authority
) -> None:
    good, bad = ca.svid("/good"), ca.key_mismatch("/bad")
    agent.set_workload(PID, svids_response([bad, good]))
    async with DelegatedIdentityClient(address(sockdir)) as client:
        update = await anext(client.x509_svids(PID))
    assert isinstance(update, DelegatedX509Update)
    first, second = update.svids
    assert isinstance(first, RejectedSvid)
    assert (first.spiffe_id, str(first.error)) == (
        "spiffe://example.org/bad",
        rejection(bad, "key_mismatch"),
    )
    assert isinstance(second, X509Svid) and second.serial == good.serial


async def test_bundle_maps_are_keyed_by_trust_domain_id(
    agent: FakeAgent, sockdir: Path, ca: Authority, other_ca: Authority
) -> None:
    agent.set_bundles(ca.bundle, other_ca.bundle)
    agent.set_jwt_bundles({"spiffe://example.org": b'{"keys": []}'})
    async with DelegatedIdentityClient(address(sockdir)) as client:
        bundles = await anext(client.x509_bundles())
        jwt = await anext(client.jwt_bundles())
    assert bundles == BundleSet([ca.bundle, other_ca.bundle])
    assert list(jwt) == [TrustDomain("example.org")]


async def test_fetch_jwt_svids_converts_each_token(
    agent: FakeAgent, sockdir: Path, ca: Authority
) -> None:
    sid = ca.spiffe_id("/web")
    token = sign_jwt_svid(ec.generate_private_key(ec.SECP256R1()), "k1", sid, ["db"], 300)
    agent.jwt_svids[PID] = [
        pb.JWTSVID(
            token=token,
            id=pb.SPIFFEID(trust_domain="example.org", path="/web"),
            expires_at=int(time.time()) + 300,
            hint="h",
        )
    ]
    async with DelegatedIdentityClient(address(sockdir)) as client:
        (svid,) = await client.fetch_jwt_svids(PID, ["db"])
    assert (svid.spiffe_id, svid.token, svid.hint) == (sid, token, "h")
    assert abs(svid.expiry - dt.datetime.now(dt.UTC) - dt.timedelta(seconds=300)) < dt.timedelta(
        seconds=5
    )
    assert list(agent.requests[0].message.audience) == ["db"]


async def test_a_delegate_not_authorized_is_denied_with_spires_reason(
    agent: FakeAgent, sockdir: Path
) -> None:
    agent.authorized = False
    async with DelegatedIdentityClient(address(sockdir)) as client:
        with pytest.raises(WorkloadApiDenied) as denied:
            await anext(client.x509_svids(PID))
        with pytest.raises(WorkloadApiDenied) as jwt_denied:
            await client.fetch_jwt_svids(PID, ["db"])
    assert str(denied.value) == f"permission denied: {NOT_DELEGATE}"
    assert str(jwt_denied.value) == f"permission denied: {NOT_DELEGATE}"


async def test_an_agent_that_does_not_know_the_pid_field_is_a_misconfiguration(
    agent: FakeAgent, sockdir: Path
) -> None:
    agent.knows_pid = False  # it sees neither selectors nor a pid
    async with DelegatedIdentityClient(address(sockdir)) as client:
        with pytest.raises(WorkloadApiMisconfigured) as invalid:
            await anext(client.x509_svids(PID))
    assert str(invalid.value) == (
        f"delegated identity API at {address(sockdir)} rejected the request as invalid: {NOT_BOTH}"
    )


async def test_jwt_svids_without_an_identity_or_audience_fail_with_spires_reasons(
    agent: FakeAgent, sockdir: Path
) -> None:
    async with DelegatedIdentityClient(address(sockdir)) as client:
        with pytest.raises(WorkloadApiDenied, match=r"^permission denied: no identity issued$"):
            await client.fetch_jwt_svids(PID, ["db"])
        with pytest.raises(WorkloadApiMisconfigured) as invalid:
            await client.fetch_jwt_svids(PID, [])
    assert str(invalid.value).endswith(
        "rejected the request as invalid: audience must be specified"
    )


async def test_a_missing_socket_is_unavailable_and_a_bad_pid_a_programming_error(
    sockdir: Path,
) -> None:
    client = DelegatedIdentityClient(f"unix://{sockdir / 'absent.sock'}")
    with pytest.raises(WorkloadApiUnavailable) as missing:
        await anext(client.x509_svids(PID))
    assert str(missing.value) == (
        f"delegated identity API at unix://{sockdir / 'absent.sock'} is unavailable: "
        "socket not found"
    )
    with pytest.raises(ValueError, match=r"^pid must be between 1 and 2147483647, got 0$"):
        await anext(client.x509_svids(0))
    client.close()


# --------------------------------------------------------------------------- the watchers


async def test_a_workload_sees_its_own_and_federated_bundles_only(
    agent: FakeAgent, sockdir: Path, ca: Authority, other_ca: Authority
) -> None:
    third = Authority("third.org")
    agent.set_bundles(ca.bundle, other_ca.bundle, third.bundle)
    web = ca.svid("/web")
    agent.set_workload(PID, svids_response([web], [TrustDomain("other.org")]))
    bundles, watcher = watchers(sockdir)
    async with running(bundles, watcher):
        ctx = await watcher.wait_ready(5)
        assert [s.serial for s in ctx.svids] == [web.serial]
        assert list(ctx.bundles) == [TrustDomain("example.org"), TrustDomain("other.org")]
        assert ctx.bundles == BundleSet([ca.bundle, other_ca.bundle])
        assert watcher.connected and bundles.connected
        assert watcher.last_error is None
        full = bundles.current()
        assert full is not None and TrustDomain("third.org") in full


async def test_an_svid_that_fails_verification_keeps_the_last_good(
    agent: FakeAgent,
    sockdir: Path,
    ca: Authority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent.set_bundles(ca.bundle)
    good = ca.svid("/web")
    agent.set_workload(PID, svids_response([good]))
    bundles, watcher = watchers(sockdir)
    notified: list[int] = []
    watcher.subscribe(lambda: notified.append(1))
    async with running(bundles, watcher):
        await eventually(lambda: serials(watcher) == [good.serial], 5, "the first SVID")
        stranger = Authority("example.org").svid("/web")  # same ID, another CA
        before = len(notified)
        agent.set_workload(PID, svids_response([stranger]))
        lines = await eventually(
            lambda: event_lines(caplog, "sds.workloadapi", "svid.rejected"), 5, "a rejection"
        )
        assert serials(watcher) == [good.serial]
        assert len(notified) == before  # nothing changed for the listeners
    assert "spiffe_id=spiffe://example.org/web" in lines[0]
    assert "chain does not lead to the example.org bundle" in lines[0]
    assert f"kept the last good SVID (serial {good.serial:x}" in lines[0]


async def test_a_bundle_change_re_evaluates_without_a_new_svid_message(
    agent: FakeAgent, sockdir: Path, ca: Authority
) -> None:
    rotated = Authority("example.org")  # the trust domain's next CA, not yet in the bundle
    agent.set_bundles(ca.bundle)
    svid = rotated.svid("/web")
    agent.set_workload(PID, svids_response([svid]))
    bundles, watcher = watchers(sockdir)
    async with running(bundles, watcher):
        ctx = await watcher.wait_ready(5)
        assert ctx.svids == ()  # rejected: no bundle it chains to
        agent.set_bundles(X509Bundle(ca.trust_domain, (ca.cert, rotated.cert)))
        await eventually(lambda: serials(watcher) == [svid.serial], 5, "re-evaluation")
        assert agent.count("SubscribeToX509SVIDs") == 1


async def test_identical_messages_and_jwt_bundle_changes_do_not_notify(
    agent: FakeAgent, sockdir: Path, ca: Authority
) -> None:
    agent.set_bundles(ca.bundle)
    svid = ca.svid("/web")
    agent.set_workload(PID, svids_response([svid]))
    bundles, watcher = watchers(sockdir)
    notified: list[int] = []
    watcher.subscribe(lambda: notified.append(1))
    async with running(bundles, watcher):
        await watcher.wait_ready(5)
        await eventually(lambda: watcher.connected, 5, "connected")
        before = len(notified)
        agent.set_workload(PID, svids_response([svid]))
        agent.set_jwt_bundles({"spiffe://example.org": b'{"keys": []}'})
        await eventually(bundles.jwt_bundles, 5, "the JWT bundles")
        agent.set_bundles(ca.bundle)
        fresh = ca.svid("/web")
        agent.set_workload(PID, svids_response([fresh]))  # a real change, to fence the above
        await eventually(lambda: serials(watcher) == [fresh.serial], 5, "the rotation")
        assert len(notified) == before + 1


async def test_the_watchers_reconnect_after_the_agent_restarts(
    agent: FakeAgent, sockdir: Path, ca: Authority
) -> None:
    agent.set_bundles(ca.bundle)
    first = ca.svid("/web")
    agent.set_workload(PID, svids_response([first]))
    bundles, watcher = watchers(sockdir)
    async with running(bundles, watcher):
        await eventually(lambda: serials(watcher) == [first.serial], 5, "the first SVID")
        await agent.stop()
        await eventually(lambda: not watcher.connected and not bundles.connected, 5, "down")
        assert isinstance(watcher.last_error, WorkloadApiUnavailable)
        assert serials(watcher) == [first.serial]  # kept while unexpired
        restarted = FakeAgent()
        restarted.set_bundles(ca.bundle)
        second = ca.svid("/web")
        restarted.set_workload(PID, svids_response([second]))
        await restarted.start(sockdir / "admin.sock")
        try:
            await eventually(lambda: serials(watcher) == [second.serial], 5, "the new SVID")
            assert watcher.connected and bundles.connected and watcher.last_error is None
        finally:
            await restarted.stop()


async def test_workload_watchers_wake_when_the_shared_bundle_watch_reconnects(
    agent: FakeAgent, sockdir: Path, ca: Authority
) -> None:
    agent.set_bundles(ca.bundle)
    agent.set_workload(PID, svids_response([ca.svid("/web")]))
    bundles = DelegatedBundles(address(sockdir), backoff_initial=0.01, backoff_max=0.2)
    # Its own backoff would wait up to 60 s; the bundle watch's socket wake-up cuts it short.
    watcher = DelegatedWatcher(
        address(sockdir), PID, bundles, backoff_initial=60.0, backoff_max=60.0
    )
    async with running(bundles, watcher):
        await watcher.wait_ready(5)
        await agent.stop()
        await eventually(lambda: not watcher.connected, 5, "down")
        restarted = FakeAgent()
        restarted.set_bundles(ca.bundle)
        second = ca.svid("/web")
        restarted.set_workload(PID, svids_response([second]))
        await restarted.start(sockdir / "admin.sock")
        try:
            await eventually(lambda: serials(watcher) == [second.serial], 5, "the new SVID")
        finally:
            await restarted.stop()


async def test_an_agent_that_never_answers_is_dropped_and_retried(
    sockdir: Path, ca: Authority
) -> None:
    class Silent(FakeAgent):
        async def SubscribeToX509Bundles(self, stream: Stream[Any, Any]) -> None:
            await self._begin(stream, "SubscribeToX509Bundles")
            await asyncio.sleep(3600)

    silent = Silent()
    await silent.start(sockdir / "admin.sock")
    bundles = DelegatedBundles(
        address(sockdir), backoff_initial=0.01, backoff_max=0.02, first_message_timeout=0.2
    )
    try:
        async with running(bundles):
            await eventually(lambda: silent.count("SubscribeToX509Bundles") >= 2, 5, "a retry")
            assert str(bundles.last_error) == (
                f"delegated identity API at {address(sockdir)} sent no X.509 bundle message "
                "within 0.2s of connecting"
            )
            assert bundles.current() is None and not bundles.connected
        first, second = silent.transports["SubscribeToX509Bundles"][:2]
        assert first is not second  # the hung connection was replaced
    finally:
        await silent.stop()


async def test_denial_withdraws_the_svids_and_keeps_the_bundles(
    agent: FakeAgent, sockdir: Path, ca: Authority, other_ca: Authority
) -> None:
    agent.set_bundles(ca.bundle, other_ca.bundle)
    agent.set_workload(PID, svids_response([ca.svid("/web")], [TrustDomain("other.org")]))
    bundles, watcher = watchers(sockdir)
    async with running(bundles, watcher):
        await watcher.wait_ready(5)
        agent.authorized = False
        agent.fail_streams("SubscribeToX509SVIDs", Status.PERMISSION_DENIED, NOT_DELEGATE)
        await eventually(lambda: serials(watcher) == [], 5, "withdrawal")
        ctx = watcher.current()
        assert ctx is not None and list(ctx.bundles) == [
            TrustDomain("example.org"),
            TrustDomain("other.org"),
        ]
        assert str(watcher.last_error) == f"permission denied: {NOT_DELEGATE}"


async def test_an_svid_is_withdrawn_at_its_local_expiry(
    agent: FakeAgent, sockdir: Path, ca: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    agent.set_bundles(ca.bundle)
    brief = ca.short_lived("/web", 1.0)
    agent.set_workload(PID, svids_response([brief]))
    bundles, watcher = watchers(sockdir)
    async with running(bundles, watcher):
        await eventually(lambda: serials(watcher) == [brief.serial], 5, "the SVID")
        await eventually(lambda: serials(watcher) == [], 5, "expiry")
        assert watcher.connected
    (line,) = event_lines(caplog, "sds.workloadapi", "svid.expired")
    assert f"pid={PID}" in line and "spiffe_id=spiffe://example.org/web" in line


async def test_cancelling_a_watcher_closes_its_stream_and_connection(
    agent: FakeAgent, sockdir: Path, ca: Authority
) -> None:
    agent.set_bundles(ca.bundle)
    agent.set_workload(PID, svids_response([ca.svid("/web")]))
    bundles, watcher = watchers(sockdir)
    async with running(bundles):
        task = asyncio.create_task(watcher.run())
        await watcher.wait_ready(5)
        assert agent.open_streams("SubscribeToX509SVIDs") == 1
        assert len(bundles._listeners._callbacks) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: agent.open_streams("SubscribeToX509SVIDs") == 0, 5, "closed")
        (transport,) = agent.transports["SubscribeToX509SVIDs"]
        await eventually(transport.is_closing, 5, "the watcher's connection closed")
        assert not watcher.connected
        assert bundles._listeners._callbacks == []  # no longer re-evaluated
        assert agent.open_streams("SubscribeToX509Bundles") == 1  # the shared watch goes on


async def test_an_invalid_svid_message_does_not_disturb_another_workload(
    agent: FakeAgent, sockdir: Path, ca: Authority
) -> None:
    agent.set_bundles(ca.bundle)
    web, db = ca.svid("/web"), ca.svid("/db")
    agent.set_workload(PID, svids_response([web]))
    agent.set_workload(PID + 1, svids_response([db]))
    bundles, watcher = watchers(sockdir)
    other = DelegatedWatcher(address(sockdir), PID + 1, bundles, backoff_initial=0.01)
    async with running(bundles, watcher, other):
        await eventually(lambda: serials(watcher) == [web.serial], 5, "web")
        await eventually(lambda: serials(other) == [db.serial], 5, "db")
        broken = svids_response([ca.svid("/db")])
        broken.federates_with.append("not a trust domain")
        agent.set_workload(PID + 1, broken)
        rotated = ca.svid("/web")
        agent.set_workload(PID, svids_response([rotated]))
        await eventually(lambda: serials(watcher) == [rotated.serial], 5, "web's rotation")
        assert serials(other) == [db.serial]  # kept: the broken message was rejected whole
