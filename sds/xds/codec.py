"""The only module that knows Envoy's wire format: it encodes secrets and responses and
decodes requests, for the xDS messages SDS uses and nothing else.

Why not envoy-data-plane at run time: its pydantic models cost ~40 MB of RSS
to import and several hundred kB per decoded ``Node``, which took a bridge
with 1,000 Envoy streams from ~130 MB to ~440 MB (bench/fanout.py). The
messages SDS needs are few and stable, so they are encoded and decoded here
directly; ``tests/unit/test_envoy_wire.py`` checks every encoding and decoding
byte-for-byte against envoy-data-plane (the reference), so field numbers
cannot drift. Field numbers are those of Envoy's v3 protos:

- ``envoy.service.discovery.v3``: DiscoveryRequest (version_info 1, node 2,
  resource_names 3, type_url 4, response_nonce 5, error_detail 6),
  DiscoveryResponse (version_info 1, resources 2, type_url 4, nonce 5),
  DeltaDiscoveryRequest (node 1, type_url 2, resource_names_subscribe 3,
  resource_names_unsubscribe 4, initial_resource_versions 5, response_nonce 6,
  error_detail 7), DeltaDiscoveryResponse (system_version_info 1, resources 2,
  type_url 4, nonce 5, removed_resources 6), Resource (version 1, resource 2,
  name 3).
- ``envoy.extensions.transport_sockets.tls.v3``: Secret (name 1,
  tls_certificate 2, validation_context 4, generic_secret 5), TlsCertificate
  (certificate_chain 1, private_key 2), CertificateValidationContext
  (trusted_ca 1, custom_validator_config 12, match_typed_subject_alt_names 15),
  SubjectAltNameMatcher (san_type 1 = URI 3, matcher 2), GenericSecret
  (secret 1), SPIFFECertValidatorConfig (trust_domains 1: name 1,
  trust_bundle 2).
- ``envoy.config.core.v3``: DataSource (inline_bytes 2, inline_string 3),
  TypedExtensionConfig (name 1, typed_config 2), Node (id 1, cluster 2,
  metadata 3, user_agent_build_version 8: version 1: major 1, minor 2, patch 3).
- ``envoy.type.matcher.v3.StringMatcher`` (exact 1, prefix 2);
  ``google.protobuf.Any`` (type_url 1, value 2); ``google.protobuf.Struct``
  (fields 1: key 1, value 2; Value: string_value 3, bool_value 4);
  ``google.rpc.Status`` (code 1, message 2).

Secrets are serialized once per content and variant (see the cache), and
responses are assembled by concatenating fields, so a push to a thousand
streams shares one serialization.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from sds.xds.resources import GenericSpec, SecretSpec, TlsSpec, ValidationSpec

__all__ = [
    "SECRET_TYPE_URL",
    "DeltaRequest",
    "NodeInfo",
    "SotwRequest",
    "WireError",
    "decode_delta_request",
    "decode_sotw_request",
    "delta_response",
    "encode_field",
    "iter_fields",
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
_SAN_URI = 3


class WireError(ValueError):
    """A request's bytes are not a valid protobuf message."""


# -- encoding --------------------------------------------------------------------------------


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


def encode_field(number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _text(number: int, value: str) -> bytes:
    return encode_field(number, value.encode()) if value else b""


def _any(type_url: str, value: bytes) -> bytes:
    return encode_field(1, type_url.encode()) + encode_field(2, value)


def _inline_bytes(data: bytes) -> bytes:
    return encode_field(2, data)


def _spiffe_validator(spec: ValidationSpec) -> bytes:
    trust_domains = b"".join(
        encode_field(1, _text(1, b.trust_domain.name) + encode_field(2, _inline_bytes(b.pem())))
        for b in spec.bundles
    )
    return _text(1, SPIFFE_VALIDATOR) + encode_field(
        2, _any(_SPIFFE_CONFIG_TYPE_URL, trust_domains)
    )


def _san_matchers(spec: ValidationSpec) -> bytes:
    uri = _varint(1 << 3) + _varint(_SAN_URI)
    exact = (uri + encode_field(2, _text(1, value)) for value in spec.exact)
    prefix = (uri + encode_field(2, _text(2, value)) for value in spec.prefixes)
    return b"".join(encode_field(15, matcher) for matcher in (*exact, *prefix))


def render_secret(name: str, spec: SecretSpec, *, trusted_ca: bool) -> bytes:
    """Serialize ``spec`` as an Any-wrapped ``Secret`` named ``name``.

    TLS certificates carry the chain (leaf first, one PEM block per
    certificate) and the PKCS#8 key inline. Validation contexts use the
    SPIFFE certificate validator with one entry per trust domain, unless
    ``trusted_ca`` asks for the plain (pooled) ``trusted_ca`` form that
    validators without SPIFFE support need. URI SAN matchers are added in
    both forms, so authorization holds either way. Generic secrets carry an
    inline string.
    """
    if isinstance(spec, TlsSpec):
        tls = encode_field(1, _inline_bytes(spec.svid.chain_pem())) + encode_field(
            2, _inline_bytes(spec.svid.key_pem())
        )
        body = encode_field(2, tls)
    elif isinstance(spec, GenericSpec):
        body = encode_field(5, encode_field(1, encode_field(3, spec.value.encode())))
    else:
        if trusted_ca:
            context = encode_field(1, _inline_bytes(b"".join(b.pem() for b in spec.bundles)))
        else:
            context = encode_field(12, _spiffe_validator(spec))
        body = encode_field(4, context + _san_matchers(spec))
    return _any(SECRET_TYPE_URL, _text(1, name) + body)


def sotw_body(version: str, resources: Iterable[bytes]) -> bytes:
    """A DiscoveryResponse without its nonce: version_info (1), resources (2), type_url (4)."""
    parts = [encode_field(1, version.encode())]
    parts.extend(encode_field(2, resource) for resource in resources)
    parts.append(encode_field(4, SECRET_TYPE_URL.encode()))
    return b"".join(parts)


def with_nonce(body: bytes, nonce: str) -> bytes:
    """Append the nonce field (5); protobuf fields may come in any order."""
    return body + encode_field(5, nonce.encode())


def delta_response(
    system_version: str,
    resources: Sequence[tuple[str, str, bytes]],
    removed: Sequence[str],
    nonce: str,
) -> bytes:
    """A DeltaDiscoveryResponse from (name, version, Any bytes) updates and removed names."""
    parts = [encode_field(1, system_version.encode())]
    for name, version, resource in resources:
        parts.append(
            encode_field(
                2,
                encode_field(1, version.encode())
                + encode_field(2, resource)
                + encode_field(3, name.encode()),
            )
        )
    parts.append(encode_field(4, SECRET_TYPE_URL.encode()))
    parts.append(encode_field(5, nonce.encode()))
    parts.extend(encode_field(6, name.encode()) for name in removed)
    return b"".join(parts)


# -- decoding --------------------------------------------------------------------------------


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise WireError("truncated or oversized varint")
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def iter_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) for each field: an int (varint/fixed) or bytes (length-delimited)."""
    i, end = 0, len(data)
    while i < end:
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
            yield number, value
        elif wire == 2:
            length, i = _read_varint(data, i)
            if i + length > end:
                raise WireError(f"field {number} runs past the end of the message")
            yield number, data[i : i + length]
            i += length
        elif wire == 1:
            if i + 8 > end:
                raise WireError(f"field {number} is truncated")
            yield number, struct.unpack_from("<q", data, i)[0]
            i += 8
        elif wire == 5:
            if i + 4 > end:
                raise WireError(f"field {number} is truncated")
            yield number, struct.unpack_from("<i", data, i)[0]
            i += 4
        else:
            raise WireError(f"unsupported wire type {wire} in field {number}")


def _str(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise WireError("expected a string field")
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise WireError("a string field is not UTF-8") from exc


def _msg(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise WireError("expected a message field")
    return value


def _status_message(data: bytes) -> str:
    code, message = 0, ""
    for number, value in iter_fields(data):
        if number == 1 and isinstance(value, int):
            code = value
        elif number == 2:
            message = _str(value)
    return message or f"gRPC status {code}"


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


def decode_sotw_request(data: bytes) -> SotwRequest:
    """Decode a DiscoveryRequest; raise WireError if the bytes are malformed."""
    request = SotwRequest()
    for number, value in iter_fields(data):
        if number == 1:
            request.version_info = _str(value)
        elif number == 2:
            request.node = _msg(value)
        elif number == 3:
            request.resource_names.append(_str(value))
        elif number == 4:
            request.type_url = _str(value)
        elif number == 5:
            request.response_nonce = _str(value)
        elif number == 6:
            request.error = _status_message(_msg(value))
    return request


def decode_delta_request(data: bytes) -> DeltaRequest:
    """Decode a DeltaDiscoveryRequest; raise WireError if the bytes are malformed."""
    request = DeltaRequest()
    for number, value in iter_fields(data):
        if number == 1:
            request.node = _msg(value)
        elif number == 2:
            request.type_url = _str(value)
        elif number == 3:
            request.subscribe.append(_str(value))
        elif number == 4:
            request.unsubscribe.append(_str(value))
        elif number == 5:
            key = version = ""
            for entry_number, entry in iter_fields(_msg(value)):
                if entry_number == 1:
                    key = _str(entry)
                elif entry_number == 2:
                    version = _str(entry)
            request.initial_versions[key] = version
        elif number == 6:
            request.response_nonce = _str(value)
        elif number == 7:
            request.error = _status_message(_msg(value))
    return request


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What we keep of an Envoy's ``Node``: identity and the validator override."""

    id: str
    cluster: str
    build_version: str
    disable_spiffe: bool | None
    metadata_ignored: bool = False


def _metadata_flag(struct_bytes: bytes, key: str) -> bool | None:
    """``key`` of a Struct as a bool: a bool value, or a string parsed as one (as SPIRE does)."""
    for number, entry in iter_fields(struct_bytes):
        if number != 1:
            continue
        name, value = "", b""
        for entry_number, part in iter_fields(_msg(entry)):
            if entry_number == 1:
                name = _str(part)
            elif entry_number == 2:
                value = _msg(part)
        if name != key:
            continue
        for value_number, content in iter_fields(value):
            if value_number == 4 and isinstance(content, int):
                return bool(content)
            if value_number == 3:
                lowered = _str(content).strip().lower()
                if lowered in ("1", "t", "true", "yes", "on"):
                    return True
                if lowered in ("0", "f", "false", "no", "off"):
                    return False
        return None
    return None


def _build_version(data: bytes) -> str:
    for number, value in iter_fields(data):
        if number == 1:
            parts = {n: v for n, v in iter_fields(_msg(value)) if isinstance(v, int)}
            return f"{parts.get(1, 0)}.{parts.get(2, 0)}.{parts.get(3, 0)}"
    return ""


def node_info(data: bytes, *, max_metadata_bytes: int | None = None) -> NodeInfo:
    """Extract NodeInfo from a serialized ``Node``; raise WireError if malformed.

    ``disable_spiffe_cert_validation`` in node metadata (a bool, or a string
    parsed as a bool, as SPIRE accepts it) overrides the global setting.
    Metadata larger than ``max_metadata_bytes`` is not parsed
    (``metadata_ignored`` is set instead).
    """
    node_id = cluster = build = ""
    flag: bool | None = None
    ignored = False
    for number, value in iter_fields(data):
        if number == 1:
            node_id = _str(value)
        elif number == 2:
            cluster = _str(value)
        elif number == 3:
            metadata = _msg(value)
            if max_metadata_bytes is not None and len(metadata) > max_metadata_bytes:
                ignored, flag = True, None
            else:
                flag = _metadata_flag(metadata, "disable_spiffe_cert_validation")
        elif number == 8:
            build = _build_version(_msg(value))
    return NodeInfo(node_id, cluster, build, flag, ignored)
