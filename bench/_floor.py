"""Benchmark helper process: the "floor" SDS server, doing as little as a grpclib server can.

``python bench/_floor.py --socket PATH --material FILE``

Every ``Secret`` (``default`` for each server SVID of the material file, and
``ROOTCA``) comes pre-rendered (serialized, made by the bridge's own renderer
in the benchmark process, ``_common.make_material``; wrapped in ``Any`` once
at start), so this process
imports only asyncio, grpclib and the standard library: nothing of ``sds``,
no cryptography, no protobuf runtime, no envoy-data-plane
(``tests/unit/test_bench_imports.py`` holds it to that). The two wire helpers
below are the least a server needs to read resource names and frame a
response; they are not the bridge's codec and do nothing else. A
StreamSecrets stream reads the resource names from its first request and is
answered with the current secrets; later requests (ACKs) are read and
dropped. A line ``<i>`` on stdin makes SVID ``i`` current and wakes every
stream that asked for ``default``; each wakes and sends a response made by
concatenating pre-built bytes. No validation, no parsing beyond the names, no
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

import grpclib.const
from grpclib.encoding.base import CodecBase
from grpclib.server import Server

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SDS_SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"


class RawCodec(CodecBase):
    """grpclib codec that sends and returns raw protobuf bytes (no message classes)."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return bytes(data)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def any_secret(secret: bytes) -> bytes:
    """A serialized ``google.protobuf.Any`` holding the serialized ``Secret``."""
    return field_bytes(1, SECRET_TYPE_URL.encode()) + field_bytes(2, secret)


def top_fields(data: bytes) -> dict[int, list[bytes | int]]:
    """The top-level fields of a protobuf message: number -> values (bytes or ints)."""
    out: dict[int, list[bytes | int]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        value: bytes | int
        if wire == 0:
            value = varint()
        elif wire == 2:
            length = varint()
            value, i = data[i : i + length], i + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = int.from_bytes(data[i : i + size], "little"), i + size
        else:
            raise ValueError(f"unsupported wire type {wire} in field {number}")
        out.setdefault(number, []).append(value)
    return out


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
        self._type = field_bytes(4, SECRET_TYPE_URL.encode())

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

    def _body(self, names: list[bytes]) -> bytes:
        parts = [field_bytes(1, f"v{self.current}".encode())]
        for name in names:
            if name == b"default":
                parts.append(field_bytes(2, self.defaults[self.current]))
            elif (other := self.others.get(name.decode())) is not None:
                parts.append(field_bytes(2, other))
        parts.append(self._type)
        self.nonce += 1
        parts.append(field_bytes(5, f"n{self.nonce}".encode()))
        return b"".join(parts)

    async def stream_secrets(self, stream: Any) -> None:
        first = await stream.recv_message()
        if first is None:
            return
        fields = top_fields(first)
        names = [n for n in fields.get(3, []) if isinstance(n, bytes)]
        if self.dump and 2 in fields:  # keep one real request (with its node) for analysis
            with open(self.dump, "wb") as handle:  # noqa: ASYNC230 - once, ~60 KB
                handle.write(first)
            self.dump = None
        del first, fields  # a real Envoy's first request is ~61 KB: hold only the names
        event = asyncio.Event()
        if b"default" in names:
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
    defaults = [any_secret(base64.b64decode(item)) for item in rendered["default"]]
    rootca = any_secret(base64.b64decode(rendered["ROOTCA"]))
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
