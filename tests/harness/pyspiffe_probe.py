"""Independent Workload API check with py-spiffe; run as a separate process, never imported.

py-spiffe registers the same package-less protobuf names as ``sds._proto``,
so it must not share a process with ``sds``. Usage::

    python tests/harness/pyspiffe_probe.py unix:///path/to/socket AUDIENCE [DENIED_SPIFFE_ID]

Prints one JSON object describing what py-spiffe fetched and validated with
its own code: the X.509 context (SVID parsed and checked by py-spiffe, leaf
signature checked against a py-spiffe-parsed bundle authority), the X.509
bundle set, a JWT-SVID validated with ``JwtSvid.parse_and_validate`` against
the fetched JWT bundles, and the server-side ``validate_jwt_svid`` result.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from cryptography.exceptions import InvalidSignature
from spiffe import JwtSvid, SpiffeId, WorkloadApiClient
from spiffe._proto import workload_pb2


def _chains_to(leaf: Any, authorities: Any) -> bool:
    for authority in authorities:
        try:
            leaf.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def main(argv: list[str]) -> int:
    socket_uri, audience = argv[1], argv[2]
    denied_id = argv[3] if len(argv) > 3 else ""
    out: dict[str, Any] = {}
    with WorkloadApiClient(socket_uri, default_timeout=10) as client:
        context = client.fetch_x509_context()
        svid = context.default_svid
        own_td = svid.spiffe_id.trust_domain
        own_bundle = context.x509_bundle_set.get_bundle_for_trust_domain(own_td)
        out["x509_spiffe_ids"] = [str(s.spiffe_id) for s in context.x509_svids]
        out["x509_trust_domain"] = str(own_td)
        out["x509_chain_valid"] = own_bundle is not None and _chains_to(
            svid.leaf, own_bundle.x509_authorities
        )
        out["x509_context_trust_domains"] = sorted(
            str(b.trust_domain) for b in context.x509_bundle_set.bundles
        )

        # py-spiffe does not surface hints; read them from its own generated stub.
        raw = next(
            iter(
                client._spiffe_workload_api_stub.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(), timeout=10
                )
            )
        )
        out["x509_hints"] = [s.hint for s in raw.svids]

        bundles = client.fetch_x509_bundles()
        out["bundle_trust_domains"] = sorted(str(b.trust_domain) for b in bundles.bundles)
        fetched_bundle = bundles.get_bundle_for_trust_domain(own_td)
        out["bundle_verifies_svid"] = fetched_bundle is not None and _chains_to(
            svid.leaf, fetched_bundle.x509_authorities
        )

        jwt_svid = client.fetch_jwt_svid({audience})
        jwt_bundles = client.fetch_jwt_bundles()
        out["jwt_bundle_trust_domains"] = sorted(str(b.trust_domain) for b in jwt_bundles.bundles)
        jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(jwt_svid.spiffe_id.trust_domain)
        validated = JwtSvid.parse_and_validate(jwt_svid.token, jwt_bundle, {audience})
        out["jwt_subject"] = str(validated.spiffe_id)
        out["jwt_audience"] = sorted(validated.audience)
        out["jwt_expiry_after_now"] = validated.expiry > 0

        server_checked = client.validate_jwt_svid(jwt_svid.token, audience)
        out["server_validated_subject"] = str(server_checked.spiffe_id)

        if denied_id:
            try:
                client.fetch_jwt_svid({audience}, subject=SpiffeId(denied_id))
            except Exception as exc:  # py-spiffe wraps grpc errors in its own types
                out["denied_error"] = f"{type(exc).__name__}: {exc}"
            else:
                out["denied_error"] = ""
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
