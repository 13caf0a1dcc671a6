"""Benchmark helper process: many SDS StreamSecrets clients that ACK like Envoy and time arrivals.

``python bench/_loadclient.py --socket PATH --streams N [--concurrency C] [--prefix P]``

Each stream is its own gRPC connection (as N Envoys would have), with its own
node id ``<prefix>-<k>``, asks for the resource names (default ``default``)
and ACKs every response (version_info + response_nonce, names repeated).
Messages are handled as raw bytes (a hand-rolled top-level protobuf parser),
so the client spends as little CPU as possible. Streams are opened at most
``C`` at a time (each counts as open once its first response arrived), which
keeps connects under the server's listen backlog.

Control protocol: JSON lines. Prints ``{"event": "ready", ...}`` once every
stream got its first response. On stdin:

* ``{"cmd": "expect", "id": i, "token": <base64>}``: from now on record, per
  stream, the ``time.monotonic()`` at which a response containing ``token``
  (the new leaf's PEM) arrived; answers ``{"event": "armed", "id": i}`` and,
  once every stream has it, ``{"event": "done", "id": i, "times": [...]}``
  (or ``{"event": "timeout", ...}`` after 30 s). With ``"absent": true`` it
  records the first response *without* ``token`` instead (the current leaf:
  for servers that rotate on their own schedule, such as a SPIRE agent).
* ``{"cmd": "stats"}``: answers with open streams, responses and errors.

With ``--reconnect`` (the reconnect storm), a stream whose connection ends
waits until the socket accepts connections again (one probe per process,
every 2 ms), then reconnects at once, as every Envoy of a node would after a
bridge restart; failed attempts retry after 2-10 ms and are counted in
``reconnect_failures``, not as errors. ``expect`` then also records a stream
whose first response on its new connection carries ``token``.

Exits on stdin EOF or SIGTERM, closing every connection.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import signal
import sys
import time
from typing import Any

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import SDS_SERVICE, RawCodec, discovery_request, response_fields
from grpclib.client import Channel
from grpclib.const import Cardinality


class Load:
    def __init__(
        self,
        *,
        path: str,
        streams: int,
        concurrency: int,
        prefix: str,
        names: list[str],
        node_template: bytes | None,
        reconnect: bool = False,
        node_first_only: bool = False,
    ) -> None:
        self.reconnect = reconnect
        self.node_first_only = node_first_only
        self.reachable = asyncio.Event()
        self.reachable.set()
        self.probing: asyncio.Task[None] | None = None
        self.reconnects = 0
        self.reconnect_failures = 0
        self.ever_opened = [False] * streams
        self.node_template = node_template
        self.path = path
        self.n = streams
        self.names = names
        self.prefix = prefix
        self.gate = asyncio.Semaphore(concurrency)
        self.codec = RawCodec()
        self.opened = 0
        self.open_now = 0
        self.responses = 0
        self.errors: list[str] = []
        self.ready = asyncio.Event()
        self.token: bytes | None = None
        self.absent = False
        self.timeout = 30.0
        self.got: list[float | None] = [None] * streams
        self.count = 0
        self.done = asyncio.Event()
        self.channels: list[Channel] = []
        self.started_at = time.monotonic()
        self.ready_at = 0.0

    async def probe(self) -> None:
        """Set ``reachable`` once a connect to the socket succeeds (every 2 ms until then)."""
        while True:
            try:
                _, writer = await asyncio.open_unix_connection(self.path)
            except OSError:
                await asyncio.sleep(0.002)
                continue
            writer.close()
            self.reachable.set()
            return

    def lost(self) -> None:
        if self.reachable.is_set() and (self.probing is None or self.probing.done()):
            self.reachable.clear()
            self.probing = asyncio.create_task(self.probe())

    async def one(self, k: int) -> None:
        await self.gate.acquire()
        got = await self.attempt(k)
        if not self.ever_opened[k]:
            self.gate.release()  # opened streams released it at their first response
        while self.reconnect:
            if got:
                self.lost()
            else:
                self.reconnect_failures += 1
                await asyncio.sleep(random.uniform(0.002, 0.01))
            await self.reachable.wait()
            self.reconnects += 1
            got = await self.attempt(k)

    async def attempt(self, k: int) -> bool:
        """One connection's life: a stream, answered and ACKed; whether it got a response."""
        got_response = False
        channel = Channel(path=self.path, codec=self.codec)
        self.channels.append(channel)
        names = self.names
        try:
            async with channel.request(
                f"{SDS_SERVICE}/StreamSecrets", Cardinality.STREAM_STREAM, bytes, bytes
            ) as stream:
                node_id = f"{self.prefix}-{k}"
                template = self.node_template
                await stream.send_message(
                    discovery_request(names, node_id=node_id, node_template=template)
                )
                while True:
                    raw = await stream.recv_message()
                    if raw is None:
                        break
                    now = time.monotonic()
                    self.responses += 1
                    token = self.token
                    if token is not None and self.got[k] is None and (token in raw) != self.absent:
                        self.got[k] = now
                        self.count += 1
                        if self.count == self.n:
                            self.done.set()
                    version, nonce = response_fields(raw)
                    # Envoy (1.40 default) repeats its node on every request, ACKs included;
                    # with set_node_on_first_message_only (sds envoy-bootstrap) it does not.
                    again = template is not None and not self.node_first_only
                    await stream.send_message(
                        discovery_request(
                            names,
                            version=version,
                            nonce=nonce,
                            node_id=node_id if again else None,
                            node_template=template if again else None,
                        )
                    )
                    if not got_response:
                        got_response = True
                        self.open_now += 1
                    if not self.ever_opened[k]:
                        self.ever_opened[k] = True
                        self.opened += 1
                        self.gate.release()
                        if self.opened == self.n:
                            self.ready_at = time.monotonic()
                            self.ready.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self.reconnect:
                self.errors.append(f"stream {k}: {exc!r}")
        finally:
            if got_response:
                self.open_now -= 1
            channel.close()
        return got_response


def emit(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prefix", default="load")
    parser.add_argument("--names", default="default")
    parser.add_argument("--node-file", help="serialized Node to send, like Envoy, on every request")
    parser.add_argument(
        "--node-first-only",
        action="store_true",
        help="send the node on a stream's first request only (set_node_on_first_message_only)",
    )
    parser.add_argument(
        "--reconnect", action="store_true", help="reconnect when the server goes away"
    )
    args = parser.parse_args()

    template = None
    if args.node_file:
        with open(args.node_file, "rb") as handle:  # noqa: ASYNC230 - once, before serving
            template = handle.read()
    load = Load(
        path=args.socket,
        streams=args.streams,
        concurrency=args.concurrency,
        prefix=args.prefix,
        names=args.names.split(","),
        node_template=template,
        reconnect=args.reconnect,
        node_first_only=args.node_first_only,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    tasks = [asyncio.create_task(load.one(k)) for k in range(args.streams)]

    async def announce_ready() -> None:
        await load.ready.wait()
        emit(
            {
                "event": "ready",
                "streams": load.opened,
                "open_seconds": load.ready_at - load.started_at,
                "errors": load.errors[:5],
            }
        )

    async def finish(expect_id: int) -> None:
        try:
            async with asyncio.timeout(load.timeout):
                await load.done.wait()
            emit({"event": "done", "id": expect_id, "times": load.got})
        except TimeoutError:
            emit(
                {"event": "timeout", "id": expect_id, "got": load.count, "errors": load.errors[:5]}
            )

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    background = [asyncio.create_task(announce_ready())]

    async def commands() -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            cmd = json.loads(line)
            if cmd["cmd"] == "expect":
                load.got = [None] * load.n
                load.count = 0
                load.done.clear()
                load.token = base64.b64decode(cmd["token"])
                load.absent = bool(cmd.get("absent", False))
                load.timeout = float(cmd.get("timeout", 30.0))
                emit({"event": "armed", "id": cmd["id"]})
                background.append(asyncio.create_task(finish(cmd["id"])))
            elif cmd["cmd"] == "stats":
                emit(
                    {
                        "event": "stats",
                        "open": load.open_now,
                        "opened": load.opened,
                        "responses": load.responses,
                        "errors": len(load.errors),
                        "reconnects": load.reconnects,
                        "reconnect_failures": load.reconnect_failures,
                        "first_errors": load.errors[:5],
                    }
                )

    command_task = asyncio.create_task(commands())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({command_task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in [*tasks, *background, command_task, stopping]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in load.channels:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
