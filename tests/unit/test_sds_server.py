"""SDS server unit tests: an in-process server fed fixed material, driven by a strict fake Envoy."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryResponse
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from sds._util.peercred import bind_unix_socket
from sds.bridge.config import BridgeConfig, parse_config
from sds.bridge.metrics import Metrics
from sds.bridge.state import Bridge
from sds.provider.ca import LocalCA
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.x509 import BundleSet, X509Context
from sds.xds.cache import SecretCache
from sds.xds.codec import sotw_response
from sds.xds.service import AccessPolicy, SdsServer, SdsServicer, SharedCache
from tests.harness.fake_workload_api import eventually
from tests.harness.sdsfake import delta, fetch, node, sotw
from tests.harness.static_upstream import StaticSource

TD = TrustDomain("example.org")
FED = TrustDomain("partner.test")
HOUR = dt.timedelta(hours=1)


@dataclass
class World:
    ca: LocalCA
    fed_ca: LocalCA
    source: StaticSource
    bridge: Bridge
    servicer: SdsServicer
    metrics: Metrics
    channel: Channel
    instance: str

    def context(
        self, *paths: str, hints: tuple[str, ...] = (), federated: bool = True
    ) -> X509Context:
        svids = tuple(
            self.ca.issue_x509_svid(
                SpiffeId.from_path(TD, p), HOUR, hint=hints[i] if i < len(hints) else ""
            )
            for i, p in enumerate(paths)
        )
        bundles = [self.ca.bundle] + ([self.fed_ca.bundle] if federated else [])
        return X509Context(svids, BundleSet(bundles))


CONFIG = """
secrets:
  - name: by-hint
    hint: internal
policies:
  - name: frontends
    allow: [spiffe://example.org/frontend, spiffe://example.org/ns/prod/*]
  - name: partners
    trust_domains: [partner.test, example.org]
    allow: [spiffe://partner.test/api]
"""


@pytest.fixture
async def world(sockdir: Path) -> AsyncIterator[World]:
    import yaml

    ca = LocalCA.ephemeral(TD)
    fed_ca = LocalCA.ephemeral(FED)
    source = StaticSource(None)
    config = parse_config(yaml.safe_load(CONFIG), "test.yaml")
    metrics = Metrics()
    bridge = Bridge(config, [source], cache=SecretCache("inst1"), metrics=metrics)
    servicer = SdsServicer(bridge.cache, events=metrics)
    server = SdsServer(servicer)
    path = str(sockdir / "sds.sock")
    await server.start(sock=bind_unix_socket(path))
    channel = Channel(path=path)
    w = World(ca, fed_ca, source, bridge, servicer, metrics, channel, "inst1")
    source.set(w.context("/web", "/api", hints=("", "internal")))
    yield w
    channel.close()
    server.close()
    await server.wait_closed()


async def test_socket_is_private(sockdir: Path) -> None:
    sock = bind_unix_socket(str(sockdir / "x.sock"))
    try:
        assert os.stat(sockdir / "x.sock").st_mode & 0o777 == 0o600
    finally:
        sock.close()


async def test_new_stream_gets_every_requested_name_at_once(world: World) -> None:
    names = [
        "default",
        "ROOTCA",
        "ALL",
        "spiffe://example.org/api",
        "spiffe://partner.test",
        "by-hint",
        "frontends",
        "partners",
    ]
    async with sotw(world.channel, world.instance) as s:
        await s.send(names, nonce="stale-from-a-previous-bridge", with_node=node())
        got = await s.recv()
    assert sorted(got.secrets) == sorted(names)
    web, api = world.source.ctx.svids  # type: ignore[union-attr]
    assert got.serial("default") == web.serial
    assert got.serial("spiffe://example.org/api") == api.serial
    assert got.serial("by-hint") == api.serial
    assert got.trust_domains("ROOTCA") == ["example.org"]
    assert got.trust_domains("ALL") == ["example.org", "partner.test"]
    assert got.trust_domains("spiffe://partner.test") == ["partner.test"]
    assert got.trust_domains("partners") == ["partner.test", "example.org"]
    matchers = got.secrets["frontends"].validation_context.match_typed_subject_alt_names
    assert [(m.matcher.exact, m.matcher.prefix) for m in matchers] == [
        ("spiffe://example.org/frontend", None),
        (None, "spiffe://example.org/ns/prod/"),
    ]


async def test_unknown_name_is_not_answered_and_stream_stays_open(world: World) -> None:
    async with sotw(world.channel, world.instance) as s:
        await s.send(["spiffe://example.org/later", "file-cert:/etc/x"])
        await s.expect_silence()
        # The name appears upstream: now it is served on the same stream.
        world.source.set(world.context("/web", "/later"))
        got = await s.recv()
        assert list(got.secrets) == ["spiffe://example.org/later"]


async def test_rotation_pushes_only_to_streams_that_need_it(world: World) -> None:
    async with (
        sotw(world.channel, world.instance) as cert,
        sotw(world.channel, world.instance) as ca,
    ):
        await cert.send(["default"])
        first = await cert.recv()
        await cert.ack()
        await ca.send(["ROOTCA"])
        await ca.recv()
        await ca.ack()
        world.source.set(world.context("/web", "/api", hints=("", "internal")))
        second = await cert.recv()
        assert second.serial("default") != first.serial("default")
        assert second.version != first.version
        await ca.expect_silence()


async def test_stale_nonce_is_ignored_and_nack_is_not_answered(world: World) -> None:
    async with sotw(world.channel, world.instance) as s:
        await s.send(["default"])
        first = await s.recv()
        # A request for other names that answers an older nonce is stale: ignored.
        await s.send(["default", "ROOTCA"], nonce="not-the-last-nonce")
        await s.expect_silence()
        # NACK of the current response: counted, not answered with the same content.
        await s.send(["default"], error="certificate rejected by test")
        await s.expect_silence()
        assert world.metrics.nacks.labels("")._value.get() == 1
        # Fresh content is still pushed after a NACK.
        world.source.set(world.context("/web"))
        assert (await s.recv()).serial("default") != first.serial("default")


async def test_ack_is_recorded_per_envoy(world: World) -> None:
    async with sotw(world.channel, world.instance) as s:
        await s.send(["default"], with_node=node("front-envoy"))
        got = await s.recv()
        await s.ack()
        for _ in range(100):
            infos = [i for i in world.servicer.streams.values() if i.acked_version]
            if infos:
                break
            await asyncio.sleep(0.01)
        (info,) = infos
        assert info.node_id == "front-envoy"
        assert info.acked_version == got.version
        assert info.acked_serials == {"default": f"{got.serial('default'):x}"}
        assert info.creds is not None and info.creds.pid == os.getpid()
        metrics = world.metrics.render().decode()
        assert (
            f'sds_envoy_acked_info{{node="front-envoy",secret="default",serial="{got.serial("default"):x}"'
            in metrics
        )


async def test_node_metadata_selects_trusted_ca(world: World) -> None:
    async with sotw(world.channel, world.instance) as s:
        await s.send(["ALL"], with_node=node(disable_spiffe_cert_validation="true"))
        got = await s.recv()
    context = got.secrets["ALL"].validation_context
    assert context.custom_validator_config is None
    assert context.trusted_ca.inline_bytes.count(b"BEGIN CERTIFICATE") == 2


async def test_federated_bundle_removal_rebuilds_validation_contexts(world: World) -> None:
    async with sotw(world.channel, world.instance) as s:
        await s.send(["ALL"])
        assert (await s.recv()).trust_domains("ALL") == ["example.org", "partner.test"]
        await s.ack()
        world.source.set(world.context("/web", federated=False))
        assert (await s.recv()).trust_domains("ALL") == ["example.org"]
    metrics = world.metrics.render().decode()
    assert 'sds_bundle_present{trust_domain="partner.test"} 0.0' in metrics
    assert 'sds_bundle_present{trust_domain="example.org"} 1.0' in metrics


async def test_delta_subscribe_rotate_unsubscribe_and_removal(world: World) -> None:
    async with delta(world.channel, world.instance) as d:
        await d.send(["default", "ROOTCA", "spiffe://partner.test"], with_node=node())
        got = await d.recv()
        assert sorted(got.secrets) == ["ROOTCA", "default", "spiffe://partner.test"]
        await d.send(nonce=got.nonce)
        # Rotation sends only the changed TLS certificate.
        world.source.set(world.context("/web", "/api", hints=("", "internal")))
        rotated = await d.recv()
        assert list(rotated.secrets) == ["default"]
        await d.send(nonce=rotated.nonce)
        # The federated trust domain disappears (same SVIDs): removed explicitly.
        svids = world.source.ctx.svids  # type: ignore[union-attr]
        world.source.set(X509Context(svids, BundleSet([world.ca.bundle])))
        gone = await d.recv()
        assert gone.removed == ["spiffe://partner.test"]
        assert gone.secrets == {}
        await d.send(unsubscribe=["default"], nonce=gone.nonce)
        # Only "default" changes now, and it is no longer subscribed: nothing is sent.
        world.source.set(world.context("/web", "/api", hints=("", "internal"), federated=False))
        await d.expect_silence()
        # The trust domain comes back: sent again, since Envoy was told it was removed.
        world.source.set(world.context("/web", "/api", hints=("", "internal")))
        back = await d.recv()
        assert list(back.secrets) == ["spiffe://partner.test"]


async def test_delta_reconnect_with_versions_from_another_instance_is_resent(world: World) -> None:
    async with delta(world.channel, world.instance) as d:
        await d.send(["default"], initial={"default": "old-instance-deadbeef"})
        got = await d.recv()
        assert list(got.secrets) == ["default"]


async def test_delta_known_current_version_is_not_resent(world: World) -> None:
    version = world.bridge.cache.resource_version("default")
    assert version is not None
    async with delta(world.channel, world.instance) as d:
        await d.send(["default"], initial={"default": version})
        await d.expect_silence()


async def test_fetch_secrets(world: World) -> None:
    response = await fetch(world.channel, ["default", "ROOTCA"])
    assert sorted(Secret.parse(r.value).name for r in response.resources) == ["ROOTCA", "default"]
    with pytest.raises(GRPCError) as info:
        await fetch(world.channel, ["nope"])
    assert info.value.status is Status.NOT_FOUND
    assert info.value.message == "no secret named nope is available"


async def test_uid_not_allowed_gets_permission_denied_and_no_secret(world: World) -> None:
    world.servicer.access = AccessPolicy(frozenset({os.getuid() + 1}))
    expected = (
        f"uid={os.getuid()} gid={os.getgid()} pid={os.getpid()} is not allowed to fetch "
        "secrets (not in allowed_uids/allowed_gids)"
    )
    # Unary: the client has half-closed, so the status always arrives intact.
    with pytest.raises(GRPCError) as info:
        await fetch(world.channel, ["default"])
    assert info.value.status is Status.PERMISSION_DENIED
    assert info.value.message == expected
    # Stream: the server answers with trailers then resets; grpclib's client may report
    # either, but it must never see a secret.
    async with sotw(world.channel, world.instance) as s:
        await s.send(["default"])
        with pytest.raises((GRPCError, StreamTerminatedError)) as streamed:
            await s.recv()
    if isinstance(streamed.value, GRPCError):
        assert streamed.value.status is Status.PERMISSION_DENIED
    assert world.metrics.denials._value.get() == 2
    # Allowing the uid again (as a SIGHUP reload would) admits the next stream.
    world.servicer.access = AccessPolicy(frozenset({os.getuid()}))
    async with sotw(world.channel, world.instance) as s:
        await s.send(["default"])
        assert "default" in (await s.recv()).secrets


async def test_expired_svid_is_withdrawn_and_readiness_drops(world: World) -> None:
    assert world.bridge.ready
    world.source.set(X509Context((), BundleSet([world.ca.bundle])))
    assert not world.bridge.ready
    assert world.bridge.cache.resource_version("default") is None
    assert world.bridge.cache.resource_version("ROOTCA") is not None


async def test_many_streams_share_one_serialization(world: World) -> None:
    cache = world.bridge.cache
    first = cache.render("default", trusted_ca=False)
    assert cache.render("default", trusted_ca=False) is first


def test_response_framing_parses_with_envoy_types() -> None:
    cache = SecretCache("abc")
    ca = LocalCA.ephemeral(TD)
    bridge = Bridge(BridgeConfig(), [StaticSource(None)], cache=cache)
    svid = ca.issue_x509_svid(SpiffeId.from_path(TD, "/w"), HOUR)
    bridge.sources[0].set(X509Context((svid,), BundleSet([ca.bundle])))  # type: ignore[attr-defined]
    body = sotw_response(cache.version, [cache.render("default", trusted_ca=False) or b""], "n-1")
    # Read back by envoy-data-plane: a second implementation of Envoy's API.
    parsed = DiscoveryResponse.parse(body.SerializeToString())
    assert parsed.version_info == cache.version and parsed.nonce == "n-1"
    assert Secret.parse(parsed.resources[0].value).name == "default"


def test_versions_are_prefixed_by_a_fresh_instance_id() -> None:
    assert SecretCache().instance_id != SecretCache().instance_id


async def test_jwt_svid_generic_secret_is_fetched_on_demand_and_refreshed(world: World) -> None:
    from sds.bridge.jwtsvids import JwtSvidManager, JwtToken

    fetched: list[tuple[str, str | None]] = []

    async def fetch(audience: str, spiffe_id: str | None) -> JwtToken:
        fetched.append((audience, spiffe_id))
        return JwtToken(f"token-{len(fetched)}", spiffe_id or "", time.time() + 2.0)

    world.bridge.jwt = JwtSvidManager(
        fetch, world.bridge.refresh, spiffe_id=world.bridge.default_spiffe_id
    )
    world.servicer.tenancy = SharedCache(world.bridge.cache, world.bridge.demand)
    try:
        async with sotw(world.channel, world.instance) as s:
            await s.send(["jwt-svid:https://api.example.org"])
            first = await s.recv()
            secret = first.secrets["jwt-svid:https://api.example.org"].generic_secret.secret
            assert secret.inline_string == "Bearer token-1"
            await s.ack()
            # Refreshed at half its 2 s lifetime, and pushed.
            second = await s.recv(timeout=5)
            secret = second.secrets["jwt-svid:https://api.example.org"].generic_secret.secret
            assert secret.inline_string == "Bearer token-2"
        assert fetched[0] == ("https://api.example.org", "spiffe://example.org/web")
    finally:
        await world.bridge.jwt.close()


async def _push_twice(world: World, stream: Any, node_id: str) -> tuple[Any, Any]:
    """Subscribe ``default`` as ``node_id``, then rotate: the first push and the second."""
    await stream.send(["default"], with_node=node(node_id))
    a = await stream.recv()
    world.source.set(world.context("/web", "/api", hints=("", "internal")))  # rotate
    b = await stream.recv()
    return a, b


def _stream_of(world: World, node_id: str) -> Callable[[], object]:
    return lambda: next(
        (i for i in world.servicer.streams.values() if i.node_id == node_id and i.nacks), None
    )


async def test_sotw_late_ack_and_nack_are_credited_to_the_push_their_nonce_names(
    world: World,
) -> None:
    async with sotw(world.channel, world.instance) as s:
        a, b = await _push_twice(world, s, "ordered-sotw")
        version_b = world.bridge.cache.resource_version("default")
        assert a.serial("default") != b.serial("default")
        # Envoy answers both pushes, in order: ACK of A, then NACK of B.
        await s.send(["default"], nonce=a.nonce, version=a.version)
        await s.send(["default"], nonce=b.nonce, version=a.version, error="B is bad")
        info = await eventually(_stream_of(world, "ordered-sotw"), what="the NACK of B")
        view = info.as_dict()
        assert view["acked_version"] == a.version
        assert view["acked_serials"] == {"default": f"{a.serial('default'):x}"}
        assert view["nacked_version"] == b.version
        assert view["rejected"] == {"default": version_b}
        assert view["nack_error"] == "B is bad"
        assert view["nacks"] == 1
        metrics = world.metrics.render().decode()
        assert (
            f'sds_envoy_acked_info{{node="ordered-sotw",secret="default",'
            f'serial="{a.serial("default"):x}",version=' in metrics
        )
        assert f'serial="{b.serial("default"):x}"' not in metrics


async def test_sotw_late_ack_of_an_older_push_does_not_regress_the_view(world: World) -> None:
    async with sotw(world.channel, world.instance) as s:
        a, b = await _push_twice(world, s, "late-ack")
        await s.send(["default"], nonce=b.nonce, version=b.version)  # ACK of B
        await s.send(["default"], nonce=a.nonce, version=a.version)  # late ACK of A
        await s.send(["default"], nonce=b.nonce, error="repeat")  # B already answered
        await s.expect_silence(0.2)
        (info,) = world.servicer.streams.values()
        assert info.acked_version == b.version
        assert info.acked_serials == {"default": f"{b.serial('default'):x}"}
        assert info.nacks == 0


async def test_delta_ack_and_nack_out_of_order_are_credited_by_nonce(world: World) -> None:
    async with delta(world.channel, world.instance) as d:
        a, b = await _push_twice(world, d, "ordered-delta")
        # NACK of B arrives before the ACK of A.
        await d.send(nonce=b.nonce, error="B is bad")
        await d.send(nonce=a.nonce)
        await eventually(
            lambda: any(i.acked_version for i in world.servicer.streams.values()), what="ACK of A"
        )
        (info,) = world.servicer.streams.values()
        view = info.as_dict()
        assert view["acked_version"] == a.version
        assert view["acked"] == {"default": a.resource_versions["default"]}
        assert view["acked_serials"] == {"default": f"{a.serial('default'):x}"}
        assert view["nacked_version"] == b.version
        assert view["rejected"] == {"default": b.resource_versions["default"]}
        metrics = world.metrics.render().decode()
        assert (
            f'sds_envoy_acked_info{{node="ordered-delta",secret="default",'
            f'serial="{a.serial("default"):x}",version="{a.resource_versions["default"]}"}} 1.0'
            in metrics
        )
        assert 'sds_nacks_total{node="ordered-delta"} 1.0' in metrics
