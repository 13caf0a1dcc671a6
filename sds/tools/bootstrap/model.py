"""The Envoy v3 bootstrap as data: pure functions from :class:`BootstrapOptions` to the
listeners, clusters and SDS config sources Envoy reads, and the bridge policy they need.

Timeouts are explained in envoy/README.md ("Timeouts")."""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from typing import Any

from sds.tools.bootstrap.options import BootstrapOptions, Inbound, Outbound, is_ip, trust_domain_of

__all__ = [
    "ADMIN_SOCKET_MODE",
    "CONNECTION_IDLE_TIMEOUT",
    "CONNECT_TIMEOUT",
    "REQUEST_HEADERS_TIMEOUT",
    "SDS_CONNECT_TIMEOUT",
    "SDS_RETRY_BASE",
    "SDS_RETRY_MAX",
    "STREAM_IDLE_TIMEOUT",
    "bridge_policy",
    "build_bootstrap",
    "inbound_validation_name",
    "outbound_validation_name",
]

#: Envoy's admin socket mode: only Envoy's uid may connect (Pipe.mode, an integer in the config).
ADMIN_SOCKET_MODE = 0o600
_TYPE = "type.googleapis.com/"
_TLS_SOCKET = "envoy.transport_sockets.tls"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Timeouts, in seconds. Each is explained in envoy/README.md ("Timeouts").
CONNECT_TIMEOUT = 5  # TCP+TLS connect to an app or remote sidecar
SDS_CONNECT_TIMEOUT = 1  # the bridge is on a local Unix socket: fail fast, retry
SDS_RETRY_BASE = 0.25  # SDS stream reconnect backoff (Envoy's default: 0.5 s to 30 s)
SDS_RETRY_MAX = 5
STREAM_IDLE_TIMEOUT = 300  # an HTTP stream with no activity
CONNECTION_IDLE_TIMEOUT = 300  # an HTTP connection with no streams
REQUEST_HEADERS_TIMEOUT = 10  # a downstream must send its headers within this (slowloris)


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
        "type": "STATIC" if is_ip(host) else "STRICT_DNS",
        "connect_timeout": _duration(CONNECT_TIMEOUT),
    }
    if not is_ip(host):
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
    domains = {trust_domain_of(peer) for peer in outbound.expect}
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
    if not is_ip(outbound.remote_host):
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
    domains = sorted({trust_domain_of(peer) for peer in options.allow})
    return {
        "policies": [
            {"name": options.policy_name, "trust_domains": domains, "allow": list(options.allow)}
        ]
    }
