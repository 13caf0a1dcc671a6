"""``sds wait``: block until the bridge is ready, for init containers and scripts.

``--socket``: ready when the socket answers an SDS ``FetchSecrets`` call (a
real gRPC exchange, not just a connect, so a stale or foreign socket never
passes): with secrets, or with PERMISSION_DENIED (an SDS server that is up but
does not serve this uid). ``--admin``: ready when ``/readyz`` answers 200,
which the bridge says only when every configured name can be served. Exit 0
when ready, 1 on timeout with one line saying what was last seen.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--socket", metavar="unix:///PATH", help="wait until the SDS socket answers"
    )
    target.add_argument(
        "--admin", metavar="HOST:PORT", help="wait until http://HOST:PORT/readyz is 200"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")


PROBE_SECONDS = 2.0  # one FetchSecrets probe


def _probe_socket(path: str) -> str | None:
    import asyncio  # noqa: PLC0415
    import os  # noqa: PLC0415

    if not os.path.exists(path):
        return "socket does not exist yet"
    return asyncio.run(_fetch_probe(path))


async def _fetch_probe(path: str) -> str | None:
    import asyncio  # noqa: PLC0415

    from grpclib.client import Channel  # noqa: PLC0415
    from grpclib.const import Cardinality, Status  # noqa: PLC0415
    from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError  # noqa: PLC0415

    from sds.xds.codec import (  # noqa: PLC0415
        SECRET_TYPE_URL,
        DiscoveryResponse,
        LiteRequest,
    )

    channel = Channel(path=path)
    try:
        async with (
            asyncio.timeout(PROBE_SECONDS),
            channel.request(
                "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets",
                Cardinality.UNARY_UNARY,
                LiteRequest,
                DiscoveryResponse,
            ) as reply,
        ):
            # type_url only: every name. The lite DiscoveryRequest is Envoy's, minus the Node.
            await reply.send_message(LiteRequest(type_url=SECRET_TYPE_URL), end=True)
            body: Any = await reply.recv_message()
    except TimeoutError:
        return f"socket does not answer an SDS call within {PROBE_SECONDS:g}s"
    except GRPCError as exc:
        if exc.status is Status.PERMISSION_DENIED:
            return None  # an SDS server, up, that does not serve this uid
        if exc.status is Status.NOT_FOUND:
            return "the SDS server serves no secrets yet"
        return f"socket is not an SDS server: {exc.status.name}: {exc.message or ''}".rstrip(": ")
    except (OSError, ProtocolError, StreamTerminatedError) as exc:
        return f"socket does not speak gRPC: {type(exc).__name__}: {exc}".rstrip(": ")
    except Exception as exc:  # noqa: BLE001 - h2 or framing errors from a peer speaking nonsense
        return f"socket does not speak gRPC: {type(exc).__name__}"
    finally:
        channel.close()
    if body is None or not body.resources:
        return "the SDS server serves no secrets yet"
    return None


def _probe_admin(address: str) -> str | None:
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=2) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return exc.read().decode(errors="replace").strip() or f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"admin endpoint not answering: {getattr(exc, 'reason', exc)}"


def run(args: argparse.Namespace) -> int:
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    from sds.errors import ConfigError  # noqa: PLC0415
    from sds.workloadapi.address import unix_socket_path  # noqa: PLC0415

    if args.socket is not None:
        try:
            path = unix_socket_path(args.socket)
        except ValueError as exc:
            raise ConfigError(f"--socket {args.socket!r}: {exc}") from None

        def probe() -> str | None:
            return _probe_socket(path)
    else:
        address = args.admin

        def probe() -> str | None:
            return _probe_admin(address)

    deadline = time.monotonic() + args.timeout
    while True:
        problem = probe()
        if problem is None:
            print("ready")
            return 0
        if time.monotonic() >= deadline:
            print(f"sds wait: not ready after {args.timeout:g}s: {problem}", file=sys.stderr)
            return 1
        time.sleep(0.2)
