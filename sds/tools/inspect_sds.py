"""``sds inspect --sds ADDR``: connect to an SDS server as Envoy does and show what it serves.

It reads responses with Envoy's generated types (xds-protos, through
:mod:`sds.xds.codec`): what it prints is what those messages say, field by
field, not the bridge's own view of its state.

Opens a StreamSecrets stream (node id ``sds-inspect``), asks for the given
names, and summarizes the first response. SPIRE's agent refuses more than one
bundle name in one request (and closes the stream for a name it does not
know), so when the server ends a multi-name stream with an error, each name
is asked for on its own stream and the refusals are reported per name. It
shows: TLS certificates (SPIFFE ID,
serial, expiry, chain length; never key bytes), validation contexts (trust
domains, CA counts, SAN matchers, validator kind) and generic secrets (JWT
claims, token redacted). With ``--admin`` it adds the per-Envoy view from our
bridge's ``/envoys``: which version and serial each connected Envoy ACKed.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from cryptography import x509
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from sds.errors import SdsError
from sds.spiffe.jwt import b64url_decode
from sds.xds.codec import (
    DiscoveryRequest,
    DiscoveryResponse,
    WireError,
    client_request,
    response_secrets,
    spiffe_trust_domains,
)

__all__ = ["collect_sds", "render_sds"]

DEFAULT_NAMES = ("default", "ROOTCA", "ALL")


def _uri(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else ""


def _jwt_claims(value: str) -> dict[str, Any]:
    token = value.removeprefix("Bearer ")
    try:
        payload = token.split(".")[1]
        claims: dict[str, Any] = json.loads(b64url_decode(payload))
    except (IndexError, ValueError):
        return {"error": "not a JWT"}
    return {k: claims.get(k) for k in ("sub", "aud", "exp")}


def _pem_of(source: Any) -> bytes:
    data = source.inline_bytes if source.WhichOneof("specifier") == "inline_bytes" else b""
    return bytes(data)


def summarize(secret: Any) -> dict[str, Any]:
    """A JSON-ready description of one ``Secret`` message, without key bytes or tokens."""
    kind = secret.WhichOneof("type")
    if kind == "tls_certificate":
        tls = secret.tls_certificate
        chain = x509.load_pem_x509_certificates(_pem_of(tls.certificate_chain))
        leaf = chain[0]
        return {
            "name": secret.name,
            "type": "tls_certificate",
            "spiffe_id": _uri(leaf),
            "serial": f"{leaf.serial_number:x}",
            "not_after": leaf.not_valid_after_utc.isoformat(),
            "chain_length": len(chain),
            "private_key": "present (not shown)" if _pem_of(tls.private_key) else "missing",
        }
    if kind == "generic_secret":
        source = secret.generic_secret.secret
        value = source.inline_string if source.WhichOneof("specifier") == "inline_string" else ""
        return {"name": secret.name, "type": "generic_secret", "jwt": _jwt_claims(value)}
    item: dict[str, Any] = {"name": secret.name, "type": "validation_context"}
    if kind != "validation_context":
        return item
    context = secret.validation_context
    trust_domains = spiffe_trust_domains(context)
    if trust_domains is not None:
        item["validator"] = "spiffe"
        item["trust_domains"] = {
            td: len(x509.load_pem_x509_certificates(pem)) for td, pem in trust_domains.items()
        }
    elif context.HasField("trusted_ca"):
        item["validator"] = "trusted_ca"
        item["ca_count"] = len(x509.load_pem_x509_certificates(_pem_of(context.trusted_ca)))
    item["allow"] = [
        m.matcher.exact
        if m.matcher.WhichOneof("match_pattern") == "exact"
        else f"{m.matcher.prefix}*"
        for m in context.match_typed_subject_alt_names
        if m.HasField("matcher")
    ]
    return item


async def _ask(
    channel: Channel, names: list[str], wait_seconds: float, node_id: str = "sds-inspect"
) -> Any:
    """The first response to a StreamSecrets request for ``names``; None if none in time.

    As node ``sds-inspect`` the server counts the stream as an inspector, not an Envoy."""
    import asyncio  # noqa: PLC0415

    async with channel.request(
        "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
        Cardinality.STREAM_STREAM,
        DiscoveryRequest,
        DiscoveryResponse,
    ) as stream:
        await stream.send_message(client_request(names, node_id))
        try:
            async with asyncio.timeout(wait_seconds):
                response: Any = await stream.recv_message()
        except TimeoutError:
            response = None
        await stream.cancel()
    return response


async def collect_sds(
    path: str, names: list[str], admin: str | None, wait_seconds: float
) -> dict[str, Any]:
    """Fetch ``names`` from the SDS server at Unix socket ``path``; raise SdsError on failure."""
    import asyncio  # noqa: PLC0415

    channel = Channel(path=path)
    refused: dict[str, str] = {}
    responses: list[Any] = []
    try:
        try:
            response = await _ask(channel, names, wait_seconds)
        except GRPCError as exc:
            if exc.status is Status.PERMISSION_DENIED or len(names) < 2:
                raise
            response = None
            for name in names:  # SPIRE: one bundle name per request
                try:
                    single = await _ask(channel, [name], wait_seconds)
                except GRPCError as one:
                    refused[name] = f"{one.status.name}: {one.message or ''}".rstrip(": ")
                    continue
                if single is not None:
                    responses.append(single)
            if not responses and not refused:
                raise
        else:
            if response is None:
                raise SdsError(
                    f"SDS server at unix://{path} served none of {', '.join(names)} "
                    f"within {wait_seconds:g}s"
                )
            responses.append(response)
    except (OSError, StreamTerminatedError) as exc:
        raise SdsError(f"SDS server at unix://{path} is unavailable: {exc}") from exc
    except GRPCError as exc:
        raise SdsError(f"SDS server at unix://{path} refused: {exc.message}") from exc
    finally:
        channel.close()
    secrets: list[dict[str, Any]] = []
    served: set[str] = set()
    try:
        summaries = [summarize(secret) for each in responses for secret in response_secrets(each)]
    except WireError as exc:
        raise SdsError(f"SDS server at unix://{path} sent a malformed response: {exc}") from exc
    for item in summaries:
        if item["name"] not in served:
            served.add(item["name"])
            secrets.append(item)
    versions = list(dict.fromkeys(r.version_info for r in responses))
    report: dict[str, Any] = {
        "sds": f"unix://{path}",
        "version": ",".join(versions) or "-",
        "secrets": secrets,
        "not_served": [n for n in names if n not in served and n not in refused],
    }
    if refused:
        report["refused"] = refused
    if admin:
        try:
            report["envoys"] = await asyncio.to_thread(_admin_envoys, admin, wait_seconds)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            report["envoys_error"] = f"admin endpoint {admin} not reachable: {exc}"
    return report


def _admin_envoys(admin: str, timeout: float) -> Any:
    with urllib.request.urlopen(f"http://{admin}/envoys", timeout=timeout) as r:
        return json.loads(r.read())


def render_sds(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`collect_sds`'s report."""
    lines = [f"SDS server {report['sds']} (version {report['version']})", ""]
    for item in report["secrets"]:
        lines.append(f"  {item['name']}: {item['type']}")
        if item["type"] == "tls_certificate":
            lines.append(f"    SPIFFE ID:   {item['spiffe_id']}")
            lines.append(f"    serial:      {item['serial']}")
            lines.append(f"    not after:   {item['not_after']}")
            lines.append(
                f"    chain:       {item['chain_length']} certificate(s), key {item['private_key']}"
            )
        elif item["type"] == "validation_context":
            if item.get("validator") == "spiffe":
                for td, count in item["trust_domains"].items():
                    lines.append(f"    trust domain {td}: {count} CA(s) (SPIFFE validator)")
            else:
                lines.append(f"    trusted_ca: {item.get('ca_count', 0)} CA(s)")
            if item.get("allow"):
                lines.append(f"    admits only: {', '.join(item['allow'])}")
        else:
            lines.append(f"    JWT-SVID:    {item['jwt']}")
    if report["not_served"]:
        lines.append(f"  not served now: {', '.join(report['not_served'])}")
    for name, reason in report.get("refused", {}).items():
        lines.append(f"  refused by the server: {name} ({reason})")
    if "envoys" in report:
        lines += ["", "Connected Envoys (what each last ACKed):"]
        for envoy in report["envoys"]:
            serials = ", ".join(f"{k}={v}" for k, v in envoy["acked_serials"].items()) or "-"
            lines.append(
                f"  node {envoy['node_id'] or '?'} pid={envoy['pid']} uid={envoy['uid']} "
                f"{envoy['kind']} names={','.join(envoy['names'])} "
                f"acked={envoy['acked_version'] or '-'} serials={serials}"
            )
    elif "envoys_error" in report:
        lines += ["", report["envoys_error"]]
    return "\n".join(lines) + "\n"
