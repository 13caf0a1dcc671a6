"""The Workload API client's limits and edges: deadlines, message size, peers that are not
a Workload API, and addresses that cannot be one (issues 7 and 9)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from sds._proto.workload_grpc import SpiffeWorkloadAPIBase
from sds.bridge.config import JwtLimits, UpstreamBackoff, parse_config
from sds.bridge.metrics import Metrics
from sds.errors import (
    ConfigError,
    WorkloadApiError,
    WorkloadApiMisconfigured,
    WorkloadApiUnavailable,
)
from sds.workloadapi.address import parse_address
from sds.workloadapi.client import MAX_MESSAGE_BYTES, WorkloadApiClient
from tests.harness.fake_workload_api import FakeWorkloadApi, x509_response
from tests.harness.material import Authority
from tests.harness.upstream_server import Hanging, serving


class Huge(SpiffeWorkloadAPIBase):
    """Declares a 4 GiB message, sends 64 kB of it, then waits."""

    sent = 0

    async def _huge(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await stream.send_initial_metadata()
        body = b"\x00" + (2**32 - 1).to_bytes(4, "big") + b"x" * 65536
        await stream._stream.send_data(body)
        Huge.sent += len(body)
        await asyncio.sleep(3600)

    FetchX509SVID = FetchX509Bundles = FetchJWTBundles = FetchJWTSVID = ValidateJWTSVID = _huge


@contextlib.asynccontextmanager
async def plain_http2(path: Path) -> AsyncIterator[str]:
    """An HTTP/2 server that is not gRPC: every request gets ``200`` and ``text/plain``-less
    headers (no content-type), like a misdirected socket to some other HTTP/2 service."""

    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while data := await reader.read(65536):
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    conn.send_headers(ev.stream_id, [(":status", "200")])
                    conn.send_data(ev.stream_id, b"hello\n", end_stream=True)
            writer.write(conn.data_to_send())
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, str(path))
    try:
        yield f"unix://{path}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()


Call = Callable[[WorkloadApiClient], Awaitable[Any]]

CALLS: dict[str, Call] = {
    "FetchJWTSVID": lambda c: c.fetch_jwt_svids(["aud"]),
    "ValidateJWTSVID": lambda c: c.validate_jwt_svid("a.b.c", "aud"),
    "FetchX509SVID": lambda c: c.fetch_x509_context(),
    "FetchX509Bundles": lambda c: c.fetch_x509_bundles(),
    "FetchJWTBundles": lambda c: c.fetch_jwt_bundles(),
}


@pytest.mark.chaos
@pytest.mark.parametrize("method", sorted(CALLS))
async def test_every_unary_call_has_a_deadline(sockdir: Path, method: str) -> None:
    async with (
        serving(Hanging(), sockdir / "api.sock") as address,
        WorkloadApiClient(address, call_timeout=0.3) as client,
    ):
        with pytest.raises(WorkloadApiUnavailable) as info:
            await asyncio.wait_for(CALLS[method](client), 30)
    assert str(info.value) == f"workload API at {address} did not answer {method} within 0.3s"


def test_the_default_deadline_and_message_limit() -> None:
    client = WorkloadApiClient("unix:///nonexistent/api.sock")
    assert client.call_timeout == 10.0
    assert client.max_message_bytes == MAX_MESSAGE_BYTES == 16 * 2**20


@pytest.mark.hostile
async def test_a_declared_4_gib_message_is_refused_before_its_body_is_read(sockdir: Path) -> None:
    async with (
        serving(Huge(), sockdir / "api.sock") as address,
        WorkloadApiClient(address) as client,
    ):
        started = time.monotonic()
        with pytest.raises(WorkloadApiError) as info:
            await asyncio.wait_for(client.fetch_x509_context(), 30)
    assert type(info.value) is WorkloadApiError
    assert str(info.value) == (
        f"workload API at {address} sent a 4294967295-byte message (the limit is 16777216 bytes)"
    )
    assert time.monotonic() - started < 30


@pytest.mark.hostile
async def test_a_message_over_a_configured_limit_is_refused_on_the_stream(
    sockdir: Path,
) -> None:
    ca = Authority("example.org")
    api = FakeWorkloadApi()
    address = await api.start_unix(sockdir / "api.sock")
    try:
        resp = x509_response([ca.svid("/web")], [ca.bundle])
        api.set_x509(resp)
        size = resp.ByteSize()
        async with WorkloadApiClient(address, max_message_bytes=size) as client:
            assert (await client.fetch_x509_context()).svids  # exactly at the limit: taken
        async with WorkloadApiClient(address, max_message_bytes=size - 1) as client:
            with pytest.raises(WorkloadApiError) as info:
                async for _ in client.x509_contexts():
                    pass
    finally:
        await api.stop()
    assert str(info.value) == (
        f"workload API at {address} sent a {size}-byte message (the limit is {size - 1} bytes)"
    )


async def test_a_peer_that_does_not_speak_grpc_is_named_as_such(sockdir: Path) -> None:
    async with (
        plain_http2(sockdir / "web.sock") as address,
        WorkloadApiClient(address) as client,
    ):
        with pytest.raises(WorkloadApiMisconfigured) as info:
            await client.fetch_x509_context()
    assert str(info.value) == f"{address}: not a SPIFFE Workload API (the peer does not speak gRPC)"


async def test_a_grpc_server_without_the_workload_api_is_named_as_such(sockdir: Path) -> None:
    async with (
        serving(_NoWorkloadApi(), sockdir / "other.sock") as address,
        WorkloadApiClient(address) as client,
    ):
        with pytest.raises(WorkloadApiMisconfigured) as info:
            await client.fetch_jwt_svids(["aud"])
    assert str(info.value) == (
        f"{address}: not a SPIFFE Workload API (the peer does not implement FetchJWTSVID)"
    )


class _NoWorkloadApi(SpiffeWorkloadAPIBase):
    """A gRPC server that answers UNIMPLEMENTED (with a proper content-type), as grpc-go
    does for a service it does not have."""

    async def _unimplemented(self, stream: Stream[Any, Any]) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, "unknown service SpiffeWorkloadAPI")

    FetchX509SVID = FetchX509Bundles = FetchJWTBundles = FetchJWTSVID = ValidateJWTSVID = (
        _unimplemented
    )


@pytest.mark.hostile
@pytest.mark.parametrize("text", ["unix:///run/a\x00b.sock", "\x00", "tcp://127.0.0.1:80\x00"])
def test_a_nul_byte_in_an_address_is_a_one_line_error(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text)
    assert str(info.value) == f"workload API address {text!r} contains a NUL byte"


def test_upstream_and_jwt_limits_have_stated_defaults() -> None:
    config = parse_config({}, "sds.yaml")
    assert config.upstream_backoff == UpstreamBackoff(initial=0.1, max=5.0)
    assert config.jwt_svids == JwtLimits(max_audiences=64, idle_timeout=600.0)


def test_upstream_backoff_and_jwt_limits_are_read() -> None:
    config = parse_config(
        {
            "upstream_backoff": {"initial": "250ms", "max": "2s"},
            "jwt_svids": {"max_audiences": 8, "idle_timeout": "5m"},
        },
        "sds.yaml",
    )
    assert config.upstream_backoff == UpstreamBackoff(initial=0.25, max=2.0)
    assert config.jwt_svids == JwtLimits(max_audiences=8, idle_timeout=300.0)
    assert parse_config({"upstream_backoff": {"max": 1}}, "x").upstream_backoff.max == 1.0


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"workload_api": "unix:///run/a\x00b.sock"},
            "sds.yaml: workload_api[0]: 'unix:///run/a\\x00b.sock': "
            "must not contain control characters",
        ),
        (
            {"workload_api": ["unix:///ok.sock", "tcp://localhost:1"]},
            "sds.yaml: workload_api[1]: workload API address 'tcp://localhost:1' must use an "
            "IP address, not the host name 'localhost'",
        ),
        (
            {"upstream_backoff": {"initial": "fast"}},
            "sds.yaml: upstream_backoff.initial: invalid duration 'fast' "
            "(want e.g. 30s, 5m, 1h30m)",
        ),
        (
            {"upstream_backoff": {"max": ".inf"}},
            "sds.yaml: upstream_backoff.max: invalid duration '.inf' (want e.g. 30s, 5m, 1h30m)",
        ),
        (
            {"upstream_backoff": {"max": float("inf")}},
            "sds.yaml: upstream_backoff.max: duration inf is longer than 1h",
        ),
        (
            {"upstream_backoff": {"initial": 0}},
            "sds.yaml: upstream_backoff.initial: duration 0 must be positive",
        ),
        (
            {"upstream_backoff": {"initial": "2s", "max": "1s"}},
            "sds.yaml: upstream_backoff: max must not be less than initial",
        ),
        (
            {"upstream_backoff": {"jitter": 1}},
            "sds.yaml: upstream_backoff: unknown field 'jitter' (want one of initial, max)",
        ),
        (
            {"jwt_svids": {"max_audiences": 10**100}},
            "sds.yaml: jwt_svids.max_audiences: must be an integer from 0 to 4096",
        ),
        (
            {"jwt_svids": {"idle_timeout": True}},
            "sds.yaml: jwt_svids.idle_timeout: want a duration like 30s, 5m or 1h30m, or seconds, "
            "got boolean",
        ),
    ],
)
def test_bad_upstream_settings_are_one_line(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "sds.yaml")
    assert str(info.value) == message


def test_upstream_connected_is_per_upstream() -> None:
    metrics = Metrics()
    down = metrics.upstream("unix:///run/a.sock")
    up = metrics.upstream("unix:///run/b.sock")
    up.on_connected()
    down.on_disconnected(WorkloadApiUnavailable("gone"))
    text = metrics.render().decode()
    assert 'sds_upstream_connected{upstream="unix:///run/a.sock"} 0.0' in text
    assert 'sds_upstream_connected{upstream="unix:///run/b.sock"} 1.0' in text
    assert 'sds_upstream_errors_total{reason="WorkloadApiUnavailable"} 1.0' in text
