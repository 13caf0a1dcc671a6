"""``sds workload-api``: serve the embedded SPIFFE Workload API on a Unix socket.

The socket is mode 0600 by default: only processes of the provider's own uid
can connect. On a host where workloads run as several uids, use
``--socket-mode 666`` and rely on attestation: every caller is identified by
the kernel (SO_PEERCRED) and gets only the identities its rules allow.

Signals: SIGTERM/SIGINT stop gracefully (the socket file is removed, exit 0);
SIGHUP re-reads the identities and federation files; if they are invalid the
error is logged as one line and the previous configuration stays in force.

This module is the command line; :class:`sds.provider.root.ProviderApp` is the
composition root (start and shutdown order, task ownership, and the policy for
a task that crashes: log it once and exit 1).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datetime as dt

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``workload-api`` options."""
    parser.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to serve on")
    parser.add_argument(
        "--trust-domain", required=True, metavar="TD", help="trust domain to issue SVIDs for"
    )
    parser.add_argument(
        "--identities",
        required=True,
        metavar="FILE_OR_DIR",
        help="workload_identity YAML file, or a directory of *.yaml/*.yml files",
    )
    state = parser.add_mutually_exclusive_group(required=True)
    state.add_argument(
        "--state-dir", metavar="DIR", help="keep the CA here (0700) and reuse it on restart"
    )
    state.add_argument(
        "--ephemeral", action="store_true", help="keep the CA in memory only; write nothing"
    )
    parser.add_argument(
        "--socket-mode",
        default="600",
        metavar="OCTAL",
        help="socket file mode (default 600: same uid only; 666 for multi-uid hosts, "
        "relying on attestation)",
    )
    parser.add_argument(
        "--federate",
        action="append",
        default=[],
        metavar="TD=FILE",
        help="trust a foreign trust domain: PEM CA certificates or SPIFFE bundle JWKS (repeatable)",
    )
    parser.add_argument(
        "--x509-ttl", default="1h", metavar="DURATION", help="X.509-SVID lifetime (default 1h)"
    )
    parser.add_argument(
        "--jwt-ttl", default="5m", metavar="DURATION", help="JWT-SVID lifetime (default 5m)"
    )


def _socket_mode(text: str) -> int:
    import re  # noqa: PLC0415

    from sds.errors import ConfigError  # noqa: PLC0415

    if not re.fullmatch(r"0?[0-7]{3}", text):
        shown = repr(text) if len(text) <= 20 else repr(text[:15]) + "..."
        raise ConfigError(f"--socket-mode: want an octal mode like 600 or 666, got {shown}")
    return int(text, 8)


def run(args: argparse.Namespace) -> int:
    """Load configuration, start the CA and serve until SIGTERM/SIGINT; return the exit code."""
    import asyncio  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from sds._util.duration import parse_duration  # noqa: PLC0415
    from sds.errors import ConfigError, InvalidSpiffeId  # noqa: PLC0415
    from sds.provider.ca import LocalCA  # noqa: PLC0415
    from sds.provider.identities import MIN_TTL, load_federation, load_identities  # noqa: PLC0415
    from sds.provider.root import ProviderApp  # noqa: PLC0415
    from sds.provider.service import WorkloadApiProvider  # noqa: PLC0415
    from sds.spiffe.id import TrustDomain  # noqa: PLC0415

    try:
        trust_domain = TrustDomain.parse(args.trust_domain)
    except InvalidSpiffeId as exc:
        raise ConfigError(f"--trust-domain: {exc}") from exc
    ttls: dict[str, dt.timedelta] = {}
    for option, value in (("--x509-ttl", args.x509_ttl), ("--jwt-ttl", args.jwt_ttl)):
        try:
            ttls[option] = parse_duration(value)
        except ValueError as exc:
            raise ConfigError(f"{option}: {exc}") from exc
        if ttls[option] < MIN_TTL:
            raise ConfigError(f"{option}: must be at least {int(MIN_TTL.total_seconds())}s")
    mode = _socket_mode(args.socket_mode)
    identities_path = Path(args.identities)
    identities = load_identities(identities_path, trust_domain)
    federation = load_federation(args.federate, trust_domain)
    if args.ephemeral:
        ca = LocalCA.ephemeral(trust_domain)
    else:
        try:
            ca = LocalCA.load_or_create(trust_domain, Path(args.state_dir))
        except OSError as exc:
            raise ConfigError(f"--state-dir {args.state_dir}: {exc.strerror or exc}") from exc
    provider = WorkloadApiProvider(
        ca, identities, federation, ttls["--x509-ttl"], ttls["--jwt-ttl"]
    )
    app = ProviderApp(
        provider, socket=args.socket, mode=mode, identities=identities_path, federate=args.federate
    )
    return asyncio.run(app.run())
