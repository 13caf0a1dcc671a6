"""The embedded Workload API provider: the in-process service and the ``sds workload-api`` CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from sds._proto import workload_pb2 as pb
from sds._proto.workload_grpc import SpiffeWorkloadAPIStub
from sds._util.peercred import listen_unix
from sds.provider.ca import LocalCA
from sds.provider.identities import (
    Condition,
    FederatedBundle,
    Identity,
    Rule,
    load_federated_bundle,
)
from sds.provider.service import WorkloadApiProvider
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.jwt import validate_jwt_svid
from sds.spiffe.x509 import X509Bundle, utcnow
from tests.conftest import captured_log
from tests.harness.workload_client import (
    HEADER,
    OTHER,
    THIRD,
    TIMEOUT,
    first,
    opened,
    other_ca_jwks,
    svids_of,
)

TD = TrustDomain("example.org")

ME = f"pid={os.getpid()} uid={os.getuid()} gid={os.getgid()}"

DENIED = f"no identity issued: caller {ME} matches no workload_identity rule"


def ident(name: str, path: str, *rules: Rule, **kwargs: Any) -> Identity:
    return Identity(name, SpiffeId.from_path(TD, path), rules=rules, **kwargs)


def uid_rule(operator: str, *uids: int) -> Rule:
    return Rule((Condition("workload.unix.uid", operator, frozenset(uids)),))


NOT_ME = uid_rule("not_eq", os.getuid())

ONLY_ME = uid_rule("eq", os.getuid())


@pytest.fixture
def provider_log() -> Iterator[list[str]]:
    """Messages logged on ``sds.provider`` (independent of propagation settings)."""
    with captured_log("sds.provider", logging.LogRecord.getMessage) as lines:
        yield lines


Serve = Callable[..., Awaitable[tuple[WorkloadApiProvider, SpiffeWorkloadAPIStub]]]


@pytest.fixture
async def serve(sockdir: Path) -> AsyncIterator[Serve]:
    """Start in-process providers (ephemeral CA) with a grpclib client each."""
    running: list[tuple[WorkloadApiProvider, Channel]] = []

    async def start(
        identities: list[Identity],
        federation: tuple[FederatedBundle, ...] = (),
        ca: LocalCA | None = None,
        **kwargs: Any,
    ) -> tuple[WorkloadApiProvider, SpiffeWorkloadAPIStub]:
        provider = WorkloadApiProvider(
            ca or LocalCA.ephemeral(TD), identities, federation, **kwargs
        )
        path = str(sockdir / f"p{len(running)}.sock")
        await provider.start(listen_unix(path))
        channel = Channel(path=path)
        running.append((provider, channel))
        return provider, SpiffeWorkloadAPIStub(channel)

    yield start
    for provider, channel in running:
        channel.close()
        await provider.close()


async def status_of(call: Awaitable[Any]) -> tuple[Status, str | None]:
    with pytest.raises(GRPCError) as info:
        async with asyncio.timeout(TIMEOUT):
            await call
    return info.value.status, info.value.message


CALLS: dict[str, Callable[[SpiffeWorkloadAPIStub, Any], Awaitable[Any]]] = {
    "FetchX509SVID": lambda stub, md: first(stub.FetchX509SVID, pb.X509SVIDRequest(), md),
    "FetchX509Bundles": lambda stub, md: first(stub.FetchX509Bundles, pb.X509BundlesRequest(), md),
    "FetchJWTBundles": lambda stub, md: first(stub.FetchJWTBundles, pb.JWTBundlesRequest(), md),
    "FetchJWTSVID": lambda stub, md: stub.FetchJWTSVID(
        pb.JWTSVIDRequest(audience=["a"]), metadata=md
    ),
    "ValidateJWTSVID": lambda stub, md: stub.ValidateJWTSVID(
        pb.ValidateJWTSVIDRequest(audience="a", svid="x.y.z"), metadata=md
    ),
}


@pytest.mark.parametrize("method", sorted(CALLS))
@pytest.mark.parametrize("metadata", [None, {"workload.spiffe.io": "false"}])
async def test_missing_security_header_is_invalid_argument(
    serve: Serve, method: str, metadata: Any
) -> None:
    _, stub = await serve([ident("web", "/web")])
    status, message = await status_of(CALLS[method](stub, metadata))
    assert (status, message) == (Status.INVALID_ARGUMENT, "security header missing from request")


@pytest.mark.parametrize("method", sorted(CALLS))
async def test_caller_matching_no_rule_is_denied_everywhere(
    serve: Serve, method: str, provider_log: list[str]
) -> None:
    _, stub = await serve([ident("web", "/web", NOT_ME), ident("db", "/db", NOT_ME)])
    status, message = await status_of(CALLS[method](stub, HEADER))
    assert (status, message) == (Status.PERMISSION_DENIED, DENIED)
    assert f'workload.denied method={method} {ME} reason="matches no workload_identity rule"' in (
        provider_log
    )


async def test_tcp_caller_has_no_credentials_and_is_denied(provider_log: list[str]) -> None:
    provider = WorkloadApiProvider(LocalCA.ephemeral(TD), [ident("web", "/web")])
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    port = sock.getsockname()[1]
    await provider.start(sock)
    channel = Channel("127.0.0.1", port)
    try:
        status, message = await status_of(
            first(SpiffeWorkloadAPIStub(channel).FetchX509SVID, pb.X509SVIDRequest())
        )
    finally:
        channel.close()
        await provider.close()
    assert status == Status.PERMISSION_DENIED
    assert message == "no identity issued: caller has no peer credentials (not a Unix socket)"
    assert 'workload.denied method=FetchX509SVID reason="not a Unix socket peer"' in provider_log


async def test_x509_svids_follow_file_order_with_hints_sans_and_bundle(
    serve: Serve, provider_log: list[str]
) -> None:
    identities = [
        ident("web", "/svc/web", ONLY_ME, hint="web", dns_sans=("web.local",), ip_sans=("::1",)),
        ident("hidden", "/svc/hidden", NOT_ME, hint="hidden"),
        ident("db", "/svc/db", hint="db", x509_ttl=dt.timedelta(minutes=10)),
        ident("db-again", "/svc/db2", hint="db"),  # duplicate hint: first one wins
        ident("plain", "/svc/plain"),
    ]
    provider, stub = await serve(identities, x509_ttl=dt.timedelta(minutes=30))
    before = utcnow()
    response = await first(stub.FetchX509SVID, pb.X509SVIDRequest())
    svids = svids_of(response)
    assert [str(s.spiffe_id) for s in svids] == [
        "spiffe://example.org/svc/web",
        "spiffe://example.org/svc/db",
        "spiffe://example.org/svc/plain",
    ]
    assert [s.hint for s in response.svids] == ["web", "db", ""]
    assert all(s.bundle == provider.ca.bundle.der() for s in response.svids)
    assert dict(response.federated_bundles) == {}
    for svid in svids:
        svid.verify(X509Bundle.from_der(TD, response.svids[0].bundle))
    assert svids[0].dns_sans() == ["web.local"] and svids[0].ip_sans() == ["::1"]
    lifetimes = [(s.not_after - before).total_seconds() for s in svids]
    assert 1780 < lifetimes[0] <= 1801  # provider default 30m
    assert 580 < lifetimes[1] <= 601  # per-identity maximum_ttl 10m
    issued = [line for line in provider_log if line.startswith("svid.issued kind=x509")]
    assert len(issued) == 3
    assert issued[0] == (
        f"svid.issued kind=x509 identity=web spiffe_id=spiffe://example.org/svc/web "
        f"serial={svids[0].serial:x} "
        f"expires={svids[0].not_after.strftime('%Y-%m-%dT%H:%M:%SZ')} {ME}"
    )


async def test_each_stream_gets_its_own_svids(serve: Serve) -> None:
    _, stub = await serve([ident("web", "/web")])
    one = await first(stub.FetchX509SVID, pb.X509SVIDRequest())
    two = await first(stub.FetchX509SVID, pb.X509SVIDRequest())
    assert svids_of(one)[0].serial != svids_of(two)[0].serial


async def test_federated_bundles_appear_on_every_stream(serve: Serve, tmp_path: Path) -> None:
    other, third = LocalCA.ephemeral(OTHER), LocalCA.ephemeral(THIRD)
    (tmp_path / "other.pem").write_bytes(other.bundle.pem())
    (tmp_path / "third.json").write_bytes(other_ca_jwks(third))
    federation = (
        load_federated_bundle(OTHER, tmp_path / "other.pem"),
        load_federated_bundle(THIRD, tmp_path / "third.json"),
    )
    provider, stub = await serve([ident("web", "/web")], federation)
    own = provider.ca
    svid_response = await first(stub.FetchX509SVID, pb.X509SVIDRequest())
    assert dict(svid_response.federated_bundles) == {
        "spiffe://other.org": other.bundle.der(),
        "spiffe://third.org": third.bundle.der(),
    }
    bundles = await first(stub.FetchX509Bundles, pb.X509BundlesRequest())
    assert dict(bundles.bundles) == {
        "spiffe://example.org": own.bundle.der(),
        "spiffe://other.org": other.bundle.der(),
        "spiffe://third.org": third.bundle.der(),
    }
    jwt_bundles = await first(stub.FetchJWTBundles, pb.JWTBundlesRequest())
    assert dict(jwt_bundles.bundles) == {
        "spiffe://example.org": own.jwt_bundle.to_jwks(),
        "spiffe://third.org": third.jwt_bundle.to_jwks(),
    }


async def test_reload_pushes_only_what_changed(serve: Serve, tmp_path: Path) -> None:
    other = LocalCA.ephemeral(OTHER)
    (tmp_path / "other.pem").write_bytes(other.bundle.pem())
    federated = load_federated_bundle(OTHER, tmp_path / "other.pem")
    web = ident("web", "/web", hint="web")
    provider, stub = await serve([web])
    async with (
        opened(stub.FetchX509SVID, pb.X509SVIDRequest()) as svids,
        opened(stub.FetchX509Bundles, pb.X509BundlesRequest()) as bundles,
        opened(stub.FetchJWTBundles, pb.JWTBundlesRequest()) as jwt_bundles,
    ):
        async with asyncio.timeout(TIMEOUT):
            initial = await svids.recv_message()
            assert len((await bundles.recv_message()).bundles) == 1
            assert len((await jwt_bundles.recv_message()).bundles) == 1

            # Same configuration again: nothing to push. Then a new identity:
            # the next message carries it, and the existing SVID is kept.
            provider.reload([web], ())
            provider.reload([web, ident("db", "/db", hint="db")], ())
            grown = await svids.recv_message()
            assert [s.hint for s in grown.svids] == ["web", "db"]
            assert grown.svids[0].x509_svid == initial.svids[0].x509_svid

            # Federation only changes the X.509 side: the JWT bundle stream
            # stays quiet, so its next message is the later JWT change.
            provider.reload(provider.identities, (federated,))
            changed = await bundles.recv_message()
            assert sorted(changed.bundles) == ["spiffe://example.org", "spiffe://other.org"]
            with_fed = await svids.recv_message()
            assert dict(with_fed.federated_bundles) == {"spiffe://other.org": other.bundle.der()}
            assert with_fed.svids[1].x509_svid == grown.svids[1].x509_svid
            jwt_only = FederatedBundle(OTHER, None, other.jwt_bundle)
            provider.reload(provider.identities, (jwt_only,))
            jwt_changed = await jwt_bundles.recv_message()
            assert sorted(jwt_changed.bundles) == ["spiffe://example.org", "spiffe://other.org"]

            # Losing every identity ends each stream with PERMISSION_DENIED.
            provider.reload([ident("web", "/web", NOT_ME)], ())
            for stream in (svids, bundles, jwt_bundles):
                with pytest.raises(GRPCError) as info:
                    while await stream.recv_message() is not None:
                        pass
                    await stream.recv_trailing_metadata()
                assert (info.value.status, info.value.message) == (
                    Status.PERMISSION_DENIED,
                    DENIED,
                )


async def test_expiring_identity_is_capped_and_then_withdrawn(serve: Serve) -> None:
    expires = utcnow() + dt.timedelta(seconds=2)
    _, stub = await serve([ident("temp", "/temp", expires=expires), ident("web", "/web")])
    async with opened(stub.FetchX509SVID, pb.X509SVIDRequest()) as stream:
        async with asyncio.timeout(TIMEOUT):
            response = await stream.recv_message()
            temp = svids_of(response)[0]
            assert str(temp.spiffe_id) == "spiffe://example.org/temp"
            assert temp.not_after <= expires
            while len(response.svids) == 2:
                response = await stream.recv_message()
    assert [s.spiffe_id for s in response.svids] == ["spiffe://example.org/web"]


async def test_fetch_jwt_svid_issues_per_identity_with_ttls(
    serve: Serve, provider_log: list[str]
) -> None:
    provider, stub = await serve(
        [
            ident("web", "/web", hint="web", jwt_ttl=dt.timedelta(minutes=1)),
            ident("hidden", "/hidden", NOT_ME),
            ident("db", "/db"),
        ]
    )
    response = await stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["a1", "a2"]), metadata=HEADER)
    assert [(s.spiffe_id, s.hint) for s in response.svids] == [
        ("spiffe://example.org/web", "web"),
        ("spiffe://example.org/db", ""),
    ]
    bundles = {TD: provider.ca.jwt_bundle}
    web, db = (validate_jwt_svid(s.svid, "a2", bundles) for s in response.svids)
    assert web.claims["aud"] == ["a1", "a2"]
    assert web.claims["exp"] - web.claims["iat"] == 60
    assert db.claims["exp"] - db.claims["iat"] == 300  # default 5m
    expires = dt.datetime.fromtimestamp(web.expiry, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (
        "svid.issued kind=jwt identity=web spiffe_id=spiffe://example.org/web audience=a1,a2 "
        f"expires={expires} {ME}"
    ) in provider_log

    only = await stub.FetchJWTSVID(
        pb.JWTSVIDRequest(audience=["a"], spiffe_id="spiffe://example.org/db"), metadata=HEADER
    )
    assert [s.spiffe_id for s in only.svids] == ["spiffe://example.org/db"]


async def test_fetch_jwt_svid_by_id_reaches_an_identity_whose_hint_was_shadowed(
    serve: Serve,
) -> None:
    _, stub = await serve([ident("a", "/a", hint="h"), ident("b", "/b", hint="h")])
    every = await stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["x"]), metadata=HEADER)
    assert [s.spiffe_id for s in every.svids] == ["spiffe://example.org/a"]
    asked = await stub.FetchJWTSVID(
        pb.JWTSVIDRequest(audience=["x"], spiffe_id="spiffe://example.org/b"), metadata=HEADER
    )
    assert [(s.spiffe_id, s.hint) for s in asked.svids] == [("spiffe://example.org/b", "h")]


@pytest.mark.parametrize(
    ("request_kwargs", "expected"),
    [
        ({}, (Status.INVALID_ARGUMENT, "audience must be specified")),
        ({"audience": [""]}, (Status.INVALID_ARGUMENT, "audience must be specified")),
        (
            {"audience": ["a"], "spiffe_id": "spiffe://example.org/hidden"},
            (
                Status.PERMISSION_DENIED,
                f"no identity issued: caller {ME} is not entitled to spiffe://example.org/hidden",
            ),
        ),
        (
            {"audience": ["a"], "spiffe_id": "web"},
            (
                Status.INVALID_ARGUMENT,
                "spiffe_id is not a SPIFFE ID: SPIFFE ID 'web' must start with 'spiffe://'",
            ),
        ),
    ],
)
async def test_fetch_jwt_svid_errors(
    serve: Serve, request_kwargs: dict[str, Any], expected: tuple[Status, str]
) -> None:
    _, stub = await serve([ident("web", "/web"), ident("hidden", "/hidden", NOT_ME)])
    assert (
        await status_of(stub.FetchJWTSVID(pb.JWTSVIDRequest(**request_kwargs), metadata=HEADER))
        == expected
    )


async def test_validate_jwt_svid_own_and_federated(serve: Serve) -> None:
    other = LocalCA.ephemeral(OTHER)
    federation = (FederatedBundle(OTHER, None, other.jwt_bundle),)
    _, stub = await serve([ident("web", "/web")], federation)
    token = (
        (await stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["svc"]), metadata=HEADER))
        .svids[0]
        .svid
    )
    ok = await stub.ValidateJWTSVID(
        pb.ValidateJWTSVIDRequest(audience="svc", svid=token), metadata=HEADER
    )
    assert ok.spiffe_id == "spiffe://example.org/web"
    assert ok.claims["sub"] == "spiffe://example.org/web"
    assert list(ok.claims["aud"]) == ["svc"]

    foreign = other.issue_jwt_svid(
        SpiffeId.parse("spiffe://other.org/api"), ["svc"], dt.timedelta(minutes=1)
    )
    ok = await stub.ValidateJWTSVID(
        pb.ValidateJWTSVIDRequest(audience="svc", svid=foreign), metadata=HEADER
    )
    assert ok.spiffe_id == "spiffe://other.org/api"

    stranger = LocalCA.ephemeral(THIRD).issue_jwt_svid(
        SpiffeId.parse("spiffe://third.org/x"), ["svc"], dt.timedelta(minutes=1)
    )
    cases = [
        (pb.ValidateJWTSVIDRequest(svid=token), "audience must be specified"),
        (pb.ValidateJWTSVIDRequest(audience="svc"), "svid must be specified"),
        (
            pb.ValidateJWTSVIDRequest(audience="other", svid=token),
            "token audience ['svc'] does not include 'other'",
        ),
        (
            pb.ValidateJWTSVIDRequest(audience="svc", svid=stranger),
            "no JWT bundle for trust domain third.org",
        ),
        (
            pb.ValidateJWTSVIDRequest(audience="svc", svid="garbage"),
            "token is not a compact JWS (want header.payload.signature)",
        ),
    ]
    for request, message in cases:
        assert await status_of(stub.ValidateJWTSVID(request, metadata=HEADER)) == (
            Status.INVALID_ARGUMENT,
            message,
        )


async def test_close_removes_socket_file_and_ends_streams(sockdir: Path) -> None:
    path = str(sockdir / "c.sock")
    provider = WorkloadApiProvider(LocalCA.ephemeral(TD), [ident("web", "/web")])
    await provider.start(listen_unix(path))
    channel = Channel(path=path)
    try:
        stub = SpiffeWorkloadAPIStub(channel)
        # grpclib reports the trailers' status when the stream's context exits
        # (the connection closes right behind them).
        with pytest.raises(GRPCError) as info:
            async with (
                opened(stub.FetchX509SVID, pb.X509SVIDRequest()) as stream,
                asyncio.timeout(TIMEOUT),
            ):
                assert len((await stream.recv_message()).svids) == 1
                await provider.close()
                assert not os.path.exists(path)  # noqa: ASYNC240
                while await stream.recv_message() is not None:
                    pass
                await stream.recv_trailing_metadata()
        assert (info.value.status, info.value.message) == (
            Status.UNAVAILABLE,
            "Workload API provider is shutting down",
        )
        # The connection was closed too: the next call cannot reach anything.
        with pytest.raises((ConnectionError, OSError)):
            await first(stub.FetchX509Bundles, pb.X509BundlesRequest())
    finally:
        channel.close()
