"""Per-caller mode in one process: a real SDS server whose streams are attested by pidfd and
served from a strict fake Delegated Identity API, one subscription per caller process."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from sds._proto import delegatedidentity_pb2 as pb
from sds._util.peercred import bind_unix_socket
from sds.bridge.callers import Callers
from sds.bridge.config import parse_config
from sds.errors import NotEntitled
from sds.spiffe.jwt import sign_jwt_svid
from sds.workloadapi.address import parse_address
from sds.xds.cache import SecretCache
from sds.xds.service import SdsServer, SdsServicer
from tests.conftest import event_lines
from tests.harness.fake_delegated import FakeAgent, svids_response
from tests.harness.fake_workload_api import eventually
from tests.harness.material import Authority
from tests.harness.sdsfake import node, sotw

X509 = "SubscribeToX509SVIDs"
BRIDGE_PID = 2**22 + 7  # a pid the fake agent knows as the bridge's
CONFIG = {
    "listen": "unix:///unused/sds.sock",
    "per_caller": {"delegated_identity_api": "unix:///replaced"},
    "policies": [
        {
            "name": "peers",
            "workloads": ["spiffe://example.org/web"],
            "allow": ["spiffe://example.org/ns/web-clients/*"],
        },
        {"name": "peers", "allow": ["spiffe://example.org/admin"]},
    ],
}


@dataclass
class World:
    agent: FakeAgent
    ca: Authority
    callers: Callers
    servicer: SdsServicer
    channel: Channel


@pytest.fixture
async def world(sockdir: Path) -> AsyncIterator[World]:
    ca = Authority()
    agent = FakeAgent()
    address = await agent.start(sockdir / "admin.sock")
    agent.set_bundles(ca.bundle)
    config = parse_config({**CONFIG, "per_caller": {"delegated_identity_api": address}}, "t")
    tasks: list[asyncio.Task[None]] = []

    def spawn(name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        tasks.append(task)
        return task

    cache = SecretCache("inst1")
    # The bridge's own pid, as the fake agent sees it: not this test process (the caller here).
    callers = Callers(
        config, [parse_address(address)], spawn, instance_id=cache.instance_id, own_pid=BRIDGE_PID
    )
    servicer = SdsServicer(cache, tenancy=callers)
    callers.streams = servicer.streams.values
    callers.start()
    server = SdsServer(servicer)
    path = str(sockdir / "sds.sock")
    await server.start(sock=bind_unix_socket(path))
    channel = Channel(path=path)
    await eventually(lambda: callers.ready, 5, "bundles from the fake agent")
    try:
        yield World(agent, ca, callers, servicer, channel)
    finally:
        channel.close()
        server.close()
        await server.wait_closed()
        callers.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await agent.stop()


async def test_a_caller_gets_its_own_svid_and_the_policy_for_its_id(world: World) -> None:
    web = world.ca.svid("/web")
    world.agent.set_workload(os.getpid(), svids_response([web]))
    async with sotw(world.channel, "inst1") as s:
        await s.send(["default", "ROOTCA", "peers", "spiffe://example.org/web"], with_node=node())
        got = await s.recv()
    assert sorted(got.secrets) == ["ROOTCA", "default", "peers", "spiffe://example.org/web"]
    assert got.serial("default") == web.serial
    matchers = got.secrets["peers"].validation_context.match_typed_subject_alt_names
    assert [(m.matcher.exact, m.matcher.prefix) for m in matchers] == [
        (None, "spiffe://example.org/ns/web-clients/")
    ]
    pids = {r.message.pid for r in world.agent.requests if r.method == X509}
    assert pids == {os.getpid(), BRIDGE_PID}


async def test_another_workloads_id_is_never_served(world: World) -> None:
    world.agent.set_workload(os.getpid(), svids_response([world.ca.svid("/web")]))
    world.agent.set_workload(os.getpid() + 1, svids_response([world.ca.svid("/db")]))
    async with sotw(world.channel, "inst1") as s:
        await s.send(["spiffe://example.org/db"], with_node=node())
        await s.expect_silence(0.5)
        await s.send(["spiffe://example.org/db", "default"], with_node=node())
        got = await s.recv()
        assert [w["spiffe_ids"] for w in world.callers.view()] == [["spiffe://example.org/web"]]
    assert sorted(got.secrets) == ["default"]
    await eventually(lambda: not world.callers.workloads, 5, "the workload to end with its stream")


async def test_streams_of_one_process_share_one_subscription_ended_by_the_last(
    world: World,
) -> None:
    world.agent.set_workload(os.getpid(), svids_response([world.ca.svid("/web")]))
    async with sotw(world.channel, "inst1") as a:
        await a.send(["default"], with_node=node("envoy-a"))
        await a.recv()
        async with sotw(world.channel, "inst1") as b:
            await b.send(["default"], with_node=node("envoy-b"))
            await b.recv()
            assert world.agent.open_streams(X509) == 2  # the caller's and the bridge's own
            assert world.agent.count(X509) == 2
            (caller,) = world.callers.view()
            assert caller["streams"] == 2
            assert caller["spiffe_ids"] == ["spiffe://example.org/web"]
            workloads = {i.workload() for i in world.servicer.streams.values()}
            assert workloads == {"spiffe://example.org/web"}
        await eventually(lambda: world.callers.view()[0]["streams"] == 1, 5, "one stream left")
        assert world.agent.open_streams(X509) == 2
    await eventually(lambda: not world.callers.workloads, 5, "the workload to end")
    await eventually(lambda: world.agent.open_streams(X509) == 1, 5, "the subscription to end")


async def test_a_rotation_reaches_the_callers_stream(world: World) -> None:
    first, second = world.ca.svid("/web"), world.ca.svid("/web")
    world.agent.set_workload(os.getpid(), svids_response([first]))
    async with sotw(world.channel, "inst1") as s:
        await s.send(["default"], with_node=node())
        assert (await s.recv()).serial("default") == first.serial
        await s.ack()
        world.agent.set_workload(os.getpid(), svids_response([second]))
        assert (await s.recv()).serial("default") == second.serial


async def test_the_process_exiting_ends_its_streams_with_unavailable(
    world: World, caplog: pytest.LogCaptureFixture, sds_debug_logs: None
) -> None:
    world.agent.set_workload(os.getpid(), svids_response([world.ca.svid("/web")]))
    async with sotw(world.channel, "inst1") as s:
        await s.send(["default"], with_node=node())
        await s.recv()
        (key,) = world.callers.workloads
        world.callers._exited(key)  # what the pidfd's readability triggers
        # The server sends UNAVAILABLE then resets (the client never half-closed); grpclib's
        # client reports either, and never another secret.
        with pytest.raises((GRPCError, StreamTerminatedError)) as caught:
            await s.recv()
    if isinstance(caught.value, GRPCError):
        assert caught.value.status is Status.UNAVAILABLE
    reason = f"the attested process (pid {os.getpid()}) exited"
    assert event_lines(caplog, "sds.callers", "caller.ended") == [
        f'caller.ended pid={os.getpid()} workload=spiffe://example.org/web reason="{reason}"'
    ]
    assert not world.callers.workloads
    await eventually(lambda: world.agent.open_streams(X509) == 1, 5, "the subscription to end")


async def test_a_caller_without_entries_gets_nothing(world: World) -> None:
    async with sotw(world.channel, "inst1") as s:
        await s.send(["default", "ROOTCA", "ALL"], with_node=node())
        await s.expect_silence(0.5)  # no SVID: no own trust domain, so not even a bundle
        (caller,) = world.callers.view()
    assert caller["spiffe_ids"] == []
    assert caller["secrets"] == []
    assert caller["reason"].startswith("default: the Workload API holds no X.509-SVID")


async def test_tcp_callers_cannot_be_attested(world: World) -> None:
    with pytest.raises(NotEntitled) as caught:
        world.callers.acquire(None, None)
    assert str(caught.value) == (
        "per-caller mode serves only local callers on the Unix socket "
        "(a TCP peer cannot be attested)"
    )
    assert world.callers.upstreams_view()[0]["connected"] is True
    assert "callers attested: 0" in world.callers.upstreams_text()


async def test_not_a_delegate_is_not_ready_with_spires_reason(sockdir: Path) -> None:
    agent = FakeAgent(authorized=False)
    address = await agent.start(sockdir / "admin.sock")
    config = parse_config({**CONFIG, "per_caller": {"delegated_identity_api": address}}, "t")
    tasks: list[asyncio.Task[None]] = []
    callers = Callers(
        config,
        [parse_address(address)],
        lambda name, work: tasks.append(asyncio.create_task(work)) or tasks[-1],
        instance_id="i",
        own_pid=BRIDGE_PID,
    )
    callers.start()
    try:
        await eventually(lambda: callers.bundles[0].last_error is not None, 5, "a refusal")
        assert not callers.ready
        assert "caller not configured as an authorized delegate" in callers.readiness_reason()
        assert callers.readiness_reason().startswith(f"Delegated Identity API {address}: ")
    finally:
        callers.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await agent.stop()


async def test_metrics_name_each_caller_and_the_earliest_expiry(world: World) -> None:
    from sds.bridge.metrics import Metrics

    web = world.ca.svid("/web")
    world.agent.set_workload(os.getpid(), svids_response([web]))
    metrics = Metrics()
    metrics.watch_callers(world.callers.states)
    assert "sds_callers 0.0" in metrics.render().decode()
    async with sotw(world.channel, "inst1") as s:
        await s.send(["default"], with_node=node())
        await s.recv()
        text = metrics.render().decode()
    assert "sds_callers 1.0" in text
    assert 'sds_caller_streams{workload="spiffe://example.org/web"} 1.0' in text
    line = next(
        ln for ln in text.splitlines() if ln.startswith("sds_caller_svid_not_after_timestamp")
    )
    assert line.startswith('sds_caller_svid_not_after_timestamp_seconds{spiffe_id="spiffe://')
    assert float(line.split()[-1]) == web.not_after.timestamp()


async def test_the_bridges_own_identity_is_never_served(
    world: World, caplog: pytest.LogCaptureFixture, sds_debug_logs: None
) -> None:
    bridge_svid, web = world.ca.svid("/sds-bridge"), world.ca.svid("/web")
    world.agent.set_workload(BRIDGE_PID, svids_response([bridge_svid]))
    await eventually(
        lambda: world.callers.own_ids() == {"spiffe://example.org/sds-bridge"}, 5, "own ID"
    )
    # A caller attested like the bridge (e.g. the same uid) holds the delegate's ID and its own.
    world.agent.set_workload(os.getpid(), svids_response([bridge_svid, web]))
    async with sotw(world.channel, "inst1") as s:
        await s.send(["default", "spiffe://example.org/sds-bridge"], with_node=node())
        got = await s.recv()
        assert sorted(got.secrets) == ["default"]
        assert got.serial("default") == web.serial
        await s.ack()
        await s.expect_silence(0.3)
    assert event_lines(caplog, "sds.callers", "caller.withheld") == [
        f"caller.withheld pid={os.getpid()} spiffe_ids=spiffe://example.org/sds-bridge "
        "reason=\"the bridge's own identity (the delegate's) is never served to callers\""
    ]


async def test_jwt_svids_are_fetched_by_the_callers_pid(world: World) -> None:
    web = world.ca.svid("/web")
    world.agent.set_workload(os.getpid(), svids_response([web]))
    token = sign_jwt_svid(ec.generate_private_key(ec.SECP256R1()), "k1", web.spiffe_id, ["db"], 300)
    world.agent.jwt_svids[os.getpid()] = [
        pb.JWTSVID(
            token=token,
            id=pb.SPIFFEID(trust_domain="example.org", path="/web"),
            expires_at=int(time.time()) + 300,
        )
    ]
    async with sotw(world.channel, "inst1") as s:
        await s.send(["default", "jwt-svid:db"], with_node=node())
        got = await s.recv()
        if "jwt-svid:db" not in got.secrets:  # the token is fetched on demand, after default
            await s.ack()
            got = await s.recv()
    secret = got.secrets["jwt-svid:db"].generic_secret.secret.inline_string
    assert secret == f"Bearer {token}"
    (request,) = [r for r in world.agent.requests if r.method == "FetchJWTSVIDs"]
    assert request.message.pid == os.getpid()
    assert list(request.message.audience) == ["db"]


async def test_callers_beyond_max_callers_are_refused_resource_exhausted(
    world: World, caplog: pytest.LogCaptureFixture, sds_logs_reach_caplog: None
) -> None:
    world.callers.config = parse_config(
        {**CONFIG, "per_caller": {"delegated_identity_api": "unix:///x", "max_callers": 1}}, "t"
    )
    world.agent.set_workload(os.getpid(), svids_response([world.ca.svid("/web")]))
    # Another caller process holds the only place (stands in for one: a key no process has).
    world.callers.workloads[(2**22 + 99, 1)] = None  # type: ignore[assignment]
    try:
        async with sotw(world.channel, "inst1") as s:
            await s.send(["default"], with_node=node())
            with pytest.raises((GRPCError, StreamTerminatedError)) as caught:
                await s.recv()
    finally:
        del world.callers.workloads[(2**22 + 99, 1)]
    if isinstance(caught.value, GRPCError):
        assert caught.value.status is Status.RESOURCE_EXHAUSTED
    (line,) = event_lines(caplog, "sds.server", "sds.too_many_callers")
    assert line == (
        f'sds.too_many_callers pid={os.getpid()} reason="1 caller processes are attested '
        f'already (per_caller.max_callers: 1); pid {os.getpid()} refused"'
    )
    assert world.agent.count(X509) == 1  # only the bridge's own: no subscription for the refused
    # Once a place is free the same process is served.
    async with sotw(world.channel, "inst1") as s:
        await s.send(["default"], with_node=node())
        assert "default" in (await s.recv()).secrets
