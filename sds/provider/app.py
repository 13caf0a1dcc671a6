"""``sds workload-api``: serve the embedded SPIFFE Workload API on a Unix socket.

The socket is mode 0600 by default: only processes of the provider's own uid
can connect. On a host where workloads run as several uids, use
``--socket-mode 666`` and rely on attestation: every caller is identified by
the kernel (SO_PEERCRED) and gets only the identities its rules allow.

With ``--admin-socket`` the provider also serves SPIRE's Delegated Identity
API there (:mod:`sds.provider.delegated`; SPIRE's ``admin_socket_path``): a
caller holding an identity listed with ``--authorized-delegate`` (SPIRE's
``authorized_delegates``) may fetch the SVIDs of any workload it names by pid,
attested with the same rules. Like SPIRE, the admin socket may not be in the
Workload API socket's directory or below it, so that socket's directory can be
shared with workloads without exposing the admin API; it is mode 0600 unless
``--admin-socket-mode`` says otherwise.

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

    from sds.spiffe.id import SpiffeId, TrustDomain

__all__ = ["MSG_ADMIN_DIR", "add_arguments", "admin_socket_path", "authorized_delegates", "run"]


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
        "--admin-socket",
        metavar="PATH",
        help="also serve SPIRE's Delegated Identity API on this Unix socket (SPIRE's "
        "admin_socket_path); not in the --socket directory or below it",
    )
    parser.add_argument(
        "--admin-socket-mode",
        default="600",
        metavar="OCTAL",
        help="admin socket file mode (default 600: same uid only)",
    )
    parser.add_argument(
        "--authorized-delegate",
        action="append",
        default=[],
        metavar="SPIFFE_ID",
        help="a SPIFFE ID of this trust domain whose holders may use the admin socket's "
        "Delegated Identity API (SPIRE's authorized_delegates; repeatable)",
    )
    parser.add_argument(
        "--x509-ttl", default="1h", metavar="DURATION", help="X.509-SVID lifetime (default 1h)"
    )
    parser.add_argument(
        "--jwt-ttl", default="5m", metavar="DURATION", help="JWT-SVID lifetime (default 5m)"
    )


def _socket_mode(text: str, option: str = "--socket-mode") -> int:
    import re  # noqa: PLC0415

    from sds.errors import ConfigError  # noqa: PLC0415

    if not re.fullmatch(r"0?[0-7]{3}", text):
        shown = repr(text) if len(text) <= 20 else repr(text[:15]) + "..."
        raise ConfigError(f"{option}: want an octal mode like 600 or 666, got {shown}")
    return int(text, 8)


MSG_ADMIN_DIR = (
    "--admin-socket: admin socket cannot be in the same directory or a subdirectory as that "
    "containing the Workload API socket"
)


def admin_socket_path(admin: str, workload: str) -> str:
    """``admin`` made absolute; ConfigError if it is in ``workload``'s directory or below.

    SPIRE's rule (``getAdminAddr`` in ``cmd/spire-agent/cli/run/run_posix.go``): both
    paths made absolute without resolving symlinks, then a prefix test.
    """
    import os  # noqa: PLC0415

    from sds.errors import ConfigError  # noqa: PLC0415

    admin_abs = os.path.abspath(admin)
    if admin_abs.startswith(os.path.dirname(os.path.abspath(workload)) + "/"):
        raise ConfigError(MSG_ADMIN_DIR)
    return admin_abs


def authorized_delegates(values: list[str], trust_domain: TrustDomain) -> tuple[SpiffeId, ...]:
    """Each ``--authorized-delegate``, a SPIFFE ID in ``trust_domain`` (SPIRE checks the same)."""
    from sds._util.text import show  # noqa: PLC0415
    from sds.errors import ConfigError, InvalidSpiffeId  # noqa: PLC0415
    from sds.spiffe.id import SpiffeId  # noqa: PLC0415

    delegates: list[SpiffeId] = []
    for value in values:
        try:
            delegate = SpiffeId.parse(value)
        except InvalidSpiffeId as exc:
            raise ConfigError(f"--authorized-delegate {show(value)}: {exc}") from exc
        if delegate.trust_domain != trust_domain:
            raise ConfigError(
                f"--authorized-delegate {show(value)}: not in the trust domain {trust_domain.name}"
            )
        delegates.append(delegate)
    return tuple(delegates)


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
    admin_mode = _socket_mode(args.admin_socket_mode, "--admin-socket-mode")
    delegates = authorized_delegates(args.authorized_delegate, trust_domain)
    admin_socket: str | None = None
    if args.admin_socket is not None:
        admin_socket = admin_socket_path(args.admin_socket, args.socket)
    elif delegates:
        raise ConfigError("--authorized-delegate: needs --admin-socket to serve the delegates on")
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
    admin = None
    if admin_socket is not None:
        from sds.provider.delegated import AdminApi  # noqa: PLC0415

        admin = AdminApi(provider.service, delegates)
    app = ProviderApp(
        provider,
        socket=args.socket,
        mode=mode,
        identities=identities_path,
        federate=args.federate,
        admin=admin,
        admin_socket=admin_socket,
        admin_mode=admin_mode,
    )
    return asyncio.run(app.run())
