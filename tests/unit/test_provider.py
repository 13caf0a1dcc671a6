"""The embedded Workload API provider: the in-process service and the ``sds workload-api`` CLI."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
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
from sds.spiffe.x509 import X509Bundle, X509Svid, utcnow
from tests.conftest import Processes, captured_log, wait_for
from tests.harness.asuser import run_as

TD = TrustDomain("example.org")
OTHER = TrustDomain("other.org")
THIRD = TrustDomain("third.org")
HEADER = {"workload.spiffe.io": "true"}
ME = f"pid={os.getpid()} uid={os.getuid()} gid={os.getgid()}"
DENIED = f"no identity issued: caller {ME} matches no workload_identity rule"
TIMEOUT = 10.0


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


@contextlib.asynccontextmanager
async def opened(method: Any, request: Any, metadata: Any = HEADER) -> AsyncIterator[Any]:
    """An open server stream; it is cancelled (RST_STREAM) on the way out."""
    async with method.open(metadata=metadata) as stream:
        await stream.send_message(request, end=True)
        try:
            yield stream
        finally:
            with contextlib.suppress(Exception):
                await stream.cancel()


async def first(method: Any, request: Any, metadata: Any = HEADER) -> Any:
    """Open a server stream, return its first message, and hang up."""
    async with opened(method, request, metadata) as stream, asyncio.timeout(TIMEOUT):
        return await stream.recv_message()


async def status_of(call: Awaitable[Any]) -> tuple[Status, str | None]:
    with pytest.raises(GRPCError) as info:
        async with asyncio.timeout(TIMEOUT):
            await call
    return info.value.status, info.value.message


def svids_of(response: Any) -> list[X509Svid]:
    return [
        X509Svid.parse(s.spiffe_id, s.x509_svid, s.x509_svid_key, s.hint) for s in response.svids
    ]


def other_ca_jwks(ca: LocalCA) -> bytes:
    """A SPIFFE bundle JWKS for ``ca``: its CA certificate (x509-svid) and JWT key."""
    doc = json.loads(ca.jwt_bundle.to_jwks())
    der = ca.bundle.authorities[0].public_bytes(serialization.Encoding.DER)
    doc["keys"].append(
        {"use": "x509-svid", "kty": "EC", "kid": "ca", "x5c": [base64.b64encode(der).decode()]}
    )
    return json.dumps(doc).encode()


# ---------------------------------------------------------------------------
# Security header and attestation (in-process)


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


# ---------------------------------------------------------------------------
# X.509 profile (in-process)


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


# ---------------------------------------------------------------------------
# JWT profile (in-process)


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


# ---------------------------------------------------------------------------
# The CLI, as a subprocess


WEB = (
    "kind: workload_identity\nversion: v1\nmetadata: {name: web}\n"
    "spec:\n  spiffe: {id: /svc/web, hint: web}\n"
)
DB = (
    "kind: workload_identity\nversion: v1\nmetadata: {name: db}\n"
    "spec:\n  spiffe: {id: /svc/db, hint: db}\n"
)


def write_identities(directory: Path, text: str = WEB) -> Path:
    """``directory``/ids.yaml holding ``text`` (one web identity by default)."""
    path = directory / "ids.yaml"
    path.write_text(text)
    return path


def provider_args(sock: Path, identities: Path, *extra: str) -> list[str]:
    """``sds workload-api`` arguments for trust domain example.org on ``sock``."""
    return [
        "workload-api",
        "--socket",
        str(sock),
        "--trust-domain",
        "example.org",
        "--identities",
        str(identities),
        *extra,
    ]


def start_provider(
    procs: Processes,
    sock: Path,
    identities: Path,
    *extra: str,
    timeout: float = 10.0,
    **kwargs: Any,
) -> Any:
    """Start ``sds workload-api`` (see provider_args) and wait until it logs provider.ready."""
    proc = procs.sds(*provider_args(sock, identities, *extra), name="provider", **kwargs)
    wait_for(
        lambda: "provider.ready" in procs.log(proc) or proc.poll() is not None,
        timeout,
        "provider.ready",
    )
    assert proc.poll() is None, procs.log(proc)
    return proc


def start_federated_provider(
    procs: Processes, sock: Path, directory: Path, identities: str, *extra: str, **kwargs: Any
) -> Any:
    """start_provider with ``identities`` (YAML text) and an ephemeral partner.org bundle."""
    federated = directory / "partner.pem"
    federated.write_bytes(LocalCA.ephemeral(TrustDomain("partner.org")).bundle.pem())
    ids = write_identities(directory, identities)
    federate = ("--federate", f"partner.org={federated}")
    return start_provider(procs, sock, ids, "--ephemeral", *federate, *extra, **kwargs)


async def fetch_once(sock: Path, method: str) -> Any:
    channel = Channel(path=str(sock))
    try:
        stub = SpiffeWorkloadAPIStub(channel)
        request = {
            "FetchX509SVID": pb.X509SVIDRequest,
            "FetchX509Bundles": pb.X509BundlesRequest,
            "FetchJWTBundles": pb.JWTBundlesRequest,
        }[method]()
        return await first(getattr(stub, method), request)
    finally:
        channel.close()


async def test_cli_serves_logs_ready_and_stops_on_sigterm(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path, WEB + "---\n" + DB)
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral")
    assert (
        f"provider.ready socket={sock} trust_domain=example.org identities=2 federated=0 "
        "socket_mode=600"
    ) in procs.log(proc)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    response = await fetch_once(sock, "FetchX509SVID")
    assert [s.spiffe_id for s in response.svids] == [
        "spiffe://example.org/svc/web",
        "spiffe://example.org/svc/db",
    ]
    assert "svid.issued kind=x509 identity=web" in procs.log(proc)
    assert procs.stop(proc, signal.SIGTERM) == 0
    assert not sock.exists()
    assert "provider.stopped" in procs.log(proc)


async def test_cli_socket_mode_and_sigint(procs: Processes, sockdir: Path, tmp_path: Path) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral", "--socket-mode", "666")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o666
    assert procs.stop(proc, signal.SIGINT) == 0
    assert not sock.exists()


CLI_ERRORS: dict[str, tuple[str, list[str], str]] = {
    "bad YAML": (
        "kind: workload_identity\nversion: v1\nmetadata: {name: [web\n",
        [],
        "{ids}: document 1: line 4: invalid YAML: expected ',' or ']', but got '<stream end>'",
    ),
    "unknown attribute": (
        WEB + "  rules:\n    allow:\n      - conditions:\n"
        "          - {attribute: workload.unix.user, eq: {value: 1}}\n",
        [],
        "{ids}: document 1: spec.rules.allow[0].conditions[0].attribute: unknown attribute "
        "'workload.unix.user' (want one of workload.unix.gid, workload.unix.pid, "
        "workload.unix.uid)",
    ),
    "bad SPIFFE ID path": (
        WEB.replace("/svc/web", "svc/web"),
        [],
        "{ids}: document 1: spec.spiffe.id: SPIFFE ID path 'svc/web' must start with '/'",
    ),
    "unknown field": (
        WEB + "---\n" + DB.replace("hint: db", "hint: db, foo: 1"),
        [],
        "{ids}: document 2: spec.spiffe: unknown field 'foo' (want one of hint, id, jwt, x509)",
    ),
    "non-integer value": (
        WEB + "  rules: {allow: [{conditions: [{attribute: workload.unix.gid, "
        "in: {values: [1, staff]}}]}]}\n",
        [],
        "{ids}: document 1: spec.rules.allow[0].conditions[0].in.values[1]: want a "
        "non-negative integer or numeric string, got 'staff'",
    ),
    "duplicate name": (
        WEB + "---\n" + WEB,
        [],
        "{ids}: document 2: metadata.name: duplicate name 'web' (first in {ids}: document 1)",
    ),
    "bad federation file": (
        WEB,
        ["--federate", "other.org={bad}"],
        "{bad}: neither PEM certificates nor a SPIFFE bundle JWKS",
    ),
    "federating the own trust domain": (
        WEB,
        ["--federate", "example.org={bad}"],
        "--federate 'example.org={bad}': example.org is the provider's own trust domain",
    ),
    "bad TTL": (
        WEB,
        ["--x509-ttl", "4x"],
        "--x509-ttl: invalid duration '4x' (want e.g. 30s, 5m, 1h30m)",
    ),
    "TTL too short": (WEB, ["--jwt-ttl", "100ms"], "--jwt-ttl: must be at least 1s"),
    "bad socket mode": (
        WEB,
        ["--socket-mode", "rw"],
        "--socket-mode: want an octal mode like 600 or 666, got 'rw'",
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_config_errors_exit_2_with_one_line(
    procs: Processes, sockdir: Path, tmp_path: Path, case: str
) -> None:
    content, extra, message = CLI_ERRORS[case]
    ids = write_identities(tmp_path, content)
    bad = tmp_path / "bad.bundle"
    bad.write_text("not a bundle\n")
    args = [a.format(bad=bad) for a in extra]
    proc = procs.sds(*provider_args(sockdir / "x.sock", ids, "--ephemeral", *args))
    assert proc.wait(30) == 2
    expected = "sds workload-api: " + message.format(ids=ids, bad=bad) + "\n"
    assert procs.log(proc) == expected
    assert not (sockdir / "x.sock").exists()


def test_cli_missing_socket_dir_exits_2_with_one_line(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "missing-dir" / "w.sock"
    proc = procs.sds(*provider_args(sock, ids, "--ephemeral"))
    assert proc.wait(30) == 2
    assert procs.log(proc) == (
        f"sds workload-api: socket directory {sock.parent}: cannot open: "
        "No such file or directory\n"
    )


async def test_cli_state_dir_is_private_and_reused(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path)
    state = tmp_path / "state"
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--state-dir", str(state))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "jwt.key").stat().st_mode) == 0o600
    bundles = await fetch_once(sock, "FetchX509Bundles")
    jwt_bundles = await fetch_once(sock, "FetchJWTBundles")
    assert procs.stop(proc) == 0

    proc = start_provider(procs, sock, ids, "--state-dir", str(state))
    assert (await fetch_once(sock, "FetchX509Bundles")).bundles == bundles.bundles
    assert (await fetch_once(sock, "FetchJWTBundles")).bundles == jwt_bundles.bundles
    assert procs.stop(proc) == 0


async def test_cli_ephemeral_writes_nothing(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    sock = sockdir / "w.sock"
    env = dict(os.environ, HOME=str(workdir), TMPDIR=str(workdir))
    proc = start_provider(procs, sock, ids, "--ephemeral", cwd=workdir, env=env)
    first_bundle = (await fetch_once(sock, "FetchX509Bundles")).bundles
    assert procs.stop(proc) == 0
    proc = start_provider(procs, sock, ids, "--ephemeral", cwd=workdir, env=env)
    assert (await fetch_once(sock, "FetchX509Bundles")).bundles != first_bundle
    assert procs.stop(proc) == 0
    assert list(workdir.iterdir()) == []
    assert list(sockdir.iterdir()) == []  # noqa: ASYNC240


async def test_cli_federation(procs: Processes, sockdir: Path, tmp_path: Path) -> None:
    ids = write_identities(tmp_path)
    other, third = LocalCA.ephemeral(OTHER), LocalCA.ephemeral(THIRD)
    (tmp_path / "other.pem").write_bytes(other.bundle.pem())
    (tmp_path / "third.json").write_bytes(other_ca_jwks(third))
    sock = sockdir / "w.sock"
    start_provider(
        procs,
        sock,
        ids,
        "--ephemeral",
        "--federate",
        f"other.org={tmp_path / 'other.pem'}",
        "--federate",
        f"spiffe://third.org={tmp_path / 'third.json'}",
    )
    svids = await fetch_once(sock, "FetchX509SVID")
    assert dict(svids.federated_bundles) == {
        "spiffe://other.org": other.bundle.der(),
        "spiffe://third.org": third.bundle.der(),
    }
    bundles = await fetch_once(sock, "FetchX509Bundles")
    assert sorted(bundles.bundles) == [
        "spiffe://example.org",
        "spiffe://other.org",
        "spiffe://third.org",
    ]
    jwt_bundles = await fetch_once(sock, "FetchJWTBundles")
    assert sorted(jwt_bundles.bundles) == ["spiffe://example.org", "spiffe://third.org"]
    assert jwt_bundles.bundles["spiffe://third.org"] == third.jwt_bundle.to_jwks()


async def test_cli_rotates_at_half_life(procs: Processes, sockdir: Path, tmp_path: Path) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    start_provider(procs, sock, ids, "--ephemeral", "--x509-ttl", "4s")
    channel = Channel(path=str(sock))
    try:
        stub = SpiffeWorkloadAPIStub(channel)
        async with opened(stub.FetchX509SVID, pb.X509SVIDRequest()) as stream:
            async with asyncio.timeout(TIMEOUT):
                old = svids_of(await stream.recv_message())[0]
            arrived = time.monotonic()
            # Half of the 4 s lifetime, plus one second of slack.
            async with asyncio.timeout(2.0 + 1.0):
                new = svids_of(await stream.recv_message())[0]
            elapsed = time.monotonic() - arrived
    finally:
        channel.close()
    assert new.serial != old.serial
    assert new.spiffe_id == old.spiffe_id
    assert new.not_after > old.not_after
    assert elapsed < 3.0


async def test_cli_sighup_reload(procs: Processes, sockdir: Path, tmp_path: Path) -> None:
    idsdir = tmp_path / "ids"
    idsdir.mkdir()
    (idsdir / "10-web.yaml").write_text(WEB)
    partner = tmp_path / "partner.pem"
    old_ca, new_ca = LocalCA.ephemeral(OTHER), LocalCA.ephemeral(OTHER)
    partner.write_bytes(old_ca.bundle.pem())
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, idsdir, "--ephemeral", "--federate", f"other.org={partner}")
    channel = Channel(path=str(sock))
    try:
        stub = SpiffeWorkloadAPIStub(channel)
        async with opened(stub.FetchX509SVID, pb.X509SVIDRequest()) as stream:
            async with asyncio.timeout(TIMEOUT):
                before = await stream.recv_message()
                assert [s.hint for s in before.svids] == ["web"]
                assert before.federated_bundles["spiffe://other.org"] == old_ca.bundle.der()
                (idsdir / "20-db.yaml").write_text(DB)
                partner.write_bytes(new_ca.bundle.pem())
                os.kill(proc.pid, signal.SIGHUP)
                after = await stream.recv_message()
            assert [s.hint for s in after.svids] == ["web", "db"]
            assert after.svids[0].x509_svid == before.svids[0].x509_svid
            assert after.federated_bundles["spiffe://other.org"] == new_ca.bundle.der()

            # A bad reload logs one error line and keeps serving the old state.
            bad = idsdir / "30-bad.yaml"
            bad.write_text(DB.replace("name: db", "name: bad").replace("hint: db", "hnit: db"))
            os.kill(proc.pid, signal.SIGHUP)
            wait_for(lambda: "provider.reload_failed" in procs.log(proc), what="reload error")
    finally:
        channel.close()
    failures = [line for line in procs.log(proc).splitlines() if "reload_failed" in line]
    assert len(failures) == 1
    assert failures[0].endswith(
        f'ERROR sds.provider provider.reload_failed error="{bad}: document 1: spec.spiffe: '
        "unknown field 'hnit' (want one of hint, id, jwt, x509)\""
    )
    still = await fetch_once(sock, "FetchX509SVID")
    assert [s.hint for s in still.svids] == ["web", "db"]


# ---------------------------------------------------------------------------
# Attestation across uids (needs root to run a client as another uid)


async def _fetch_svids(path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
    channel = Channel(path=path)
    try:
        stub = SpiffeWorkloadAPIStub(channel)
        async with stub.FetchX509SVID.open(metadata=HEADER) as stream:
            await stream.send_message(pb.X509SVIDRequest(), end=True)
            response = await asyncio.wait_for(stream.recv_message(), 10)
            await stream.cancel()
        out["ids"] = [s.spiffe_id for s in response.svids]
    except GRPCError as exc:
        out["status"] = exc.status.name
        out["message"] = exc.message
    finally:
        channel.close()
    return out


def fetch_svids(path: str) -> dict[str, Any]:
    """FetchX509SVID once as whoever runs this (see tests/harness/asuser.py); what came back."""
    return asyncio.run(_fetch_svids(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another uid needs root")
def test_attestation_by_uid_across_processes(
    procs: Processes, sockdir: Path, tmp_path: Path
) -> None:
    ids = tmp_path / "ids.yaml"
    ids.write_text(
        WEB.replace("name: web", "name: u1000").replace("/svc/web", "/svc/u1000")
        + "  rules: {allow: [{conditions: [{attribute: workload.unix.uid, eq: {value: 1000}}]}]}\n"
    )
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral", "--socket-mode", "666")
    allowed = run_as(1000, fetch_svids, str(sock))
    assert allowed["uid"] == 1000
    assert allowed.get("ids") == ["spiffe://example.org/svc/u1000"], allowed
    denied = run_as(1001, fetch_svids, str(sock))
    assert denied["status"] == "PERMISSION_DENIED", denied
    assert denied["message"] == (
        f"no identity issued: caller pid={denied['pid']} uid=1001 gid=1001 "
        "matches no workload_identity rule"
    )
    log = procs.log(proc)
    assert f"pid={allowed['pid']} uid=1000 gid=1000" in log
    assert (
        f"workload.denied method=FetchX509SVID pid={denied['pid']} uid=1001 gid=1001 "
        'reason="matches no workload_identity rule"'
    ) in log
