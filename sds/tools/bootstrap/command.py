"""``sds envoy-bootstrap`` on the command line: flags, their checks, and writing the files."""

from __future__ import annotations

import argparse
import ipaddress
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from sds.tools.bootstrap.options import (
    BUILTIN_NAMES,
    DEFAULT_ADMIN_SOCKET,
    DEFAULT_POLICY_NAME,
    NAME_RE,
    BootstrapOptions,
    Outbound,
    config_error,
    is_ip,
    parse_inbound,
    parse_outbound,
    parse_peer_id,
    parse_port,
    parse_seconds,
)
from sds.tools.bootstrap.render import SNIPPET_MARKER, render_bootstrap, render_bridge_snippet

__all__ = ["add_arguments", "options_from_args", "run"]


class _OrderedAction(argparse.Action):
    """Records ``--outbound`` and ``--expect`` in command-line order, so each ``--expect``
    belongs to the ``--outbound`` before it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((option_string, values))
        setattr(namespace, self.dest, items)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``sds envoy-bootstrap`` flags (values are checked in :func:`run`)."""
    parser.add_argument("--node-id", metavar="ID", help="Envoy node id (required)")
    parser.add_argument("--node-cluster", metavar="C", default="", help="default: the node id")
    parser.add_argument("--sds-socket", metavar="PATH", help="the bridge's unix socket (required)")
    parser.add_argument("--protocol", choices=["http", "tcp"], default="http")
    parser.add_argument(
        "--inbound",
        metavar="LISTEN_PORT:APP_HOST:APP_PORT",
        help="mTLS listener in front of the local app",
    )
    parser.add_argument(
        "--inbound-address",
        metavar="IP",
        default="0.0.0.0",  # noqa: S104
        help="address of the inbound listener (default 0.0.0.0)",
    )
    parser.add_argument(
        "--allow",
        metavar="SPIFFE_ID",
        action="append",
        default=[],
        help="caller admitted inbound: an ID or a prefix spiffe://td/path/* (repeatable)",
    )
    parser.add_argument(
        "--allow-any-in-trust-domain",
        action="store_true",
        help="admit every workload of the bridge's own trust domain (ROOTCA) instead",
    )
    parser.add_argument(
        "--policy-name",
        metavar="NAME",
        default=DEFAULT_POLICY_NAME,
        help=f"bridge policy validating callers (default {DEFAULT_POLICY_NAME})",
    )
    parser.add_argument(
        "--outbound",
        dest="routes",
        action=_OrderedAction,
        metavar="LOCAL_HOST:LOCAL_PORT=REMOTE_HOST:REMOTE_PORT",
        help="loopback listener for the app, mTLS to the remote (repeatable)",
    )
    parser.add_argument(
        "--expect",
        dest="routes",
        action=_OrderedAction,
        metavar="SPIFFE_ID",
        help="server ID accepted by the --outbound before it (repeatable, >= 1 each)",
    )
    parser.add_argument(
        "--bridge-config", metavar="FILE", help="also write the bridge policy snippet here"
    )
    parser.add_argument(
        "--admin-socket",
        metavar="PATH",
        help=f"Envoy's admin as a 0600 unix socket (default {DEFAULT_ADMIN_SOCKET})",
    )
    parser.add_argument(
        "--admin-port",
        metavar="N",
        help="Envoy's admin on loopback TCP instead (any local user can reach it)",
    )
    parser.add_argument("--api-type", choices=["sotw", "delta"], default="sotw")
    parser.add_argument(
        "--initial-fetch-timeout",
        metavar="SECONDS",
        default="0",
        help="0 (default): stay unready until secrets arrive",
    )
    parser.add_argument(
        "--max-connection-duration",
        metavar="SECONDS",
        default="600",
        help="drain connections older than this (default 600, 0 = never)",
    )
    parser.add_argument(
        "--request-timeout",
        metavar="SECONDS",
        default="60",
        help="HTTP route timeout (default 60, 0 = none)",
    )
    parser.add_argument(
        "--jwt-audience",
        metavar="AUD",
        help="outbound: attach a JWT-SVID for AUD (bridge secret jwt-svid:AUD); inbound "
        "(with --jwks-uri): require one for AUD",
    )
    parser.add_argument(
        "--jwks-uri",
        metavar="URL",
        help="inbound: the bridge's JWKS, http://127.0.0.1:ADMIN_PORT/jwks/TRUST_DOMAIN",
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="default: stdout")


def options_from_args(args: argparse.Namespace) -> BootstrapOptions:
    """Validate parsed flags; raise ConfigError with one line naming the flag."""
    if not args.node_id:
        raise config_error("--node-id is required")
    if not args.sds_socket:
        raise config_error("--sds-socket is required (the bridge's unix socket path)")
    socket = _socket_path(args.sds_socket, "--sds-socket")

    inbound = None
    allow = tuple(parse_peer_id(value, "--allow") for value in args.allow)
    if args.inbound is not None:
        inbound = parse_inbound(args.inbound, args.inbound_address)
        if args.allow_any_in_trust_domain and allow:
            raise config_error("--allow-any-in-trust-domain and --allow exclude each other")
        if not allow and not args.allow_any_in_trust_domain:
            raise config_error(
                "--inbound needs --allow SPIFFE_ID (or --allow-any-in-trust-domain): "
                "an open inbound listener is not a safe default"
            )
    elif allow or args.allow_any_in_trust_domain:
        raise config_error("--allow and --allow-any-in-trust-domain need --inbound")

    policy_name = args.policy_name
    if not NAME_RE.fullmatch(policy_name) or policy_name in BUILTIN_NAMES:
        raise config_error(
            f"--policy-name {policy_name!r}: want letters, digits, '.', '-', '_' and not a "
            f"built-in name ({', '.join(BUILTIN_NAMES)})"
        )

    outbounds: list[Outbound] = []
    pending: tuple[str, list[str]] | None = None
    for option, value in [*(args.routes or []), ("end", "")]:
        if option == "--expect":
            if pending is None:
                raise config_error(f"--expect {value!r}: must follow the --outbound it belongs to")
            pending[1].append(value)
            continue
        if pending is not None:
            outbounds.append(parse_outbound(*pending))
        pending = (value, []) if option == "--outbound" else None
    if inbound is None and not outbounds:
        raise config_error("nothing to generate: give --inbound and/or --outbound")

    options = BootstrapOptions(
        node_id=args.node_id,
        node_cluster=args.node_cluster,
        sds_socket=socket,
        protocol=args.protocol,
        inbound=inbound,
        allow=allow,
        allow_any_in_trust_domain=bool(args.allow_any_in_trust_domain and inbound is not None),
        policy_name=policy_name,
        outbounds=tuple(outbounds),
        admin_socket=_admin_socket(args.admin_socket, args.admin_port),
        admin_port=None
        if args.admin_port is None
        else parse_port(args.admin_port, "--admin-port", zero=True),
        api_type=args.api_type,
        initial_fetch_timeout=parse_seconds(args.initial_fetch_timeout, "--initial-fetch-timeout"),
        max_connection_duration=parse_seconds(
            args.max_connection_duration, "--max-connection-duration"
        ),
        request_timeout=parse_seconds(args.request_timeout, "--request-timeout"),
        bridge_config=args.bridge_config,
        output=args.output,
        jwt_audience=_jwt_audience(args.jwt_audience),
        jwks_uri=_jwks_uri(args.jwks_uri, args.jwt_audience, inbound is not None),
    )
    _check_ports(options)
    return options


def _admin_socket(value: str | None, port: str | None) -> str:
    if value is None:
        return DEFAULT_ADMIN_SOCKET
    if port is not None:
        raise config_error("--admin-socket and --admin-port exclude each other")
    return _socket_path(value, "--admin-socket")


def _socket_path(value: str, flag: str) -> str:
    """``/abs/path`` or ``unix:///abs/path``, as the path; ConfigError naming ``flag``."""
    from sds.workloadapi.address import unix_socket_path  # noqa: PLC0415

    try:
        return unix_socket_path(value, bare=True)
    except ValueError as exc:
        raise config_error(f"{flag} {value!r}: {exc}") from None


def _jwt_audience(value: str | None) -> str | None:
    if value is None:
        return None
    if not value or any(c.isspace() for c in value):
        raise config_error(f"--jwt-audience {value!r}: want a non-empty audience without spaces")
    return value


def _jwks_uri(value: str | None, audience: str | None, inbound: bool) -> str | None:
    if value is None:
        return None
    if audience is None or not inbound:
        raise config_error("--jwks-uri needs --inbound and --jwt-audience")
    url = urllib.parse.urlsplit(value)
    if url.scheme != "http" or not url.hostname or not is_ip(url.hostname):
        raise config_error(f"--jwks-uri {value!r}: want http://127.0.0.1:PORT/jwks/TRUST_DOMAIN")
    if not ipaddress.ip_address(url.hostname).is_loopback:
        raise config_error(f"--jwks-uri {value!r}: the bridge's JWKS is served on loopback only")
    return value


def _check_ports(options: BootstrapOptions) -> None:
    """Refuse two listeners (or the admin) on one fixed port of overlapping addresses."""
    used: list[tuple[str, int, str]] = []
    if options.admin_port is not None:
        used.append(("127.0.0.1", options.admin_port, "--admin-port"))
    if options.inbound is not None:
        used.append((options.inbound.address, options.inbound.port, "--inbound"))
    used += [(o.local_host, o.local_port, f"--outbound {o.spec!r}") for o in options.outbounds]
    for index, (host, port, flag) in enumerate(used):
        for other_host, other_port, other_flag in used[:index]:
            wildcard = (
                ipaddress.ip_address(host).is_unspecified
                or ipaddress.ip_address(other_host).is_unspecified
            )
            if port and port == other_port and (host == other_host or wildcard):
                raise config_error(f"{flag}: port {port} is already used by {other_flag}")


def _write_snippet(path: Path, text: str) -> None:
    """Write the policy snippet; never overwrite a file this command did not generate."""
    try:
        if path.exists() and not path.read_text(errors="replace").startswith(SNIPPET_MARKER):
            raise config_error(
                f"--bridge-config {str(path)!r}: exists and is not a snippet written by "
                "sds envoy-bootstrap; not overwriting it (merge the policy yourself)"
            )
        path.write_text(text)
    except OSError as exc:
        raise config_error(f"--bridge-config {str(path)!r}: {exc.strerror}") from exc


def run(args: argparse.Namespace) -> int:
    """Generate the bootstrap (stdout or ``-o``) and, with ``--bridge-config``, the snippet."""
    options = options_from_args(args)
    text = render_bootstrap(options)
    snippet = render_bridge_snippet(options)
    if options.bridge_config is not None:
        if snippet is None:
            raise config_error(
                "--bridge-config: no bridge policy to write (needs --inbound with --allow)"
            )
        _write_snippet(Path(options.bridge_config), snippet)
    if options.output is None:
        sys.stdout.write(text)
    else:
        try:
            Path(options.output).write_text(text)
        except OSError as exc:
            raise config_error(f"-o {options.output!r}: {exc.strerror}") from exc
    if options.admin_port is not None:
        print(
            f"sds envoy-bootstrap: warning: --admin-port puts Envoy's admin on TCP "
            f"127.0.0.1:{options.admin_port}, where every local user can stop Envoy "
            "(POST /quitquitquit); the default is a 0600 unix socket (--admin-socket)",
            file=sys.stderr,
        )
    if snippet is not None and options.bridge_config is None:
        print(
            f"sds envoy-bootstrap: note: the bridge config must contain policy "
            f"{options.policy_name!r} (see the header, or use --bridge-config FILE)",
            file=sys.stderr,
        )
    return 0
