"""A strict fake Envoy for SDS unit tests: every response is checked against the protocol.

Invariants checked on every response (xDS protocol; Envoy's SDS expectations):
type_url is the Secret type; version is non-empty and starts with the
server's instance id; nonces are unique within a stream; every resource is
an Any of the Secret type whose name was requested (no duplicates); TLS
certificates have one PEM block per certificate, leaf first, and a key that
matches the leaf; validation contexts use the SPIFFE validator with one
entry per trust domain or a plain ``trusted_ca``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    Secret,
    SpiffeCertValidatorConfig,
)
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy_data_plane.google.protobuf import Struct, Value
from envoy_data_plane.google.rpc import Status as RpcStatus
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"


@dataclass
class Received:
    """One response, decoded and checked."""

    version: str
    nonce: str
    secrets: dict[str, Secret]
    removed: list[str] = field(default_factory=list)
    resource_versions: dict[str, str] = field(default_factory=dict)

    def serial(self, name: str) -> int:
        chain = self.secrets[name].tls_certificate.certificate_chain.inline_bytes
        return x509.load_pem_x509_certificates(chain)[0].serial_number

    def trust_domains(self, name: str) -> list[str]:
        context = self.secrets[name].validation_context
        config = SpiffeCertValidatorConfig.parse(context.custom_validator_config.typed_config.value)
        return [td.name for td in config.trust_domains]


def check_secret(secret: Secret, requested: Iterable[str] | None) -> None:
    """Assert the invariants every secret we serve must satisfy."""
    if requested is not None:
        assert secret.name in set(requested), f"unrequested secret {secret.name}"
    if secret.generic_secret is not None:
        value = secret.generic_secret.secret.inline_string
        assert value and value.startswith("Bearer "), "generic secret must be a bearer credential"
    elif secret.tls_certificate is not None:
        chain_pem = secret.tls_certificate.certificate_chain.inline_bytes
        assert chain_pem.count(b"-----BEGIN CERTIFICATE-----") >= 1
        chain = x509.load_pem_x509_certificates(chain_pem)
        assert chain_pem.count(b"-----BEGIN CERTIFICATE-----") == len(chain)
        key = serialization.load_pem_private_key(
            secret.tls_certificate.private_key.inline_bytes, None
        )
        assert b"BEGIN PRIVATE KEY" in secret.tls_certificate.private_key.inline_bytes  # PKCS#8
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        assert key.public_key().public_bytes(der, spki) == chain[0].public_key().public_bytes(
            der, spki
        ), "key does not match leaf"
    else:
        context = secret.validation_context
        assert context is not None, f"{secret.name} is neither TLS, validation nor generic"
        if context.custom_validator_config is not None:
            assert context.custom_validator_config.name == "envoy.tls.cert_validator.spiffe"
            config = SpiffeCertValidatorConfig.parse(
                context.custom_validator_config.typed_config.value
            )
            names = [td.name for td in config.trust_domains]
            assert names and len(names) == len(set(names)), names
            for td in config.trust_domains:
                assert not td.name.startswith("spiffe://")
                x509.load_pem_x509_certificates(td.trust_bundle.inline_bytes)
        else:
            assert context.trusted_ca is not None
            x509.load_pem_x509_certificates(context.trusted_ca.inline_bytes)


def node(node_id: str = "envoy-1", **metadata: Any) -> Node:
    fields = {
        k: Value(bool_value=v) if isinstance(v, bool) else Value(string_value=str(v))
        for k, v in metadata.items()
    }
    return Node(id=node_id, cluster="test", metadata=Struct(fields=fields))


class SotwStream:
    """A StreamSecrets client that checks each response; send() and recv() drive it."""

    def __init__(self, stream: Any, instance_prefix: str | None) -> None:
        self.stream = stream
        self.instance_prefix = instance_prefix
        self.nonces: set[str] = set()
        self.last: Received | None = None
        self.names: list[str] = []

    async def send(
        self,
        names: list[str],
        *,
        nonce: str | None = None,
        version: str | None = None,
        error: str | None = None,
        with_node: Node | None = None,
    ) -> None:
        self.names = names
        last = self.last
        request = DiscoveryRequest(
            type_url=SECRET_TYPE,
            resource_names=names,
            response_nonce=nonce if nonce is not None else (last.nonce if last else ""),
            version_info=version if version is not None else (last.version if last else ""),
            node=with_node,
            error_detail=RpcStatus(code=3, message=error) if error else None,
        )
        await self.stream.send_message(request)

    async def ack(self) -> None:
        await self.send(self.names)

    async def recv(self, timeout: float = 5.0) -> Received:
        response: DiscoveryResponse = await asyncio.wait_for(self.stream.recv_message(), timeout)
        assert response is not None, "stream closed"
        assert response.type_url == SECRET_TYPE
        assert response.version_info, "empty version"
        if self.instance_prefix is not None:
            assert response.version_info.startswith(self.instance_prefix + "-")
        assert response.nonce and response.nonce not in self.nonces, "nonce reused"
        self.nonces.add(response.nonce)
        secrets: dict[str, Secret] = {}
        for resource in response.resources:
            assert resource.type_url == SECRET_TYPE
            secret = Secret.parse(resource.value)
            assert secret.name not in secrets, f"duplicate {secret.name}"
            check_secret(secret, self.names or None)
            secrets[secret.name] = secret
        self.last = Received(response.version_info, response.nonce, secrets)
        return self.last

    async def expect_silence(self, seconds: float = 0.3) -> None:
        with contextlib.suppress(TimeoutError):
            response = await asyncio.wait_for(self.stream.recv_message(), seconds)
            raise AssertionError(f"unexpected response: {response}")


class DeltaStream:
    """A DeltaSecrets client that checks each response."""

    def __init__(self, stream: Any, instance_prefix: str | None) -> None:
        self.stream = stream
        self.instance_prefix = instance_prefix
        self.nonces: set[str] = set()
        self.subscribed: set[str] = set()

    async def send(
        self,
        subscribe: list[str] = (),  # type: ignore[assignment]
        unsubscribe: list[str] = (),  # type: ignore[assignment]
        *,
        nonce: str = "",
        error: str | None = None,
        initial: dict[str, str] | None = None,
        with_node: Node | None = None,
    ) -> None:
        self.subscribed |= set(subscribe)
        self.subscribed -= set(unsubscribe)
        await self.stream.send_message(
            DeltaDiscoveryRequest(
                type_url=SECRET_TYPE,
                resource_names_subscribe=list(subscribe),
                resource_names_unsubscribe=list(unsubscribe),
                response_nonce=nonce,
                initial_resource_versions=initial or {},
                node=with_node,
                error_detail=RpcStatus(code=3, message=error) if error else None,
            )
        )

    async def recv(self, timeout: float = 5.0) -> Received:
        response: DeltaDiscoveryResponse = await asyncio.wait_for(
            self.stream.recv_message(), timeout
        )
        assert response is not None, "stream closed"
        assert response.type_url == SECRET_TYPE
        assert response.nonce and response.nonce not in self.nonces
        self.nonces.add(response.nonce)
        secrets: dict[str, Secret] = {}
        versions: dict[str, str] = {}
        for resource in response.resources:
            assert resource.resource.type_url == SECRET_TYPE
            assert resource.version
            if self.instance_prefix is not None:
                assert resource.version.startswith(self.instance_prefix + "-")
            secret = Secret.parse(resource.resource.value)
            assert secret.name == resource.name
            assert resource.name in self.subscribed, f"not subscribed: {resource.name}"
            check_secret(secret, None)
            secrets[resource.name] = secret
            versions[resource.name] = resource.version
        return Received(
            response.system_version_info,
            response.nonce,
            secrets,
            list(response.removed_resources),
            versions,
        )

    async def expect_silence(self, seconds: float = 0.3) -> None:
        with contextlib.suppress(TimeoutError):
            response = await asyncio.wait_for(self.stream.recv_message(), seconds)
            raise AssertionError(f"unexpected response: {response}")


@contextlib.asynccontextmanager
async def _open(channel: Channel, method: str, request: type, response: type) -> AsyncIterator[Any]:
    stream = channel.request(f"{SERVICE}/{method}", Cardinality.STREAM_STREAM, request, response)
    await stream.__aenter__()
    try:
        yield stream
    finally:
        # The server may already have ended the stream (e.g. PERMISSION_DENIED).
        with contextlib.suppress(StreamTerminatedError, GRPCError, ProtocolError):
            await stream.cancel()
        with contextlib.suppress(StreamTerminatedError, GRPCError, ProtocolError):
            await stream.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def sotw(channel: Channel, instance: str | None) -> AsyncIterator[SotwStream]:
    async with _open(channel, "StreamSecrets", DiscoveryRequest, DiscoveryResponse) as stream:
        yield SotwStream(stream, instance)


@contextlib.asynccontextmanager
async def delta(channel: Channel, instance: str | None) -> AsyncIterator[DeltaStream]:
    async with _open(
        channel, "DeltaSecrets", DeltaDiscoveryRequest, DeltaDiscoveryResponse
    ) as stream:
        yield DeltaStream(stream, instance)


async def fetch(channel: Channel, names: list[str]) -> DiscoveryResponse:
    async with channel.request(
        f"{SERVICE}/FetchSecrets", Cardinality.UNARY_UNARY, DiscoveryRequest, DiscoveryResponse
    ) as stream:
        await stream.send_message(
            DiscoveryRequest(type_url=SECRET_TYPE, resource_names=names), end=True
        )
        response: DiscoveryResponse = await stream.recv_message()
        return response
