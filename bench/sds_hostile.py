"""Hostile clients against the SDS server, measured from outside: RSS and fds of the server.

Usage: ``.venv/bin/python bench/sds_hostile.py [--big N] [--resets N] [--stuck N]``

The server runs in a child process (``--serve``: an :class:`SdsServer` with an
ephemeral CA and one SVID, the same code ``sds run`` serves with), so its VmRSS
is not mixed with the attacking client's. In order, with RSS read before,
at the peak (VmHWM) and 2 s after each attack:

1. ``--big`` requests just under the 4 MiB message limit on one connection;
2. one message declaring 4 GiB - 1, followed by as much data as the server takes;
3. ``--resets`` streams opened and reset at once, 50 at a time;
4. ``--stuck`` connections that never finish the HTTP/2 preface (server fds counted
   until the handshake timeout closes them; the child uses a 2 s timeout);
5. a burst of 2,000 non-blocking connects while the server is busy (refusals counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
from _common import PYTHON, SDS_SERVICE, SECRET_TYPE_URL, rss_kb

from sds._proto.discovery_lite_pb2 import DiscoveryRequest
from tests.harness.h2async import RawClient, grpc_frame

STREAM = f"{SDS_SERVICE}/StreamSecrets"


def _serve(path: str) -> None:
    import datetime as dt

    from sds._util.peercred import bind_unix_socket
    from sds.bridge.config import BridgeConfig
    from sds.bridge.state import Bridge
    from sds.provider.ca import LocalCA
    from sds.spiffe.id import SpiffeId, TrustDomain
    from sds.spiffe.x509 import BundleSet, X509Context
    from sds.xds.cache import SecretCache
    from sds.xds.service import SdsServer, SdsServicer
    from tests.harness.static_upstream import StaticSource

    async def main() -> None:
        td = TrustDomain("example.org")
        ca = LocalCA.ephemeral(td)
        svid = ca.issue_x509_svid(SpiffeId.from_path(td, "/web"), dt.timedelta(hours=1))
        source = StaticSource(X509Context((svid,), BundleSet([ca.bundle])))
        bridge = Bridge(BridgeConfig(), [source], cache=SecretCache())
        source.set(source.ctx)
        server = SdsServer(SdsServicer(bridge.cache), handshake_timeout=2.0)
        await server.start(sock=bind_unix_socket(path))
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def hwm_reset(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM


def hwm(pid: int) -> int:
    return _common.hwm_kb(pid)


def request(names: list[str], pad: int = 0) -> bytes:
    message = DiscoveryRequest(
        resource_names=names, type_url=SECRET_TYPE_URL, version_info="v" * pad
    )
    data: bytes = message.SerializeToString()
    return data


async def send_all(client: RawClient, sid: int, data: bytes, end: bool = True) -> int:
    conn, sent = client.conn, 0
    deadline = time.monotonic() + 30
    while sent < len(data) and time.monotonic() < deadline:
        if client.replies[sid].done.is_set():
            break
        window = conn.local_flow_control_window(sid)
        if window <= 0:
            await asyncio.sleep(0.001)
            continue
        n = min(window, conn.max_outbound_frame_size, len(data) - sent)
        try:
            conn.send_data(sid, data[sent : sent + n], end_stream=end and sent + n == len(data))
        except Exception:  # the server reset the stream
            break
        sent += n
        client.writer.write(conn.data_to_send())
        await client.writer.drain()
    return sent


async def attacks(path: str, pid: int, args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}

    def sample(name: str, before: int) -> None:
        peak = hwm(pid)
        time.sleep(2)
        out[name] = {
            "rss_before_mb": round(before / 1024, 1),
            "peak_mb": round(peak / 1024, 1),
            "rss_after_2s_mb": round(rss_kb(pid) / 1024, 1),
        }
        print(name, out[name], flush=True)

    out["idle_rss_mb"] = round(rss_kb(pid) / 1024, 1)
    # 1. big messages
    big = request(["default"], pad=4 * 1024 * 1024 - 200)
    before = rss_kb(pid)
    hwm_reset(pid)
    client = await RawClient.connect(path)
    for _ in range(args.big):
        reply = client.start(STREAM, b"", end=False)
        await send_all(client, max(client.replies), grpc_frame(big))
        await asyncio.wait_for(reply.done.wait(), 30)
        client.replies.clear()
    await client.close()
    sample(f"{args.big} requests of 4 MiB", before)
    # 2. declared 4 GiB
    before = rss_kb(pid)
    hwm_reset(pid)
    client = await RawClient.connect(path)
    reply = client.start(STREAM, b"", end=False)
    sid = max(client.replies)
    sent = await send_all(
        client, sid, grpc_frame(b"\x0a" * (64 << 20), length=0xFFFFFFFF), end=False
    )
    try:
        await asyncio.wait_for(reply.done.wait(), 30)
        out["declared_4gib_status"] = (reply.status, reply.message, f"{sent} bytes sent")
    except TimeoutError:
        out["declared_4gib_status"] = ("no answer in 30 s", None, f"{sent} bytes sent")
    await client.close()
    sample("declared 4 GiB message", before)
    # 3. rapid resets
    before = rss_kb(pid)
    hwm_reset(pid)
    client = await RawClient.connect(path)
    frame = grpc_frame(request(["default"]))
    for _ in range(args.resets // 50):
        ids = []
        for _ in range(50):
            client.start(STREAM, frame, end=False)
            ids.append(max(client.replies))
        client.writer.write(client.conn.data_to_send())
        for sid in ids:
            client.conn.reset_stream(sid)
        client.writer.write(client.conn.data_to_send())
        await client.writer.drain()
        client.replies.clear()
    await client.close()
    sample(f"{args.resets} stream resets", before)
    # 4. stuck in the preface
    base = fds(pid)
    stuck = []
    for i in range(args.stuck):
        _, writer = await asyncio.open_unix_connection(path)
        writer.write(b"PRI * HTTP/2.0\r\n"[: i % 16])
        stuck.append(writer)
    await asyncio.sleep(0.5)
    held = fds(pid)
    start = time.monotonic()
    while fds(pid) > base and time.monotonic() - start < 30:  # noqa: ASYNC110 - another process
        await asyncio.sleep(0.1)
    out["stuck_connections"] = {
        "server_fds_before": base,
        "while_stuck": held,
        "after": fds(pid),
        "closed_within_s": round(time.monotonic() - start + 0.5, 1),
    }
    print("stuck", out["stuck_connections"], flush=True)
    for writer in stuck:
        writer.close()
    # 5. connect burst (the loop here is blocked: nothing is read, the server accepts alone)
    refused = 0
    socks = []
    for _ in range(2000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except (BlockingIOError, ConnectionRefusedError):
            refused += 1
        socks.append(s)
    for s in socks:
        s.close()
    out["burst_2000_connects_refused"] = refused
    print("burst refused", refused, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--big", type=int, default=100)
    parser.add_argument("--resets", type=int, default=10_000)
    parser.add_argument("--stuck", type=int, default=200)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve)
        return 0
    with tempfile.TemporaryDirectory(prefix="sdsh-", dir="/tmp") as tmp:
        path = str(Path(tmp) / "sds.sock")
        child = subprocess.Popen(
            [PYTHON, __file__, "--serve", path], stdout=subprocess.PIPE, start_new_session=True
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == b"ready"
            result = asyncio.run(attacks(path, child.pid, args))
        finally:
            child.terminate()
            child.wait(10)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
