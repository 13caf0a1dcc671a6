"""Benchmark helper process: the "floor" SDS server, doing as little as a grpclib server can.

``python bench/_floor.py --socket PATH --material FILE``

Every ``Secret`` (``default`` for each server SVID of the material file, and
``ROOTCA``) comes pre-rendered (serialized, made by the bridge's own renderer
in the benchmark process), so this process needs only asyncio, grpclib and
Envoy's generated messages (xds-protos, through ``_common``, which also loads
parts of ``sds`` and cryptography: ~13 MB of the floor's RSS since ``109eeb3``,
no CPU per request); it renders nothing and validates nothing. A
StreamSecrets stream reads the resource names from its first request and is
answered with the current secrets; later requests (ACKs) are read and
dropped. A line ``<i>`` on stdin makes SVID ``i`` current and wakes every
stream that asked for ``default``; each wakes and sends a DiscoveryResponse
wrapping the pre-built bytes. No validation, no parsing beyond the names, no
logging, no metrics: the time left is grpclib + asyncio + the kernel, the
cost floor of serving SDS from Python. Prints ``{"event": "ready"}`` once
listening; exits on stdin EOF or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository on sys.path)
import grpclib.const
from _common import SDS_SERVICE, RawCodec, sotw_response
from grpclib.server import Server

from sds._proto.discovery_lite_pb2 import DiscoveryRequest


class FloorServicer:
    """StreamSecrets only, from pre-rendered bytes."""

    def __init__(
        self, defaults: list[bytes], others: dict[str, bytes], dump: str | None = None
    ) -> None:
        self.dump = dump
        self.defaults = defaults
        self.others = others
        self.current = 0
        self.events: set[asyncio.Event] = set()
        self.nonce = 0

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            f"{SDS_SERVICE}/StreamSecrets": grpclib.const.Handler(
                self.stream_secrets, grpclib.const.Cardinality.STREAM_STREAM, bytes, bytes
            )
        }

    def rotate(self, index: int) -> None:
        self.current = index
        for event in self.events:
            event.set()

    def _body(self, names: list[str]) -> bytes:
        secrets = []
        for name in names:
            if name == "default":
                secrets.append(self.defaults[self.current])
            elif (other := self.others.get(name)) is not None:
                secrets.append(other)
        self.nonce += 1
        return sotw_response(f"v{self.current}", secrets, f"n{self.nonce}")

    async def stream_secrets(self, stream: Any) -> None:
        first = await stream.recv_message()
        if first is None:
            return
        request = DiscoveryRequest.FromString(first)  # the Node stays bytes
        names = list(request.resource_names)
        if self.dump and request.HasField("node"):  # keep one real request for analysis
            with open(self.dump, "wb") as handle:  # noqa: ASYNC230 - once, ~60 KB
                handle.write(first)
            self.dump = None
        del first, request  # a real Envoy's first request is ~61 KB: hold only the names
        event = asyncio.Event()
        if "default" in names:
            self.events.add(event)

        async def drain() -> None:
            while await stream.recv_message() is not None:
                pass

        reader = asyncio.create_task(drain())
        waiter: asyncio.Task[Any] | None = None
        try:
            await stream.send_message(self._body(names))
            while True:
                waiter = asyncio.create_task(event.wait())
                done, _ = await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    return
                event.clear()
                await stream.send_message(self._body(names))
        finally:
            self.events.discard(event)
            reader.cancel()
            if waiter is not None:
                waiter.cancel()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--material", required=True)
    parser.add_argument("--dump-first", help="write the first request carrying a node here")
    args = parser.parse_args()

    rendered = json.loads(Path(args.material).read_text())["rendered"]  # noqa: ASYNC240
    defaults = [base64.b64decode(item) for item in rendered["default"]]
    rootca = base64.b64decode(rendered["ROOTCA"])
    servicer = FloorServicer(defaults, {"ROOTCA": rootca}, args.dump_first)
    server = Server([servicer], codec=RawCodec())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    await server.start(path=args.socket, backlog=4096)  # the bridge's LISTEN_BACKLOG

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)

    async def commands() -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            text = line.strip()
            if text:
                servicer.rotate(int(text))

    task = asyncio.create_task(commands())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    stopping.cancel()
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 3)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
