"""The provider against a hostile local user and badly behaved clients (issues 7 and 9).

The tests here run in process, with no child process and no Envoy; the others are in
``tests/integration/test_provider_hostile.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status

from sds._proto import workload_pb2 as pb
from sds._proto.workload_grpc import SpiffeWorkloadAPIStub
from sds._util.peercred import listen_unix, open_private_dir, read_private_file, write_private_file
from sds.errors import SocketInUse, UnsafePath
from sds.provider import service as provider_server
from sds.provider.ca import LocalCA
from sds.provider.identities import Identity
from sds.provider.service import WorkloadApiProvider
from sds.spiffe.id import SpiffeId, TrustDomain
from tests.conftest import captured_log
from tests.harness.fake_workload_api import eventually
from tests.harness.h2async import RawClient, stall_in_preface
from tests.harness.h2raw import RawH2, grpc_frame
from tests.harness.resources import fd_count
from tests.harness.workload_client import HEADER, JWT

pytestmark = pytest.mark.hostile

TD = TrustDomain("example.org")


def test_state_dir_is_created_0700_with_keys_0600(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    ca = LocalCA.load_or_create(TD, state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert sorted(os.listdir(state)) == ["ca.crt", "ca.key", "jwt.key"]
    for name in ("ca.key", "jwt.key"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    assert LocalCA.load_or_create(TD, state).bundle.der() == ca.bundle.der()


def test_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    LocalCA.load_or_create(TD, state)
    elsewhere = tmp_path / "elsewhere.key"
    (state / "ca.key").rename(elsewhere)
    (state / "ca.key").symlink_to(elsewhere)
    with pytest.raises(UnsafePath) as info:
        LocalCA.load_or_create(TD, state)
    assert str(info.value) == f"{state}/ca.key: is a symbolic link; refusing it"


def test_private_write_never_follows_a_planted_temp_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    state = tmp_path / "state"
    fd = open_private_dir(str(state))
    try:
        os.symlink(target, "k.tmp", dir_fd=fd)
        write_private_file(fd, "k", b"secret")
        assert read_private_file(fd, "k", where=str(state)) == b"secret"
    finally:
        os.close(fd)
    assert target.read_bytes() == b"untouched"
    assert sorted(os.listdir(state)) == ["k"]
    assert stat.S_IMODE((state / "k").stat().st_mode) == 0o600


def test_fifo_in_state_dir_is_refused_without_hanging(tmp_path: Path) -> None:
    state = tmp_path / "state"
    os.close(open_private_dir(str(state)))
    os.mkfifo(state / "ca.key", 0o600)
    with pytest.raises(UnsafePath) as info:
        LocalCA.load_or_create(TD, state)
    assert str(info.value) == f"{state}/ca.key: not a regular file"


def test_sticky_world_writable_socket_dir_is_accepted(public_tmp: Path) -> None:
    listener = listen_unix(str(public_tmp / "w.sock"))
    try:
        assert stat.S_ISSOCK(os.lstat(public_tmp / "w.sock").st_mode)
        assert stat.S_IMODE(os.lstat(public_tmp / "w.sock").st_mode) == 0o600
    finally:
        listener.sock.close()
        assert listener.remove()


def test_stale_socket_is_replaced_and_other_files_are_refused(sockdir: Path) -> None:
    path = sockdir / "w.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # a socket file nobody listens on
    listener = listen_unix(str(path))
    listener.sock.close()
    assert listener.remove()
    path.write_text("not a socket")
    with pytest.raises(UnsafePath) as info:
        listen_unix(str(path))
    assert str(info.value) == f"{path}: exists and is not a socket"
    assert path.read_text() == "not a socket"


def test_live_socket_is_refused_in_process(sockdir: Path) -> None:
    path = str(sockdir / "w.sock")
    listener = listen_unix(path)
    try:
        with pytest.raises(SocketInUse):
            listen_unix(path)
    finally:
        listener.sock.close()
        listener.remove()


async def test_close_leaves_a_socket_that_is_no_longer_ours(sockdir: Path) -> None:
    path = sockdir / "w.sock"
    provider = WorkloadApiProvider(LocalCA.ephemeral(TD), [])
    await provider.start(listen_unix(str(path)))
    path.unlink()  # someone else took the path over
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    try:
        await provider.close()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        other.close()


async def test_a_request_that_never_completes_is_cut_off(
    sockdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provider_server, "REQUEST_TIMEOUT", 0.5)
    path = sockdir / "w.sock"
    web = Identity("web", SpiffeId.from_path(TD, "/web"))
    provider = WorkloadApiProvider(LocalCA.ephemeral(TD), [web])
    await provider.start(listen_unix(str(path)))

    def call() -> tuple[str | None, str | None]:
        with RawH2(str(path)) as client:
            # Two bytes of a length prefix, then silence (the stream stays open).
            response = client.call(JWT, [b"\0\0"], metadata=HEADER, end=False)
        return response.grpc_status, response.grpc_message

    try:
        status, message = await asyncio.to_thread(call)
    finally:
        await provider.close()
    assert (status, message) == (
        str(Status.DEADLINE_EXCEEDED.value),
        "request message not received within 0.5s",
    )


async def _good_client_served(path: Path) -> None:
    channel = Channel(path=str(path))
    try:
        ok = await SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
            pb.JWTSVIDRequest(audience=["a"]), metadata=HEADER
        )
        assert len(ok.svids) == 1
    finally:
        channel.close()


async def test_connections_stuck_in_the_preface_are_closed(sockdir: Path) -> None:
    """200 clients that never finish the HTTP/2 preface are closed (they stayed open forever)."""
    path = sockdir / "w.sock"
    web = Identity("web", SpiffeId.from_path(TD, "/web"))
    provider = WorkloadApiProvider(LocalCA.ephemeral(TD), [web], handshake_timeout=0.5)
    with captured_log("sds.provider", logging.LogRecord.getMessage) as lines:
        await provider.start(listen_unix(str(path)))
        try:
            baseline = fd_count()
            await stall_in_preface(str(path))
            await eventually(lambda: fd_count() <= baseline, what="fds back to baseline")
            await _good_client_served(path)
        finally:
            await provider.close()
    closed = [line for line in lines if "workload.connection_closed" in line]
    # Rate-limited: a few lines for 200 connections, each naming the reason.
    assert closed and len(closed) <= 10, lines
    assert all("reason=handshake_timeout" in line for line in closed), closed


async def test_idle_connection_without_streams_is_closed_but_a_stream_holds_it(
    sockdir: Path,
) -> None:
    path = sockdir / "w.sock"
    web = Identity("web", SpiffeId.from_path(TD, "/web"))
    provider = WorkloadApiProvider(
        LocalCA.ephemeral(TD), [web], handshake_timeout=0.5, idle_timeout=0.4
    )
    await provider.start(listen_unix(str(path)))
    try:
        client = await RawClient.connect(str(path))
        request = grpc_frame(pb.JWTSVIDRequest(audience=["a"]).SerializeToString())
        reply = await client.call(JWT, request, metadata=HEADER)
        assert reply.status == "0"
        await asyncio.wait_for(client.closed.wait(), 20)  # idle after its call: closed
        await client.close()
        # A connection with a long-lived stream (how the bridge watches its SVIDs) is not idle.
        channel = Channel(path=str(path))
        try:
            stub = SpiffeWorkloadAPIStub(channel)
            async with stub.FetchX509SVID.open(metadata=HEADER) as stream:
                await stream.send_message(pb.X509SVIDRequest(), end=True)
                assert len((await stream.recv_message()).svids) == 1
                await asyncio.sleep(1.5)
                provider.reload([web, Identity("db", SpiffeId.from_path(TD, "/db"))], [])
                assert len((await stream.recv_message()).svids) == 2
                await stream.cancel()
        finally:
            channel.close()
    finally:
        await provider.close()
