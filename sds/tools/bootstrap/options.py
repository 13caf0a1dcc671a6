"""What ``sds envoy-bootstrap`` generates from: :class:`BootstrapOptions`, and the parsers
of its flag values (``--inbound``, ``--outbound``, ``--allow``/``--expect``, durations)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "BUILTIN_NAMES",
    "DEFAULT_ADMIN_SOCKET",
    "DEFAULT_POLICY_NAME",
    "NAME_RE",
    "BootstrapOptions",
    "Inbound",
    "Outbound",
    "config_error",
    "is_ip",
    "join_host",
    "parse_inbound",
    "parse_outbound",
    "parse_peer_id",
    "parse_port",
    "parse_seconds",
    "trust_domain_of",
]

DEFAULT_POLICY_NAME = "inbound-allow"
DEFAULT_ADMIN_SOCKET = "/run/envoy/admin.sock"
BUILTIN_NAMES = ("default", "ROOTCA", "ALL")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOST_RE = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


@dataclass(frozen=True, slots=True)
class Inbound:
    """The mTLS listener ``address:port`` forwarding to the app at ``app_host:app_port``."""

    port: int
    app_host: str
    app_port: int
    address: str = "0.0.0.0"  # noqa: S104 - the inbound listener is meant to be reachable


@dataclass(frozen=True, slots=True)
class Outbound:
    """A plaintext loopback listener ``local_host:local_port`` the app calls, proxied with
    mTLS to ``remote_host:remote_port``, which must present one of ``expect``."""

    local_host: str
    local_port: int
    remote_host: str
    remote_port: int
    expect: tuple[str, ...]

    @property
    def spec(self) -> str:
        """The ``--outbound`` value this came from."""
        return (
            f"{join_host(self.local_host)}:{self.local_port}="
            f"{join_host(self.remote_host)}:{self.remote_port}"
        )


@dataclass(frozen=True, slots=True)
class BootstrapOptions:
    """Everything the generator needs, validated (see :func:`options_from_args`).

    ``allow`` entries are exact SPIFFE IDs or prefixes written ``spiffe://td/path/*``
    (as in the bridge's ``policies[].allow``). Durations are whole seconds; 0
    disables ``max_connection_duration`` and ``request_timeout``, and makes
    ``initial_fetch_timeout`` wait forever. The admin is the 0600 Unix socket
    ``admin_socket`` unless ``admin_port`` is set (loopback TCP, open to every
    local user).
    """

    node_id: str
    sds_socket: str
    node_cluster: str = ""
    protocol: str = "http"
    inbound: Inbound | None = None
    allow: tuple[str, ...] = ()
    allow_any_in_trust_domain: bool = False
    policy_name: str = DEFAULT_POLICY_NAME
    outbounds: tuple[Outbound, ...] = ()
    admin_socket: str = DEFAULT_ADMIN_SOCKET
    admin_port: int | None = None
    api_type: str = "sotw"
    initial_fetch_timeout: int = 0
    max_connection_duration: int = 600
    request_timeout: int = 60
    bridge_config: str | None = None
    output: str | None = None
    jwt_audience: str | None = None
    jwks_uri: str | None = None

    @property
    def cluster(self) -> str:
        """The node cluster: ``node_cluster``, else the node id."""
        return self.node_cluster or self.node_id


def config_error(message: str) -> Exception:
    from sds.errors import ConfigError  # noqa: PLC0415

    return ConfigError(message)


def join_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _split_host_port(text: str, where: str, *, port_zero: bool) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise config_error(f"{where}: want HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise config_error(f"{where}: {host!r} is not an IPv6 address") from exc
    elif ":" in host:
        raise config_error(f"{where}: write an IPv6 address in brackets, e.g. [::1]:9001")
    elif not is_ip(host) and not (len(host) <= 253 and _HOST_RE.fullmatch(host)):
        raise config_error(f"{where}: {host!r} is not an IP address or DNS name")
    return host, parse_port(port_text, where, zero=port_zero)


def parse_port(text: str, where: str, *, zero: bool) -> int:
    lowest = 0 if zero else 1
    if not text.isdigit() or not lowest <= int(text) <= 65535:
        raise config_error(f"{where}: port {text!r} must be a number from {lowest} to 65535")
    return int(text)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_inbound(text: str, address: str = "0.0.0.0") -> Inbound:  # noqa: S104
    """Parse ``--inbound LISTEN_PORT:APP_HOST:APP_PORT`` (port 0: any free port)."""
    where = f"--inbound {text!r}"
    listen, sep, app = text.partition(":")
    if not sep:
        raise config_error(f"{where}: want LISTEN_PORT:APP_HOST:APP_PORT")
    port = parse_port(listen, where, zero=True)
    app_host, app_port = _split_host_port(app, where, port_zero=False)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise config_error(f"--inbound-address {address!r}: want an IP address") from exc
    return Inbound(port=port, app_host=app_host, app_port=app_port, address=str(ip))


def parse_outbound(text: str, expect: Sequence[str]) -> Outbound:
    """Parse ``--outbound LOCAL_HOST:LOCAL_PORT=REMOTE_HOST:REMOTE_PORT`` with its ``--expect`` IDs.

    The local side must be a loopback IP: the app's traffic to it is plaintext.
    At least one expected server ID is required: an unverified upstream would
    accept any workload of the trust domain.
    """
    where = f"--outbound {text!r}"
    local, sep, remote = text.partition("=")
    if not sep:
        raise config_error(f"{where}: want LOCAL_HOST:LOCAL_PORT=REMOTE_HOST:REMOTE_PORT")
    local_host, local_port = _split_host_port(local, where, port_zero=True)
    if not is_ip(local_host) or not ipaddress.ip_address(local_host).is_loopback:
        raise config_error(
            f"{where}: the local listener must be on a loopback IP such as 127.0.0.1 "
            "(the app's plaintext traffic must not leave the host)"
        )
    remote_host, remote_port = _split_host_port(remote, where, port_zero=False)
    if not expect:
        raise config_error(f"{where}: needs --expect SPIFFE_ID after it (no unverified upstreams)")
    ids = tuple(parse_peer_id(value, "--expect") for value in expect)
    return Outbound(local_host, local_port, remote_host, remote_port, ids)


def parse_peer_id(text: str, flag: str) -> str:
    """Validate an exact SPIFFE ID or a ``spiffe://td/path/*`` prefix; return it normalized."""
    from sds.errors import InvalidSpiffeId  # noqa: PLC0415
    from sds.spiffe.match import IdPattern  # noqa: PLC0415

    try:
        return str(IdPattern.parse(text))
    except InvalidSpiffeId as exc:
        raise config_error(f"{flag} {text!r}: {exc}") from exc


def trust_domain_of(peer: str) -> str:
    return peer[len("spiffe://") :].split("/", 1)[0]


def parse_seconds(text: str, flag: str) -> int:
    value = text[:-1] if text.endswith("s") else text
    if not value.isdigit():
        raise config_error(f"{flag} {text!r}: want whole seconds, e.g. 600 or 600s")
    return int(value)
