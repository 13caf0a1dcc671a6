"""A native SPIFFE client: py-spiffe takes an X.509-SVID from the Workload API and calls an
Envoy-fronted app over mTLS, with no sidecar on the client side.

    python examples/pyspiffe_client.py unix:///path/workload.sock spiffe://td/client \
        https://127.0.0.1:8443/ [AUDIENCE]

It picks the SVID with the given SPIFFE ID, trusts that SVID's trust domain
bundle, and checks that the server presents a SPIFFE ID of the same trust
domain (SPIFFE X509-SVID standard s.5: authenticate by URI SAN, not hostname).
With AUDIENCE it also sends a JWT-SVID for it as ``Authorization: Bearer``,
for servers whose Envoy requires one.
Keys are passed to Python's ssl module through a private temporary directory
that is removed at once.
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
import tempfile
import urllib.parse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, WorkloadApiClient


def main(endpoint: str, spiffe_id: str, url: str, audience: str | None = None) -> int:
    client = WorkloadApiClient(endpoint, default_timeout=10)
    try:
        context = client.fetch_x509_context()
        headers = {}
        if audience:
            jwt = client.fetch_jwt_svid({audience}, SpiffeId(spiffe_id))
            headers["authorization"] = f"Bearer {jwt.token}"
    finally:
        client.close()
    svid = next((s for s in context.x509_svids if str(s.spiffe_id) == spiffe_id), None)
    if svid is None:
        print(f"no SVID {spiffe_id} from {endpoint}", file=sys.stderr)
        return 1
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert bundle is not None
    pem = serialization.Encoding.PEM
    chain = b"".join(c.public_bytes(pem) for c in svid.cert_chain)
    key = svid.private_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca = b"".join(c.public_bytes(pem) for c in bundle.x509_authorities)

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.check_hostname = False  # SPIFFE servers are identified by URI SAN, checked below
    tls.load_verify_locations(cadata=ca.decode())
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o700)
        (Path(tmp) / "svid.pem").write_bytes(chain)
        (Path(tmp) / "key.pem").write_bytes(key)
        tls.load_cert_chain(Path(tmp) / "svid.pem", Path(tmp) / "key.pem")

    target = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(target.hostname, target.port or 443, context=tls, timeout=10)
    try:
        conn.request("GET", target.path or "/", headers=headers)
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
        leaf = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True))
    finally:
        conn.close()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    server_id = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
    if not server_id.startswith(f"spiffe://{svid.spiffe_id.trust_domain}/"):
        print(f"server presented {server_id}, outside our trust domain", file=sys.stderr)
        return 1
    print(f"HTTP {response.status} from {server_id} as {spiffe_id}: {body}")
    return 0 if response.status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
