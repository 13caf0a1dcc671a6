"""``sds envoy-bootstrap``: generate a complete Envoy v3 sidecar bootstrap that uses our SDS.

The generated Envoy gets every certificate and trust bundle from the bridge
(``sds run``) over a Unix socket, so no key ever touches its config file:

* an **inbound** mTLS listener (``--inbound``) in front of the local app. It
  presents ``default``, requires a client certificate and validates it with a
  bridge *policy* (``--policy-name``, allowing ``--allow`` IDs), so callers
  outside the policy fail in the TLS handshake. With ``--protocol http`` an
  RBAC filter checks the same IDs per request and the caller's SPIFFE ID is
  passed to the app in ``x-forwarded-client-cert`` (``URI=...``).
* **outbound** plaintext listeners on loopback (``--outbound``) that the app
  calls; Envoy dials the remote with mTLS, presents ``default`` and accepts
  only a server presenting one of the ``--expect`` IDs: Istio's pattern, a
  ``combined_validation_context`` whose static part holds URI SAN matchers
  and whose SDS part is the expected trust domain's bundle (``spiffe://td``,
  or ``ALL`` when the IDs span trust domains). Envoy verified (1.36, 1.40):
  the matchers apply together with the SPIFFE certificate validator.

Envoy's **admin** listens on a Unix socket (``--admin-socket``, default
``/run/envoy/admin.sock``, mode 0600), so only Envoy's uid can reach it: on
loopback TCP any local user could ``POST /quitquitquit``. ``--admin-port N``
puts it on ``127.0.0.1:N`` instead, on request and with a warning.

Everything here is a pure function from :class:`BootstrapOptions` to dicts
and text; :func:`run` adds flag checks and file writing. User documentation,
including why each timeout has its value: ``envoy/README.md``.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import shlex
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_ADMIN_SOCKET",
    "DEFAULT_POLICY_NAME",
    "SNIPPET_MARKER",
    "BootstrapOptions",
    "Inbound",
    "Outbound",
    "add_arguments",
    "bridge_policy",
    "build_bootstrap",
    "command_line",
    "inbound_validation_name",
    "options_from_args",
    "outbound_validation_name",
    "parse_inbound",
    "parse_outbound",
    "parse_peer_id",
    "render_bootstrap",
    "render_bridge_snippet",
    "run",
    "to_envoy_yaml",
]

DEFAULT_POLICY_NAME = "inbound-allow"
DEFAULT_ADMIN_SOCKET = "/run/envoy/admin.sock"
#: Envoy's admin socket mode: only Envoy's uid may connect (Pipe.mode, an integer in the config).
ADMIN_SOCKET_MODE = 0o600
SNIPPET_MARKER = "# sds envoy-bootstrap: bridge policy snippet"
_TYPE = "type.googleapis.com/"
_TLS_SOCKET = "envoy.transport_sockets.tls"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_BUILTIN_NAMES = ("default", "ROOTCA", "ALL")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOST_RE = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)

# Timeouts, in seconds. Each is explained in envoy/README.md ("Timeouts").
CONNECT_TIMEOUT = 5  # TCP+TLS connect to an app or remote sidecar
SDS_CONNECT_TIMEOUT = 1  # the bridge is on a local Unix socket: fail fast, retry
SDS_RETRY_BASE = 0.25  # SDS stream reconnect backoff (Envoy's default: 0.5 s to 30 s)
SDS_RETRY_MAX = 5
STREAM_IDLE_TIMEOUT = 300  # an HTTP stream with no activity
CONNECTION_IDLE_TIMEOUT = 300  # an HTTP connection with no streams
REQUEST_HEADERS_TIMEOUT = 10  # a downstream must send its headers within this (slowloris)


# --------------------------------------------------------------------------- options


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
            f"{_join_host(self.local_host)}:{self.local_port}="
            f"{_join_host(self.remote_host)}:{self.remote_port}"
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


# --------------------------------------------------------------------------- parsing


def _config_error(message: str) -> Exception:
    from sds.errors import ConfigError  # noqa: PLC0415

    return ConfigError(message)


def _join_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _split_host_port(text: str, where: str, *, port_zero: bool) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise _config_error(f"{where}: want HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise _config_error(f"{where}: {host!r} is not an IPv6 address") from exc
    elif ":" in host:
        raise _config_error(f"{where}: write an IPv6 address in brackets, e.g. [::1]:9001")
    elif not _is_ip(host) and not (len(host) <= 253 and _HOST_RE.fullmatch(host)):
        raise _config_error(f"{where}: {host!r} is not an IP address or DNS name")
    return host, _port(port_text, where, zero=port_zero)


def _port(text: str, where: str, *, zero: bool) -> int:
    lowest = 0 if zero else 1
    if not text.isdigit() or not lowest <= int(text) <= 65535:
        raise _config_error(f"{where}: port {text!r} must be a number from {lowest} to 65535")
    return int(text)


def _is_ip(host: str) -> bool:
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
        raise _config_error(f"{where}: want LISTEN_PORT:APP_HOST:APP_PORT")
    port = _port(listen, where, zero=True)
    app_host, app_port = _split_host_port(app, where, port_zero=False)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise _config_error(f"--inbound-address {address!r}: want an IP address") from exc
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
        raise _config_error(f"{where}: want LOCAL_HOST:LOCAL_PORT=REMOTE_HOST:REMOTE_PORT")
    local_host, local_port = _split_host_port(local, where, port_zero=True)
    if not _is_ip(local_host) or not ipaddress.ip_address(local_host).is_loopback:
        raise _config_error(
            f"{where}: the local listener must be on a loopback IP such as 127.0.0.1 "
            "(the app's plaintext traffic must not leave the host)"
        )
    remote_host, remote_port = _split_host_port(remote, where, port_zero=False)
    if not expect:
        raise _config_error(f"{where}: needs --expect SPIFFE_ID after it (no unverified upstreams)")
    ids = tuple(parse_peer_id(value, "--expect") for value in expect)
    return Outbound(local_host, local_port, remote_host, remote_port, ids)


def parse_peer_id(text: str, flag: str) -> str:
    """Validate an exact SPIFFE ID or a ``spiffe://td/path/*`` prefix; return it normalized."""
    from sds.errors import InvalidSpiffeId  # noqa: PLC0415
    from sds.spiffe.match import IdPattern  # noqa: PLC0415

    try:
        return str(IdPattern.parse(text))
    except InvalidSpiffeId as exc:
        raise _config_error(f"{flag} {text!r}: {exc}") from exc


def _trust_domain(peer: str) -> str:
    return peer[len("spiffe://") :].split("/", 1)[0]


def _seconds(text: str, flag: str) -> int:
    value = text[:-1] if text.endswith("s") else text
    if not value.isdigit():
        raise _config_error(f"{flag} {text!r}: want whole seconds, e.g. 600 or 600s")
    return int(value)


# --------------------------------------------------------------------------- building blocks


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": _TYPE + type_name, **fields}


def _sds_config(options: BootstrapOptions) -> dict[str, Any]:
    """The ConfigSource of every secret: the ``sds`` cluster, SotW or delta gRPC.

    ``initial_fetch_timeout`` 0s (the default) disables the timeout: Envoy
    keeps its listeners and clusters warming, and ``/ready`` answers 503,
    until every secret has arrived, so it never accepts a connection it
    cannot serve. See envoy/README.md for the trade-off.

    ``set_node_on_first_message_only``: Envoy otherwise repeats its whole Node
    (~61 KB on Envoy 1.40) in every request, ACKs included; the bridge keeps
    the node of a stream's first request, so once is enough (BENCHMARKS.md,
    fan-out).
    """
    return {
        "resource_api_version": "V3",
        "initial_fetch_timeout": _duration(options.initial_fetch_timeout),
        "api_config_source": {
            "api_type": "DELTA_GRPC" if options.api_type == "delta" else "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": True,
            "grpc_services": [
                {
                    "envoy_grpc": {
                        "cluster_name": "sds",
                        "retry_policy": {
                            "retry_back_off": {
                                "base_interval": _duration(SDS_RETRY_BASE),
                                "max_interval": _duration(SDS_RETRY_MAX),
                            }
                        },
                    }
                }
            ],
        },
    }


def _secret(name: str, options: BootstrapOptions) -> dict[str, Any]:
    return {"name": name, "sds_config": _sds_config(options)}


def _san_matchers(peers: Sequence[str]) -> list[dict[str, Any]]:
    """URI SAN matchers: ``exact`` for an ID, ``prefix`` ``spiffe://td/path/`` for ``.../*``."""
    return [{"san_type": "URI", "matcher": _string_matcher(peer)} for peer in peers]


def _string_matcher(peer: str) -> dict[str, str]:
    from sds.spiffe.match import IdPattern  # noqa: PLC0415

    pattern = IdPattern.parse(peer)
    return {"prefix" if pattern.prefix else "exact": pattern.value}


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _admin_address(options: BootstrapOptions) -> dict[str, Any]:
    """The admin's address: the 0600 Unix socket, or loopback TCP when ``admin_port`` is set."""
    if options.admin_port is not None:
        return _address("127.0.0.1", options.admin_port)
    return {"pipe": {"path": options.admin_socket, "mode": ADMIN_SOCKET_MODE}}


def _cluster(name: str, host: str, port: int, **extra: Any) -> dict[str, Any]:
    """A cluster with one endpoint: STATIC for an IP, STRICT_DNS (IPv4 preferred) for a name."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": _duration(CONNECT_TIMEOUT),
    }
    if not _is_ip(host):
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    cluster["load_assignment"] = {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
    }
    cluster.update(extra)
    return cluster


def _common_http_options(options: BootstrapOptions) -> dict[str, Any]:
    """Idle timeout, and ``max_connection_duration`` so connections drain and re-handshake.

    A TLS connection keeps the certificates and the authorization decision of
    its handshake for its whole life; SDS updates apply to new connections
    only (envoy#17999). Bounding the life of a connection makes rotated SVIDs
    and narrowed policies take effect on long-lived connections too.
    """
    common: dict[str, Any] = {"idle_timeout": _duration(CONNECTION_IDLE_TIMEOUT)}
    if options.max_connection_duration:
        common["max_connection_duration"] = _duration(options.max_connection_duration)
    return common


def _http_filter(name: str, type_name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "typed_config": _typed(type_name, **fields)}


def _rbac_filter(peers: Sequence[str]) -> dict[str, Any]:
    """ALLOW only requests whose connection's peer principal (URI SAN) matches ``peers``."""
    principals = [{"authenticated": {"principal_name": _string_matcher(p)}} for p in peers]
    return _http_filter(
        "envoy.filters.http.rbac",
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        rules={
            "action": "ALLOW",
            "policies": {
                "spiffe-callers": {"permissions": [{"any": True}], "principals": principals}
            },
        },
    )


def _router() -> dict[str, Any]:
    return _http_filter(
        "envoy.filters.http.router", "envoy.extensions.filters.http.router.v3.Router"
    )


def _route_config(name: str, cluster: str, options: BootstrapOptions) -> dict[str, Any]:
    return {
        "name": name,
        "virtual_hosts": [
            {
                "name": name,
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": cluster,
                            "timeout": _duration(options.request_timeout),
                        },
                    }
                ],
            }
        ],
    }


def _hcm(
    stat_prefix: str,
    cluster: str,
    options: BootstrapOptions,
    *,
    http_filters: list[dict[str, Any]],
    **fields: Any,
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": _typed(
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix=stat_prefix,
            codec_type="AUTO",
            stream_idle_timeout=_duration(STREAM_IDLE_TIMEOUT),
            request_headers_timeout=_duration(REQUEST_HEADERS_TIMEOUT),
            **fields,
            route_config=_route_config(stat_prefix, cluster, options),
            http_filters=[*http_filters, _router()],
        ),
    }


def _tcp_proxy(stat_prefix: str, cluster: str, options: BootstrapOptions) -> dict[str, Any]:
    fields: dict[str, Any] = {"stat_prefix": stat_prefix, "cluster": cluster}
    if options.max_connection_duration:
        # Closes (not drains: TCP has no way to ask) connections older than this.
        fields["max_downstream_connection_duration"] = _duration(options.max_connection_duration)
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": _typed("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", **fields),
    }


def _tls_params() -> dict[str, Any]:
    # Envoy's client side defaults to at most TLS 1.2; allow 1.3 (it encrypts the
    # certificates, so SPIFFE IDs are not visible on the wire) on both sides.
    return {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"}


# --------------------------------------------------------------------------- listeners and clusters


def inbound_validation_name(options: BootstrapOptions) -> str:
    """The validation context the inbound listener asks for: the policy, or ``ROOTCA``."""
    return "ROOTCA" if options.allow_any_in_trust_domain else options.policy_name


def _inbound_listener(inbound: Inbound, options: BootstrapOptions) -> dict[str, Any]:
    http = options.protocol == "http"
    common_tls: dict[str, Any] = {
        "tls_params": _tls_params(),
        "tls_certificate_sds_secret_configs": [_secret("default", options)],
        # The bridge policy carries match_typed_subject_alt_names: peers outside
        # --allow fail in the handshake, before any byte reaches the app.
        "validation_context_sds_secret_config": _secret(inbound_validation_name(options), options),
    }
    if http:
        common_tls["alpn_protocols"] = ["h2", "http/1.1"]
    tls = _typed(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        require_client_certificate=True,
        common_tls_context=common_tls,
    )
    if http:
        filters = [] if options.allow_any_in_trust_domain else [_rbac_filter(options.allow)]
        if options.jwks_uri is not None and options.jwt_audience is not None:
            filters.insert(0, _jwt_authn_filter(options.jwt_audience, options.jwks_uri))
        network_filter = _hcm(
            "inbound",
            "inbound_app",
            options,
            http_filters=filters,
            # The app learns the caller's SPIFFE ID: x-forwarded-client-cert: URI=spiffe://...
            # SANITIZE_SET drops any XFCC the caller sent and sets our own.
            forward_client_cert_details="SANITIZE_SET",
            set_current_client_cert_details={"uri": True},
            common_http_protocol_options=_common_http_options(options),
            http2_protocol_options={
                "max_concurrent_streams": 100,
                "initial_stream_window_size": 65536,
                "initial_connection_window_size": 1048576,
            },
        )
    else:
        # TCP: admission is decided in the TLS handshake only (the policy's SAN matchers).
        network_filter = _tcp_proxy("inbound", "inbound_app", options)
    return {
        "name": "inbound",
        "stat_prefix": "inbound",
        "address": _address(inbound.address, inbound.port),
        "per_connection_buffer_limit_bytes": 32768,
        "filter_chains": [
            {
                "filters": [network_filter],
                "transport_socket": {"name": _TLS_SOCKET, "typed_config": tls},
            }
        ],
    }


def outbound_validation_name(outbound: Outbound) -> str:
    """The SDS validation context an outbound cluster verifies the server against.

    ``spiffe://td`` (that trust domain's bundle alone) when every expected ID
    is in one trust domain, else ``ALL`` (own and federated bundles).
    """
    domains = {_trust_domain(peer) for peer in outbound.expect}
    return f"spiffe://{domains.pop()}" if len(domains) == 1 else "ALL"


def _jwt_authn_filter(audience: str, jwks_uri: str) -> dict[str, Any]:
    """Inbound JWT-SVID check (JWT-SVID s.4): signature against the bridge's JWKS for the
    trust domain, ``aud`` must hold ``audience``, ``exp`` in the future. The verified
    claims reach the app in ``x-jwt-payload``; a missing or bad token gets 401."""
    return _http_filter(
        "envoy.filters.http.jwt_authn",
        "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        providers={
            "jwt_svid": {
                "audiences": [audience],
                "remote_jwks": {
                    "http_uri": {"uri": jwks_uri, "cluster": "jwks", "timeout": "2s"},
                    "cache_duration": "300s",
                    "async_fetch": {"fast_listener": False},
                    "retry_policy": {"num_retries": 3},
                },
                "forward_payload_header": "x-jwt-payload",
                "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
            }
        },
        rules=[{"match": {"prefix": "/"}, "requires": {"provider_name": "jwt_svid"}}],
    )


def _credential_injector(audience: str, options: BootstrapOptions) -> dict[str, Any]:
    """Outbound: attach the bridge's ``jwt-svid:<audience>`` secret (``Bearer <JWT-SVID>``)
    as ``Authorization`` on every request, replacing whatever the app sent."""
    return _http_filter(
        "envoy.filters.http.credential_injector",
        "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
        overwrite=True,
        credential={
            "name": "envoy.http.injected_credentials.generic",
            "typed_config": _typed(
                "envoy.extensions.http.injected_credentials.generic.v3.Generic",
                credential=_secret(f"jwt-svid:{audience}", options),
                header="Authorization",
            ),
        },
    )


def _outbound_listener(index: int, outbound: Outbound, options: BootstrapOptions) -> dict[str, Any]:
    name = f"outbound_{index}"
    if options.protocol == "http":
        injected = (
            [_credential_injector(options.jwt_audience, options)]
            if options.jwt_audience is not None
            else []
        )
        network_filter = _hcm(
            name,
            name,
            options,
            http_filters=injected,
            # Plaintext from the local app: never forward a client cert header it made up.
            forward_client_cert_details="SANITIZE",
        )
    else:
        network_filter = _tcp_proxy(name, name, options)
    return {
        "name": name,
        "stat_prefix": name,
        "address": _address(outbound.local_host, outbound.local_port),
        "filter_chains": [{"filters": [network_filter]}],
    }


def _outbound_cluster(index: int, outbound: Outbound, options: BootstrapOptions) -> dict[str, Any]:
    name = f"outbound_{index}"
    tls: dict[str, Any] = _typed(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        common_tls_context={
            "tls_params": _tls_params(),
            "tls_certificate_sds_secret_configs": [_secret("default", options)],
            # Istio's pattern: the static part pins the server's URI SAN, the SDS part
            # brings the trust bundle; Envoy merges both (the SPIFFE validator honours
            # the matchers: verified with Envoy 1.36 and 1.40).
            "combined_validation_context": {
                "default_validation_context": {
                    "match_typed_subject_alt_names": _san_matchers(outbound.expect)
                },
                "validation_context_sds_secret_config": _secret(
                    outbound_validation_name(outbound), options
                ),
            },
        },
    )
    if not _is_ip(outbound.remote_host):
        tls["sni"] = outbound.remote_host
    extra: dict[str, Any] = {
        "transport_socket": {"name": _TLS_SOCKET, "typed_config": tls},
    }
    if options.protocol == "http":
        extra["typed_extension_protocol_options"] = {
            _HTTP_OPTIONS: _typed(
                _HTTP_OPTIONS,
                common_http_protocol_options=_common_http_options(options),
                # HTTP/2 or HTTP/1.1, whichever the server picks in ALPN.
                auto_config={"http2_protocol_options": {}, "http_protocol_options": {}},
            )
        }
    return _cluster(name, outbound.remote_host, outbound.remote_port, **extra)


def _sds_cluster(options: BootstrapOptions) -> dict[str, Any]:
    """The bridge's Unix socket; gRPC needs HTTP/2, set explicitly."""
    return {
        "name": "sds",
        "type": "STATIC",
        "connect_timeout": _duration(SDS_CONNECT_TIMEOUT),
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: _typed(
                _HTTP_OPTIONS, explicit_http_config={"http2_protocol_options": {}}
            )
        },
        "load_assignment": {
            "cluster_name": "sds",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"pipe": {"path": options.sds_socket}}}}
                    ]
                }
            ],
        },
    }


def build_bootstrap(options: BootstrapOptions) -> dict[str, Any]:
    """The Envoy v3 bootstrap for ``options``: node, admin (0600 socket), listeners, clusters."""
    listeners: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = [_sds_cluster(options)]
    if options.inbound is not None:
        listeners.append(_inbound_listener(options.inbound, options))
        clusters.append(_cluster("inbound_app", options.inbound.app_host, options.inbound.app_port))
    for index, outbound in enumerate(options.outbounds):
        listeners.append(_outbound_listener(index, outbound, options))
        clusters.append(_outbound_cluster(index, outbound, options))
    if options.inbound is not None and options.jwks_uri is not None:
        url = urllib.parse.urlsplit(options.jwks_uri)
        clusters.append(_cluster("jwks", url.hostname or "127.0.0.1", url.port or 80))
    return {
        "node": {"id": options.node_id, "cluster": options.cluster},
        "admin": {"address": _admin_address(options)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def bridge_policy(options: BootstrapOptions) -> dict[str, Any] | None:
    """The bridge config snippet (``{"policies": [...]}``) the inbound listener needs, or None.

    ``trust_domains`` lists the trust domains of the allowed IDs, so the
    policy does not depend on which trust domain the bridge calls its own.
    """
    if options.inbound is None or options.allow_any_in_trust_domain:
        return None
    domains = sorted({_trust_domain(peer) for peer in options.allow})
    return {
        "policies": [
            {"name": options.policy_name, "trust_domains": domains, "allow": list(options.allow)}
        ]
    }


# --------------------------------------------------------------------------- text


_YAML11_SPECIAL = re.compile(r"(?i:y|n|yes|no|on|off|true|false|null|~)|")


class _EnvoyDumper(yaml.SafeDumper):
    """Quotes strings that Envoy's YAML 1.1 reader would take as booleans (``n``, ``on``...)."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "'" if _YAML11_SPECIAL.fullmatch(text) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_EnvoyDumper.add_representer(str, _represent_str)


def to_envoy_yaml(config: Mapping[str, Any]) -> str:
    """``config`` as block YAML in insertion order that Envoy reads back unchanged."""
    return yaml.dump(dict(config), Dumper=_EnvoyDumper, sort_keys=False, width=100)


def command_line(options: BootstrapOptions) -> str:
    """The canonical ``sds envoy-bootstrap`` command that regenerates ``options``."""
    argv = ["sds", "envoy-bootstrap", "--node-id", options.node_id]
    if options.node_cluster:
        argv += ["--node-cluster", options.node_cluster]
    argv += ["--sds-socket", options.sds_socket, "--protocol", options.protocol]
    if options.inbound is not None:
        inbound = options.inbound
        argv += [
            "--inbound",
            f"{inbound.port}:{_join_host(inbound.app_host)}:{inbound.app_port}",
        ]
        if inbound.address != "0.0.0.0":  # noqa: S104
            argv += ["--inbound-address", inbound.address]
        for peer in options.allow:
            argv += ["--allow", peer]
        if options.allow_any_in_trust_domain:
            argv.append("--allow-any-in-trust-domain")
        if options.policy_name != DEFAULT_POLICY_NAME:
            argv += ["--policy-name", options.policy_name]
    for outbound in options.outbounds:
        argv += ["--outbound", outbound.spec]
        for peer in outbound.expect:
            argv += ["--expect", peer]
    defaults = BootstrapOptions(node_id="", sds_socket="")
    if options.admin_port is not None:
        argv += ["--admin-port", str(options.admin_port)]
    elif options.admin_socket != defaults.admin_socket:
        argv += ["--admin-socket", options.admin_socket]
    for flag, attr in (
        ("--api-type", "api_type"),
        ("--initial-fetch-timeout", "initial_fetch_timeout"),
        ("--max-connection-duration", "max_connection_duration"),
        ("--request-timeout", "request_timeout"),
    ):
        value = getattr(options, attr)
        if value != getattr(defaults, attr):
            argv += [flag, str(value)]
    if options.jwt_audience is not None:
        argv += ["--jwt-audience", options.jwt_audience]
    if options.jwks_uri is not None:
        argv += ["--jwks-uri", options.jwks_uri]
    return shlex.join(argv)


def _comment(lines: Sequence[str]) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)


def render_bootstrap(options: BootstrapOptions) -> str:
    """The bootstrap YAML with a header comment: how to regenerate it and what it needs."""
    lines = [
        "Envoy v3 sidecar bootstrap generated by `sds envoy-bootstrap`. Regenerate with:",
        f"  {command_line(options)}",
        "",
        f"Secrets come from the bridge (`sds run`) on unix socket {options.sds_socket}.",
    ]
    if options.admin_port is None:
        lines += [
            f"Admin: unix socket {options.admin_socket}, mode 0600 (Envoy's uid only; its",
            "directory must exist and be writable by Envoy), e.g.",
            f"  curl --unix-socket {options.admin_socket} http://localhost/ready",
        ]
    else:
        lines += [
            f"WARNING: admin on TCP 127.0.0.1:{options.admin_port} (--admin-port): every local "
            "user can",
            "reach it and stop Envoy (POST /quitquitquit); the default is a 0600 unix socket.",
        ]
    if options.initial_fetch_timeout == 0:
        lines += [
            "initial_fetch_timeout 0s: until every secret has arrived Envoy stays unready",
            "(/ready 503) and its listeners refuse connections; it never accepts traffic",
            "it cannot protect. Nothing else waits: the admin endpoint is up at once.",
        ]
    else:
        lines += [
            f"initial_fetch_timeout {options.initial_fetch_timeout}s: after that Envoy goes live "
            "even without",
            "secrets; until they arrive, inbound handshakes are reset and outbound",
            "requests get 503.",
        ]
    if options.max_connection_duration:
        lines += [
            f"max_connection_duration {options.max_connection_duration}s: a connection keeps "
            "the certificates and",
            "admission decision of its handshake; draining old connections makes rotated",
            "SVIDs and policy changes reach long-lived ones (envoy#17999).",
        ]
    policy = bridge_policy(options)
    if policy is not None:
        lines += [
            "",
            f"The inbound listener validates callers with bridge policy {options.policy_name!r};",
            "the bridge config must contain it (sds envoy-bootstrap --bridge-config FILE):",
            "",
            *yaml.safe_dump(policy, sort_keys=False).splitlines(),
        ]
    elif options.inbound is not None:
        lines += [
            "",
            "The inbound listener admits ANY workload of the bridge's own trust domain",
            "(ROOTCA, no SAN matchers): --allow-any-in-trust-domain.",
        ]
    if options.inbound is not None and options.protocol == "tcp":
        lines += [
            "",
            "TCP: admission is decided in the TLS handshake only; the app gets no",
            "caller identity.",
        ]
    return _comment(lines) + "\n" + to_envoy_yaml(build_bootstrap(options))


def render_bridge_snippet(options: BootstrapOptions) -> str | None:
    """The ``--bridge-config`` file: the policy snippet with a marker header, or None."""
    policy = bridge_policy(options)
    if policy is None:
        return None
    header = [
        SNIPPET_MARKER[2:],
        "Add this policy to the `policies` list of your `sds run` config",
        "(docs/configuration.md) and send the bridge SIGHUP; it is applied live.",
        "Generated by:",
        f"  {command_line(options)}",
    ]
    return _comment(header) + yaml.safe_dump(policy, sort_keys=False)


# --------------------------------------------------------------------------- command line


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
        raise _config_error("--node-id is required")
    if not args.sds_socket:
        raise _config_error("--sds-socket is required (the bridge's unix socket path)")
    socket = _socket_path(args.sds_socket, "--sds-socket")

    inbound = None
    allow = tuple(parse_peer_id(value, "--allow") for value in args.allow)
    if args.inbound is not None:
        inbound = parse_inbound(args.inbound, args.inbound_address)
        if args.allow_any_in_trust_domain and allow:
            raise _config_error("--allow-any-in-trust-domain and --allow exclude each other")
        if not allow and not args.allow_any_in_trust_domain:
            raise _config_error(
                "--inbound needs --allow SPIFFE_ID (or --allow-any-in-trust-domain): "
                "an open inbound listener is not a safe default"
            )
    elif allow or args.allow_any_in_trust_domain:
        raise _config_error("--allow and --allow-any-in-trust-domain need --inbound")

    policy_name = args.policy_name
    if not _NAME_RE.fullmatch(policy_name) or policy_name in _BUILTIN_NAMES:
        raise _config_error(
            f"--policy-name {policy_name!r}: want letters, digits, '.', '-', '_' and not a "
            f"built-in name ({', '.join(_BUILTIN_NAMES)})"
        )

    outbounds: list[Outbound] = []
    pending: tuple[str, list[str]] | None = None
    for option, value in [*(args.routes or []), ("end", "")]:
        if option == "--expect":
            if pending is None:
                raise _config_error(f"--expect {value!r}: must follow the --outbound it belongs to")
            pending[1].append(value)
            continue
        if pending is not None:
            outbounds.append(parse_outbound(*pending))
        pending = (value, []) if option == "--outbound" else None
    if inbound is None and not outbounds:
        raise _config_error("nothing to generate: give --inbound and/or --outbound")

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
        else _port(args.admin_port, "--admin-port", zero=True),
        api_type=args.api_type,
        initial_fetch_timeout=_seconds(args.initial_fetch_timeout, "--initial-fetch-timeout"),
        max_connection_duration=_seconds(args.max_connection_duration, "--max-connection-duration"),
        request_timeout=_seconds(args.request_timeout, "--request-timeout"),
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
        raise _config_error("--admin-socket and --admin-port exclude each other")
    return _socket_path(value, "--admin-socket")


def _socket_path(value: str, flag: str) -> str:
    """``/abs/path`` or ``unix:///abs/path``, as the path; ConfigError naming ``flag``."""
    from sds.workloadapi.address import unix_socket_path  # noqa: PLC0415

    try:
        return unix_socket_path(value, bare=True)
    except ValueError as exc:
        raise _config_error(f"{flag} {value!r}: {exc}") from None


def _jwt_audience(value: str | None) -> str | None:
    if value is None:
        return None
    if not value or any(c.isspace() for c in value):
        raise _config_error(f"--jwt-audience {value!r}: want a non-empty audience without spaces")
    return value


def _jwks_uri(value: str | None, audience: str | None, inbound: bool) -> str | None:
    if value is None:
        return None
    if audience is None or not inbound:
        raise _config_error("--jwks-uri needs --inbound and --jwt-audience")
    url = urllib.parse.urlsplit(value)
    if url.scheme != "http" or not url.hostname or not _is_ip(url.hostname):
        raise _config_error(f"--jwks-uri {value!r}: want http://127.0.0.1:PORT/jwks/TRUST_DOMAIN")
    if not ipaddress.ip_address(url.hostname).is_loopback:
        raise _config_error(f"--jwks-uri {value!r}: the bridge's JWKS is served on loopback only")
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
                raise _config_error(f"{flag}: port {port} is already used by {other_flag}")


def _write_snippet(path: Path, text: str) -> None:
    """Write the policy snippet; never overwrite a file this command did not generate."""
    try:
        if path.exists() and not path.read_text(errors="replace").startswith(SNIPPET_MARKER):
            raise _config_error(
                f"--bridge-config {str(path)!r}: exists and is not a snippet written by "
                "sds envoy-bootstrap; not overwriting it (merge the policy yourself)"
            )
        path.write_text(text)
    except OSError as exc:
        raise _config_error(f"--bridge-config {str(path)!r}: {exc.strerror}") from exc


def run(args: argparse.Namespace) -> int:
    """Generate the bootstrap (stdout or ``-o``) and, with ``--bridge-config``, the snippet."""
    options = options_from_args(args)
    text = render_bootstrap(options)
    snippet = render_bridge_snippet(options)
    if options.bridge_config is not None:
        if snippet is None:
            raise _config_error(
                "--bridge-config: no bridge policy to write (needs --inbound with --allow)"
            )
        _write_snippet(Path(options.bridge_config), snippet)
    if options.output is None:
        sys.stdout.write(text)
    else:
        try:
            Path(options.output).write_text(text)
        except OSError as exc:
            raise _config_error(f"-o {options.output!r}: {exc.strerror}") from exc
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
