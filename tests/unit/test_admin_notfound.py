"""The admin server's 404 names every path it serves, prefixed ones included."""

from __future__ import annotations

import asyncio

from sds.bridge.admin import AdminServer, Response


async def get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return data


async def test_not_found_lists_routes_and_jwks_prefix() -> None:
    admin = AdminServer(
        "127.0.0.1",
        0,
        {"/healthz": lambda: Response(200, b"ok\n"), "/readyz": lambda: Response(200, b"ok\n")},
        {"/jwks/": lambda rest: Response(200, rest.encode())},
    )
    await admin.start()
    try:
        reply = await get(admin.port, "/nope")
        assert reply.startswith(b"HTTP/1.1 404 Not Found\r\n")
        assert reply.endswith(b"\r\n\r\nnot found; try /healthz, /readyz, /jwks/<td>\n")
        assert (await get(admin.port, "/jwks/example.org")).endswith(b"\r\n\r\nexample.org")
    finally:
        await admin.close()
