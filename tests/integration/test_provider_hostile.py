"""The provider against a hostile local user and badly behaved clients (issues 7 and 9)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from sds._proto import workload_pb2 as pb
from sds._proto.workload_grpc import SpiffeWorkloadAPIStub
from sds.provider.service import MAX_REQUEST_BYTES
from tests.conftest import Processes, wait_for
from tests.harness.asuser import run_as
from tests.harness.h2raw import RawH2, grpc_frame
from tests.harness.provider import WEB, provider_args, start_provider, write_identities
from tests.harness.workload_client import HEADER, JWT

pytestmark = pytest.mark.hostile

ATTACKER = 1000

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another uid needs root")


def fails_with(procs: Processes, args: list[str], message: str) -> None:
    proc = procs.sds(*args)
    assert proc.wait(30) == 2, procs.log(proc)
    assert procs.log(proc) == f"sds workload-api: {message}\n"


def _plant(state: str) -> None:
    os.mkdir(state)
    os.chmod(state, 0o777)
    os.symlink(os.path.join(state, "loot"), os.path.join(state, "ca.key.tmp"))
    os.symlink(os.path.join(state, "loot"), os.path.join(state, "ca.tmp"))


@needs_root
def test_state_dir_precreated_by_another_uid_is_refused_and_no_key_is_written(
    procs: Processes, public_tmp: Path, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    state = public_tmp / "state"
    run_as(ATTACKER, _plant, str(state))
    fails_with(
        procs,
        provider_args(sockdir / "w.sock", ids, "--state-dir", str(state)),
        f"{state}: owned by uid {ATTACKER}, not by us (uid 0); "
        "use a directory we own with mode 0700",
    )
    assert sorted(os.listdir(state)) == ["ca.key.tmp", "ca.tmp"]
    assert not (state / "loot").exists()
    assert stat.S_IMODE(state.stat().st_mode) == 0o777  # left as found, not "fixed"


def test_state_dir_open_to_others_is_refused_even_if_ours(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    fails_with(
        procs,
        provider_args(sockdir / "w.sock", ids, "--state-dir", str(state)),
        f"{state}: mode 755 lets group or others in; want 0700",
    )
    assert list(state.iterdir()) == []


def test_state_dir_that_is_a_symlink_is_refused(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "state"
    link.symlink_to(real)
    fails_with(
        procs,
        provider_args(sockdir / "w.sock", ids, "--state-dir", str(link)),
        f"{link}: is a symbolic link; give the directory itself",
    )
    assert list(real.iterdir()) == []


@needs_root
def test_socket_dir_owned_by_another_uid_is_refused(
    procs: Processes, public_tmp: Path, tmp_path: Path
) -> None:
    ids = write_identities(tmp_path)
    theirs = public_tmp / "run"
    run_as(ATTACKER, os.mkdir, str(theirs), 0o755)
    fails_with(
        procs,
        provider_args(theirs / "w.sock", ids, "--ephemeral"),
        f"socket directory {theirs}: owned by uid {ATTACKER}, not by us (uid 0) or root; "
        "use a directory we own",
    )
    assert os.listdir(theirs) == []


def test_world_writable_socket_dir_without_sticky_bit_is_refused(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    os.chmod(sockdir, 0o777)
    fails_with(
        procs,
        provider_args(sockdir / "w.sock", ids, "--ephemeral"),
        f"socket directory {sockdir}: mode 777 lets others replace the socket; "
        "remove group/other write or set the sticky bit",
    )
    assert os.listdir(sockdir) == []


def test_second_provider_on_a_live_socket_exits_2_and_the_first_keeps_serving(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    first = start_provider(procs, sock, ids, "--ephemeral")
    inode = os.lstat(sock).st_ino
    fails_with(
        procs,
        provider_args(sock, ids, "--ephemeral"),
        f"{sock}: another server is already listening there; "
        "stop it or choose another --socket path",
    )
    assert os.lstat(sock).st_ino == inode
    probe = socket.socket(socket.AF_UNIX)
    probe.connect(str(sock))
    probe.close()
    assert procs.stop(first) == 0
    assert not sock.exists()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


ONLY_1000 = (
    WEB + "  rules: {allow: [{conditions: [{attribute: workload.unix.uid, eq: {value: 1000}}]}]}\n"
)

FLOOD = 160 * 1024 * 1024

CHUNK = b"\0" * (1024 * 1024)


async def _served_once(sock: Path) -> None:
    channel = Channel(path=str(sock))
    try:
        with pytest.raises(GRPCError):
            await SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
                pb.JWTSVIDRequest(audience=["a"]), metadata=HEADER
            )
    finally:
        channel.close()


async def test_non_entitled_flood_is_refused_before_reading_and_rss_stays_flat(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path, ONLY_1000)  # we (uid 0) are not entitled
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral", "--socket-mode", "666")
    await _served_once(sock)  # warm up every code path once
    baseline = rss_kib(proc.pid)

    def flood() -> list[tuple[str | None, int]]:
        results = []
        with RawH2(str(sock)) as client:
            for _ in range(4):
                response = client.call(
                    JWT, [grpc_frame(b"", length=0xFFFFFFFF), *[CHUNK] * 40], metadata=HEADER
                )
                results.append((response.grpc_status, response.sent))
        return results

    results = await asyncio.to_thread(flood)
    assert [status for status, _ in results] == [str(Status.PERMISSION_DENIED.value)] * 4
    # The server read nothing: at most one 64 KiB receive window got through per call.
    assert all(sent <= 65535 for _, sent in results), results
    growth = rss_kib(proc.pid) - baseline
    assert growth < 16 * 1024, f"provider RSS grew by {growth} KiB"
    assert "Traceback" not in procs.log(proc)


async def test_oversized_request_is_resource_exhausted_from_its_prefix(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral")

    def call() -> tuple[str | None, str | None, int]:
        with RawH2(str(sock)) as client:
            response = client.call(
                JWT, [grpc_frame(b"", length=1 << 30), *[CHUNK] * 8], metadata=HEADER
            )
        return response.grpc_status, response.grpc_message, response.sent

    status, message, sent = await asyncio.to_thread(call)
    assert status == str(Status.RESOURCE_EXHAUSTED.value)
    assert message == f"request message is {1 << 30} bytes; the limit is {MAX_REQUEST_BYTES}"
    assert sent <= 65535
    assert "Traceback" not in procs.log(proc)


@pytest.mark.parametrize(
    ("audience", "message"),
    [
        (["a"] * 17, "at most 16 audiences per request"),
        (["x" * 1025], "an audience is at most 1024 bytes"),
    ],
)
async def test_jwt_audience_caps(
    procs: Processes, tmp_path: Path, sockdir: Path, audience: list[str], message: str
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    start_provider(procs, sock, ids, "--ephemeral")
    channel = Channel(path=str(sock))
    try:
        with pytest.raises(GRPCError) as info:
            await SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
                pb.JWTSVIDRequest(audience=audience), metadata=HEADER
            )
        assert (info.value.status, info.value.message) == (Status.INVALID_ARGUMENT, message)
        ok = await SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
            pb.JWTSVIDRequest(audience=["a"] * 16), metadata=HEADER
        )
        assert len(ok.svids) == 1
    finally:
        channel.close()


MALFORMED: dict[str, tuple[str, list[bytes], str]] = {
    "garbage protobuf": (
        JWT,
        [grpc_frame(b"\xff\xff\xff\xff")],
        "request is not a valid JWTSVIDRequest",
    ),
    "truncated frame": (
        JWT,
        [grpc_frame(b"", length=10) + b"abc"],
        "request ended inside a gRPC message frame",
    ),
    "truncated prefix": (JWT, [b"\0\0"], "request ended inside a gRPC message frame"),
    "compressed flag": (
        JWT,
        [grpc_frame(b"", compressed=True)],
        "compressed request messages are not supported (no grpc-encoding negotiated)",
    ),
    "bad flag": (JWT, [b"\x07" + grpc_frame(b"")[1:]], "invalid gRPC message flag 7"),
    "no message (unary)": (JWT, [], "request message missing"),
    "no message (stream)": ("/SpiffeWorkloadAPI/FetchX509SVID", [], "request message missing"),
    "garbage on a stream": (
        "/SpiffeWorkloadAPI/FetchX509Bundles",
        [grpc_frame(b"\x0a")],
        "request is not a valid X509BundlesRequest",
    ),
}


async def test_malformed_frames_and_protobuf_are_invalid_argument_without_traceback(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral")

    def calls() -> dict[str, tuple[str | None, str | None]]:
        out = {}
        with RawH2(str(sock)) as client:
            for case, (path, chunks, _) in MALFORMED.items():
                response = client.call(path, chunks, metadata=HEADER)
                out[case] = (response.grpc_status, response.grpc_message)
        return out

    got = await asyncio.to_thread(calls)
    invalid = str(Status.INVALID_ARGUMENT.value)
    assert got == {case: (invalid, message) for case, (_, _, message) in MALFORMED.items()}
    channel = Channel(path=str(sock))  # still serving
    try:
        ok = await SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
            pb.JWTSVIDRequest(audience=["a"]), metadata=HEADER
        )
        assert len(ok.svids) == 1
    finally:
        channel.close()
    log = procs.log(proc)
    assert "Traceback" not in log and "Application error" not in log, log


async def test_unknown_method_is_unimplemented_with_grpc_content_type(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    proc = start_provider(procs, sock, ids, "--ephemeral")
    path = "/SpiffeWorkloadAPI/FetchWITSVID"

    def call() -> tuple[dict[str, str], dict[str, str]]:
        with RawH2(str(sock)) as client:
            response = client.call(path, [grpc_frame(b"")], metadata=HEADER)
        return response.headers, response.trailers

    headers, trailers = await asyncio.to_thread(call)
    # A trailers-only response: grpc-go reads the status from these headers only
    # when they carry a gRPC content-type.
    assert headers[":status"] == "200"
    assert headers["content-type"].startswith("application/grpc")
    assert headers["grpc-status"] == str(Status.UNIMPLEMENTED.value)
    assert headers["grpc-message"] == f"unknown method {path}"
    assert trailers == {}
    assert "Traceback" not in procs.log(proc)


def test_sigterm_with_a_stale_socket_dir_entry_still_cleans_up(
    procs: Processes, tmp_path: Path, sockdir: Path
) -> None:
    ids = write_identities(tmp_path)
    sock = sockdir / "w.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sock))
    dead.close()
    proc = start_provider(procs, sock, ids, "--ephemeral")
    wait_for(lambda: stat.S_ISSOCK(os.lstat(sock).st_mode), what="socket")
    assert procs.stop(proc, signal.SIGTERM) == 0
    assert not sock.exists()
