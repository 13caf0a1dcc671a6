"""What the bridge's codec (xds-protos types) writes and reads agrees with envoy-data-plane,
a second implementation of Envoy's API (betterproto2), field by field; the lite request
messages read what the full ones write."""

from __future__ import annotations

import datetime as dt

import pytest
from envoy_data_plane.envoy.config.core.v3 import (
    BuildVersion,
    DataSource,
    Node,
    TypedExtensionConfig,
)
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
from envoy_data_plane.envoy.type.v3 import SemanticVersion
from envoy_data_plane.google.protobuf import Any, Struct, Value
from envoy_data_plane.google.rpc import Status
from google.protobuf.message import DecodeError

from sds.provider.ca import LocalCA
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.xds.codec import (
    SECRET_TYPE_URL,
    LiteDeltaRequest,
    LiteRequest,
    WireError,
    delta_request,
    delta_response,
    node_info,
    render_secret,
    sotw_request,
    sotw_response,
)
from sds.xds.resources import GenericSpec, TlsSpec, ValidationSpec

TD = TrustDomain("example.org")
FED = TrustDomain("partner.test")


@pytest.fixture(scope="module")
def material() -> tuple[LocalCA, LocalCA]:
    return LocalCA.ephemeral(TD), LocalCA.ephemeral(FED)


def _parse(secret_bytes: bytes) -> Secret:
    return Secret.parse(secret_bytes)


def test_tls_certificate(material: tuple[LocalCA, LocalCA]) -> None:
    ca, _ = material
    svid = ca.issue_x509_svid(SpiffeId.from_path(TD, "/web"), dt.timedelta(hours=1))
    expected = Secret(
        name="default",
        tls_certificate=TlsCertificate(
            certificate_chain=DataSource(inline_bytes=svid.chain_pem()),
            private_key=DataSource(inline_bytes=svid.key_pem()),
        ),
    )
    ours = render_secret("default", TlsSpec(svid), trusted_ca=False)
    assert _parse(ours).to_dict() == expected.to_dict()
    assert ours == bytes(expected)  # both write fields in number order: the same bytes


@pytest.mark.parametrize("trusted_ca", [False, True])
def test_validation_context_with_matchers(
    material: tuple[LocalCA, LocalCA], trusted_ca: bool
) -> None:
    own, fed = material
    spec = ValidationSpec(
        (own.bundle, fed.bundle), ("spiffe://example.org/a",), ("spiffe://example.org/ns/",)
    )
    matchers = [
        SubjectAltNameMatcher(
            san_type=SubjectAltNameMatcherSanType.URI,
            matcher=StringMatcher(exact="spiffe://example.org/a"),
        ),
        SubjectAltNameMatcher(
            san_type=SubjectAltNameMatcherSanType.URI,
            matcher=StringMatcher(prefix="spiffe://example.org/ns/"),
        ),
    ]
    if trusted_ca:
        context = CertificateValidationContext(
            trusted_ca=DataSource(inline_bytes=own.bundle.pem() + fed.bundle.pem()),
            match_typed_subject_alt_names=matchers,
        )
    else:
        config = SpiffeCertValidatorConfig(
            trust_domains=[
                SpiffeCertValidatorConfigTrustDomain(
                    name=b.trust_domain.name, trust_bundle=DataSource(inline_bytes=b.pem())
                )
                for b in (own.bundle, fed.bundle)
            ]
        )
        context = CertificateValidationContext(
            custom_validator_config=TypedExtensionConfig(
                name="envoy.tls.cert_validator.spiffe",
                typed_config=Any(
                    type_url="type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                    "SPIFFECertValidatorConfig",
                    value=bytes(config),
                ),
            ),
            match_typed_subject_alt_names=matchers,
        )
    expected = Secret(name="ALL", validation_context=context)
    ours = _parse(render_secret("ALL", spec, trusted_ca=trusted_ca))
    assert ours.to_dict() == expected.to_dict()
    if not trusted_ca:
        typed = ours.validation_context.custom_validator_config.typed_config
        assert SpiffeCertValidatorConfig.parse(typed.value).to_dict() == config.to_dict()


def test_generic_secret() -> None:
    expected = Secret(
        name="jwt-svid:aud",
        generic_secret=GenericSecret(secret=DataSource(inline_string="Bearer abc.def.ghi")),
    )
    ours = _parse(
        render_secret("jwt-svid:aud", GenericSpec("Bearer abc.def.ghi"), trusted_ca=False)
    )
    assert ours.to_dict() == expected.to_dict()


def test_sotw_and_delta_responses() -> None:
    resource = render_secret("x", GenericSpec("Bearer t"), trusted_ca=False)
    sotw = sotw_response("v-1", [resource, resource], "n-1").SerializeToString()
    parsed = DiscoveryResponse.parse(sotw)
    assert (parsed.version_info, parsed.nonce, parsed.type_url) == ("v-1", "n-1", SECRET_TYPE_URL)
    assert [r.type_url for r in parsed.resources] == [SECRET_TYPE_URL] * 2
    assert [Secret.parse(r.value).name for r in parsed.resources] == ["x", "x"]
    wrapped = Any(type_url=SECRET_TYPE_URL, value=resource)
    assert sotw == bytes(
        DiscoveryResponse(
            version_info="v-1", resources=[wrapped, wrapped], type_url=SECRET_TYPE_URL, nonce="n-1"
        )
    )
    delta = DeltaDiscoveryResponse.parse(
        delta_response(
            "v-2", [("x", "i-abc", resource)], ["gone", "also-gone"], "n-2"
        ).SerializeToString()
    )
    assert (delta.system_version_info, delta.nonce, delta.type_url) == (
        "v-2",
        "n-2",
        SECRET_TYPE_URL,
    )
    assert [(r.name, r.version) for r in delta.resources] == [("x", "i-abc")]
    assert Secret.parse(delta.resources[0].resource.value).name == "x"
    assert delta.removed_resources == ["gone", "also-gone"]


def _node(**metadata: Value) -> Node:
    return Node(
        id="front",
        cluster="edge",
        metadata=Struct(fields=metadata),
        user_agent_build_version=BuildVersion(
            version=SemanticVersion(major_number=1, minor_number=36, patch=4)
        ),
    )


def test_sotw_request_decoding() -> None:
    reference = DiscoveryRequest(
        version_info="v-7",
        node=_node(),
        resource_names=["default", "ROOTCA"],
        type_url=SECRET_TYPE_URL,
        response_nonce="n-3",
        error_detail=Status(code=3, message="certificate rejected"),
    )
    ours = sotw_request(LiteRequest.FromString(bytes(reference)))
    assert ours.version_info == "v-7"
    assert ours.resource_names == ["default", "ROOTCA"]
    assert (ours.type_url, ours.response_nonce) == (SECRET_TYPE_URL, "n-3")
    assert ours.error == "certificate rejected"
    assert ours.node is not None
    info = node_info(ours.node)
    assert (info.id, info.cluster, info.build_version, info.disable_spiffe) == (
        "front",
        "edge",
        "1.36.4",
        None,
    )
    ack = sotw_request(LiteRequest.FromString(bytes(DiscoveryRequest(resource_names=["a"]))))
    assert ack.error is None and ack.node is None


def test_delta_request_decoding() -> None:
    reference = DeltaDiscoveryRequest(
        node=_node(),
        type_url=SECRET_TYPE_URL,
        resource_names_subscribe=["default", "spiffe://example.org"],
        resource_names_unsubscribe=["ALL"],
        initial_resource_versions={"default": "old-1", "ROOTCA": "old-2"},
        response_nonce="n-9",
        error_detail=Status(code=13),
    )
    ours = delta_request(LiteDeltaRequest.FromString(bytes(reference)))
    assert ours.subscribe == ["default", "spiffe://example.org"]
    assert ours.unsubscribe == ["ALL"]
    assert ours.initial_versions == {"default": "old-1", "ROOTCA": "old-2"}
    assert (ours.type_url, ours.response_nonce, ours.error) == (
        SECRET_TYPE_URL,
        "n-9",
        "gRPC status 13",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Value(bool_value=True), True),
        (Value(bool_value=False), False),
        (Value(string_value="true"), True),
        (Value(string_value=" False "), False),
        (Value(string_value="maybe"), None),
        (Value(number_value=1.0), None),
    ],
)
def test_node_metadata_validator_override(value: Value, expected: bool | None) -> None:
    node = _node(disable_spiffe_cert_validation=value, other=Value(string_value="x"))
    assert node_info(bytes(node)).disable_spiffe is expected


@pytest.mark.parametrize(
    "data",
    [
        b"\x1a\x10abc",  # field 3 runs past the end of the message
        b"\x1a\x02\xff\xfe",  # a string field that is not UTF-8
        b"\x0b",  # wire type 3 (groups) in field 1
        b"\x08\xff",  # a truncated varint
    ],
)
def test_malformed_requests_raise(data: bytes) -> None:
    for message_type in (LiteRequest, LiteDeltaRequest):
        with pytest.raises(DecodeError):
            message_type.FromString(data)
    with pytest.raises(WireError) as info:
        node_info(data)
    assert str(info.value) == "not a valid envoy.config.core.v3.Node"
