"""The only module that builds Envoy API messages (envoy-data-plane) and xDS wire bytes.

Secrets are serialized once per content and rendering variant, then wrapped
into responses by concatenating protobuf fields, so a push to a thousand
streams shares one serialization. Field numbers below are those of
``envoy.service.discovery.v3`` (``discovery.proto``) and
``google.protobuf.Any``; a test parses our bytes back with envoy-data-plane.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import betterproto2
from envoy_data_plane.envoy.config.core.v3 import DataSource, TypedExtensionConfig
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    GenericSecret,
    Secret,
    SpiffeCertValidatorConfig,
    SpiffeCertValidatorConfigTrustDomain,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
)
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Any as AnyMessage

from .resources import GenericSpec, SecretSpec, TlsSpec, ValidationSpec

__all__ = [
    "SECRET_TYPE_URL",
    "DeltaDiscoveryRequest",
    "DeltaDiscoveryResponse",
    "DiscoveryRequest",
    "DiscoveryResponse",
    "NodeInfo",
    "delta_response",
    "node_info",
    "render_secret",
    "sotw_body",
    "with_nonce",
]

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
_SPIFFE_CONFIG_TYPE_URL = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _any(type_url: str, value: bytes) -> bytes:
    """A serialized google.protobuf.Any (type_url = 1, value = 2)."""
    return _field(1, type_url.encode()) + _field(2, value)


def _spiffe_validator(spec: ValidationSpec) -> TypedExtensionConfig:
    config = SpiffeCertValidatorConfig(
        trust_domains=[
            SpiffeCertValidatorConfigTrustDomain(
                name=bundle.trust_domain.name, trust_bundle=DataSource(inline_bytes=bundle.pem())
            )
            for bundle in spec.bundles
        ]
    )
    return TypedExtensionConfig(
        name=SPIFFE_VALIDATOR,
        typed_config=AnyMessage(type_url=_SPIFFE_CONFIG_TYPE_URL, value=bytes(config)),
    )


def _san_matchers(spec: ValidationSpec) -> list[SubjectAltNameMatcher]:
    uri = SubjectAltNameMatcherSanType.URI
    matchers = [
        SubjectAltNameMatcher(san_type=uri, matcher=StringMatcher(exact=value))
        for value in spec.exact
    ]
    matchers += [
        SubjectAltNameMatcher(san_type=uri, matcher=StringMatcher(prefix=value))
        for value in spec.prefixes
    ]
    return matchers


def render_secret(name: str, spec: SecretSpec, *, trusted_ca: bool) -> bytes:
    """Serialize ``spec`` as an Any-wrapped ``Secret`` named ``name``.

    TLS certificates carry the chain (leaf first, one PEM block per
    certificate) and the PKCS#8 key inline. Validation contexts use the
    SPIFFE certificate validator with one entry per trust domain, unless
    ``trusted_ca`` asks for the plain (pooled) ``trusted_ca`` form that
    validators without SPIFFE support need. URI SAN matchers are added in
    both forms, so authorization holds either way.
    """
    if isinstance(spec, GenericSpec):
        secret = Secret(
            name=name, generic_secret=GenericSecret(secret=DataSource(inline_string=spec.value))
        )
    elif isinstance(spec, TlsSpec):
        secret = Secret(
            name=name,
            tls_certificate=TlsCertificate(
                certificate_chain=DataSource(inline_bytes=spec.svid.chain_pem()),
                private_key=DataSource(inline_bytes=spec.svid.key_pem()),
            ),
        )
    else:
        matchers = _san_matchers(spec)
        if trusted_ca:
            context = CertificateValidationContext(
                trusted_ca=DataSource(inline_bytes=b"".join(b.pem() for b in spec.bundles)),
                match_typed_subject_alt_names=matchers,
            )
        else:
            context = CertificateValidationContext(
                custom_validator_config=_spiffe_validator(spec),
                match_typed_subject_alt_names=matchers,
            )
        secret = Secret(name=name, validation_context=context)
    return _any(SECRET_TYPE_URL, bytes(secret))


def sotw_body(version: str, resources: Iterable[bytes]) -> bytes:
    """A DiscoveryResponse without its nonce: version_info (1), resources (2), type_url (4)."""
    parts = [_field(1, version.encode())]
    parts.extend(_field(2, resource) for resource in resources)
    parts.append(_field(4, SECRET_TYPE_URL.encode()))
    return b"".join(parts)


def with_nonce(body: bytes, nonce: str) -> bytes:
    """Append the nonce field (5); protobuf fields may come in any order."""
    return body + _field(5, nonce.encode())


def delta_response(
    system_version: str,
    resources: Sequence[tuple[str, str, bytes]],
    removed: Sequence[str],
    nonce: str,
) -> bytes:
    """A DeltaDiscoveryResponse: resources (2) as Resource{version 1, resource 2, name 3},
    type_url (4), nonce (5), removed_resources (6), system_version_info (1)."""
    parts = [_field(1, system_version.encode())]
    for name, version, resource in resources:
        parts.append(
            _field(2, _field(1, version.encode()) + _field(2, resource) + _field(3, name.encode()))
        )
    parts.append(_field(4, SECRET_TYPE_URL.encode()))
    parts.append(_field(5, nonce.encode()))
    parts.extend(_field(6, name.encode()) for name in removed)
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What we keep of an Envoy's ``Node``: identity and the validator override."""

    id: str
    cluster: str
    build_version: str
    disable_spiffe: bool | None


def _metadata_flag(metadata: Any, key: str) -> bool | None:
    fields = getattr(metadata, "fields", None) or {}
    value = fields.get(key)
    if value is None:
        return None
    kind, inner = betterproto2.which_one_of(value, "kind")
    if kind == "bool_value":
        return bool(inner)
    if kind == "string_value":
        lowered = str(inner).strip().lower()
        if lowered in ("1", "t", "true", "yes", "on"):
            return True
        if lowered in ("0", "f", "false", "no", "off"):
            return False
    return None


def node_info(node: Any) -> NodeInfo | None:
    """Extract NodeInfo from a request's ``node`` (None when the request has none).

    ``disable_spiffe_cert_validation`` in node metadata (a bool, or a string
    parsed as a bool, as SPIRE accepts it) overrides the global setting.
    """
    if node is None:
        return None
    build = ""
    version = getattr(node, "user_agent_build_version", None)
    if version is not None and getattr(version, "version", None) is not None:
        v = version.version
        build = f"{v.major_number}.{v.minor_number}.{v.patch}"
    return NodeInfo(
        id=node.id or "",
        cluster=node.cluster or "",
        build_version=build,
        disable_spiffe=_metadata_flag(node.metadata, "disable_spiffe_cert_validation"),
    )
