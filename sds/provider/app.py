"""``sds workload-api``: serve the embedded SPIFFE Workload API on a Unix socket.

The socket is mode 0600 by default: only processes of the provider's own uid
can connect. On a host where workloads run as several uids, use
``--socket-mode 666`` and rely on attestation: every caller is identified by
the kernel (SO_PEERCRED) and gets only the identities its rules allow.

Signals: SIGTERM/SIGINT stop gracefully (the socket file is removed, exit 0);
SIGHUP re-reads the identities and federation files; if they are invalid the
error is logged as one line and the previous configuration stays in force.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datetime as dt

    from sds.provider.ca import LocalCA
    from sds.provider.identities import FederatedBundle, Identity

__all__ = ["add_arguments", "run"]

logger = logging.getLogger("sds.provider")


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

    from sds.errors import ConfigError, InvalidSpiffeId  # noqa: PLC0415
    from sds.provider.ca import LocalCA  # noqa: PLC0415
    from sds.provider.identities import (  # noqa: PLC0415
        MIN_TTL,
        load_federation,
        load_identities,
        parse_duration,
    )
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
    return asyncio.run(
        _serve(
            args,
            ca=ca,
            identities=identities,
            federation=federation,
            mode=mode,
            x509_ttl=ttls["--x509-ttl"],
            jwt_ttl=ttls["--jwt-ttl"],
        )
    )


async def _serve(
    args: argparse.Namespace,
    *,
    ca: LocalCA,
    identities: Sequence[Identity],
    federation: Sequence[FederatedBundle],
    mode: int,
    x509_ttl: dt.timedelta,
    jwt_ttl: dt.timedelta,
) -> int:
    import asyncio  # noqa: PLC0415
    import signal  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from sds._util.log import event  # noqa: PLC0415
    from sds._util.peercred import listen_unix  # noqa: PLC0415
    from sds.errors import ConfigError  # noqa: PLC0415
    from sds.provider.identities import load_federation, load_identities  # noqa: PLC0415
    from sds.provider.service import WorkloadApiProvider  # noqa: PLC0415

    provider = WorkloadApiProvider(ca, identities, federation, x509_ttl, jwt_ttl)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            new_identities = load_identities(Path(args.identities), provider.trust_domain)
            new_federation = load_federation(args.federate, provider.trust_domain)
        except ConfigError as exc:
            event(logger, logging.ERROR, "provider.reload_failed", error=str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - policy: a reload never takes the provider down
            event(
                logger,
                logging.ERROR,
                "provider.reload_failed",
                error=f"unexpected {type(exc).__name__}: {exc}",
            )
            return
        provider.reload(new_identities, new_federation)
        event(
            logger,
            logging.INFO,
            "provider.reloaded",
            identities=len(new_identities),
            federated=len(new_federation),
        )

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        listener = listen_unix(args.socket, mode)
    except BaseException:
        for sig in signals:
            loop.remove_signal_handler(sig)
        raise
    await provider.start(listener)
    event(
        logger,
        logging.INFO,
        "provider.ready",
        socket=args.socket,
        trust_domain=provider.trust_domain,
        identities=len(provider.identities),
        federated=len(provider.federation),
        socket_mode=f"{mode:o}",
    )
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await provider.close()
    event(logger, logging.INFO, "provider.stopped", socket=args.socket)
    return 0
