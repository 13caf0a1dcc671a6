"""``sds run``: consume the Workload API and serve Envoy SDS until SIGTERM.

Startup order matters to Envoy and Istio, which probe the socket: the admin
endpoint comes up first (``/readyz`` says 503 with a reason), the upstream
watch starts, and the SDS socket is bound only once the first valid X.509
context has arrived, so anything that finds the socket can get secrets.

The socket's directory must be ours (or root's) and not writable by others
without the sticky bit; a socket path where something still accepts
connections is refused (another bridge owns it); only a stale socket is
replaced; on exit the socket is removed only if it is still our inode.
Every start-up failure is one line and exit 2.

SIGHUP reloads the config file without dropping streams: the file is read
twice a moment apart (a file still being written is a failed reload), an
empty or invalid file is a failed reload (``config.reload_failed``, old
state kept), widened security settings are logged loudly
(``config.widened``), keys that need a restart are named
(``config.restart_needed``) and the rest is applied live (``config.reloaded
applied=...``). SIGTERM and SIGINT stop gracefully at any moment (exit 0).

This module is the command line; :class:`sds.bridge.root.BridgeApp` is the
composition root (what starts and stops in which order, who owns each task,
and the policy for a task that crashes: log it once and exit 1). It is
imported only once SIGTERM is handled, so a stop during the imports is clean.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_arguments", "run"]


class _Stopped(Exception):
    """SIGTERM arrived before the event loop took over the signal."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see docs/configuration.md)")
    parser.add_argument(
        "--workload-api",
        action="append",
        default=[],
        metavar="ADDR",
        help="upstream Workload API, unix:///path or tcp://ip:port (repeatable; "
        "default: $SPIFFE_ENDPOINT_SOCKET)",
    )
    parser.add_argument(
        "--listen", metavar="ADDR", help="unix:///path (default) or tcp://127.0.0.1:PORT"
    )
    parser.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="loopback HTTP for /readyz, /metrics ('off' to disable)",
    )
    parser.add_argument(
        "--metrics",
        metavar="IP:PORT",
        help="scrape listener: /metrics, /healthz, /readyz only; may bind any IP (default off)",
    )


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped


def run(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415
    import signal  # noqa: PLC0415

    # Until the loop installs its handlers: SIGTERM stops cleanly, SIGHUP is not fatal.
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        from sds.bridge.config import BridgeConfig, load_config  # noqa: PLC0415
        from sds.bridge.root import BridgeApp, require_listen  # noqa: PLC0415

        flags = {
            "workload_api": args.workload_api,
            "listen": args.listen,
            "admin": args.admin,
            "metrics": getattr(args, "metrics", None),
        }
        config = load_config(args.config) if args.config else BridgeConfig(source="flags")
        config = config.with_overrides(**flags)
        require_listen(config)
        return asyncio.run(BridgeApp.main(config, args.config, flags))
    except (_Stopped, KeyboardInterrupt):
        return 0
