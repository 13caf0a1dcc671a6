"""Workload API servers for client tests: grpclib serving a handler, one that never answers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from grpclib.server import Server, Stream

from sds._proto.workload_grpc import SpiffeWorkloadAPIBase


class Hanging(SpiffeWorkloadAPIBase):
    """A Workload API that accepts every call and never answers."""

    async def _hang(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await asyncio.sleep(3600)

    FetchX509SVID = FetchX509Bundles = FetchJWTBundles = FetchJWTSVID = ValidateJWTSVID = _hang


@contextlib.asynccontextmanager
async def serving(handler: Any, path: Path) -> AsyncIterator[str]:
    server = Server([handler])
    await server.start(path=str(path))
    try:
        yield f"unix://{path}"
    finally:
        server.close()
        await server.wait_closed()
