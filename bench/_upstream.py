"""Benchmark helper process: a fake SPIFFE Workload API that rotates the SVID on command.

``python bench/_upstream.py --socket PATH --material FILE``

Serves ``tests.harness.fake_workload_api.FakeWorkloadApi`` on a Unix socket with the
first server SVID of the material file. Every X509SVIDResponse is built
before serving. Each line ``<i>`` on stdin makes SVID ``i`` the state and
pushes it to every open FetchX509SVID stream (the only work done between
reading the line and writing the gRPC frame). Prints ``{"event": "ready"}``
once listening; exits on stdin EOF or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import load_material

from tests.harness.fake_workload_api import FakeWorkloadApi, x509_response


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--material", required=True)
    args = parser.parse_args()

    bundle, svids = load_material(Path(args.material))
    responses = [x509_response([svid], [bundle]) for svid in svids]
    fake = FakeWorkloadApi()
    fake.set_x509(responses[0])
    await fake.start_unix(Path(args.socket))

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"event": "ready"}), flush=True)

    async def commands() -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            text = line.strip()
            if text:
                fake.set_x509(responses[int(text)])

    task = asyncio.create_task(commands())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    stopping.cancel()
    await fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
