"""`sds run` as a process: socket bound only after the first SVID, readiness, wait, SIGTERM.

The tests here run in process, with no child process and no Envoy; the others are in
``tests/integration/test_sds_run.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import pytest

from sds.bridge.root import _prepare_socket_dir
from sds.errors import StartupError
from tests.harness.asuser import run_as


@pytest.fixture(autouse=True)
def _sds_logs_reach_caplog(sds_logs_reach_caplog: None) -> None:
    """Every test here reads ``sds`` logs through caplog."""


async def _admin_get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


@pytest.mark.hostile
async def test_admin_limits_header_size_idle_and_connection_cap() -> None:
    from sds.bridge.admin import AdminLimits, AdminServer, Response

    limits = AdminLimits(max_connections=2, idle_timeout=0.5, request_deadline=2.0)
    admin = AdminServer("127.0.0.1", 0, {"/ok": lambda: Response(200, b"ok\n")}, limits=limits)
    await admin.start()
    try:
        big = b"GET /ok HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n"
        assert (await _admin_get(admin.port, big)).startswith(b"HTTP/1.1 431 ")
        # Two silent clients take both slots; a third is not served until one times out.
        silent = [await asyncio.open_connection("127.0.0.1", admin.port) for _ in range(2)]
        await asyncio.sleep(0.1)
        assert admin.active == 2
        answer = await asyncio.wait_for(_admin_get(admin.port, b"GET /ok HTTP/1.1\r\n\r\n"), 10)
        assert answer.endswith(b"\r\n\r\nok\n")
        for reader, writer in silent:
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the idle timeout
            writer.close()
        # A client trickling one byte at a time is cut off by the whole-request deadline.
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        closed = False
        for _ in range(50):
            try:
                writer.write(b"X")
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            if reader.at_eof() or await _eof_within(reader, 0.2):
                closed = True
                break
        writer.close()
        assert closed
    finally:
        await admin.close()


async def _eof_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except TimeoutError:
        return False


@pytest.mark.hostile
async def test_admin_accept_errors_are_throttled_and_the_fd_reserve_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import errno

    from sds.bridge.admin import AdminLimits, AdminServer, Response

    routes = {"/ok": lambda: Response(200, b"ok\n")}
    loop = asyncio.get_running_loop()
    failures = 0
    real_accept = loop.sock_accept

    async def emfile(sock: socket.socket) -> tuple[socket.socket, object]:
        nonlocal failures
        if failures < 15:
            failures += 1
            raise OSError(errno.EMFILE, "Too many open files")
        return await real_accept(sock)

    admin = AdminServer("127.0.0.1", 0, routes)
    with caplog.at_level(logging.INFO, logger="sds"):
        loop.sock_accept = emfile  # type: ignore[method-assign]
        try:
            await admin.start()
            answer = await asyncio.wait_for(_admin_get(admin.port, b"GET /ok HTTP/1.1\r\n\r\n"), 30)
        finally:
            del loop.sock_accept
            await admin.close()
    assert answer.endswith(b"ok\n")
    assert failures == 15
    lines = [r.getMessage() for r in caplog.records if "admin.accept_failed" in r.getMessage()]
    assert lines == ['admin.accept_failed error="Too many open files" action="retrying in 0.1s"']
    assert not any(r.exc_info for r in caplog.records)

    # No descriptor left above the reserve: nothing is accepted, and that is said once.
    caplog.clear()
    starved = AdminServer("127.0.0.1", 0, routes, limits=AdminLimits(fd_reserve=10**9))
    with caplog.at_level(logging.INFO, logger="sds"):
        await starved.start()
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(_admin_get(starved.port, b"GET /ok HTTP/1.1\r\n\r\n"), 1)
        finally:
            await starved.close()
    reserve = [r.getMessage() for r in caplog.records if "admin.fd_reserve" in r.getMessage()]
    assert len(reserve) == 1
    assert reserve[0].endswith(
        'reserve=1000000000 action="not accepting connections until descriptors are free"'
    )


def test_loop_errors_are_one_line_per_kind_per_interval(caplog: pytest.LogCaptureFixture) -> None:

    from sds.bridge.root import _ThrottledLoopErrors

    handler = _ThrottledLoopErrors(interval=3600)
    error = OSError(24, "Too many open files")
    with caplog.at_level(logging.INFO, logger="sds"):
        for _ in range(1000):
            handler(None, {"message": "socket.accept() out of system resource", "exception": error})
    assert [r.getMessage() for r in caplog.records] == [
        'loop.error message="socket.accept() out of system resource" '
        'error="OSError: [Errno 24] Too many open files"'
    ]
    handler.interval = 0
    with caplog.at_level(logging.INFO, logger="sds"):
        handler(None, {"message": "socket.accept() out of system resource", "exception": error})
    assert caplog.records[-1].getMessage().endswith(" suppressed=999")


def _prepare_as_other_user(path: str) -> str:
    """In the child: the bridge's start-up directory check, its error text as the result."""
    try:
        _prepare_socket_dir(path)
    except StartupError as exc:
        return str(exc)
    return "accepted"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
def test_socket_directory_we_cannot_create_is_one_line(sockdir: Path) -> None:
    locked = sockdir / "locked"
    locked.mkdir(mode=0o755)  # root's; uid 1000 may not create anything in it
    result = run_as(1000, _prepare_as_other_user, f"{locked}/sub/sds.sock")
    assert result == f"socket directory {locked}/sub: cannot create: Permission denied"
