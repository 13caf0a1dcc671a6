"""What the admin endpoint and the metrics listener answer: one function per page.

:class:`sds.bridge.admin.AdminServer` is the HTTP mechanism; this module is the
content. Each view reads the bridge's live state when it is asked and renders
it, never key bytes. :func:`admin_routes` is the loopback admin endpoint's
table, :func:`scrape_routes` the metrics listener's, which carries only probes
and metrics (no ``/secrets``, ``/envoys`` or JWKS), so it may bind a pod IP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sds.bridge.admin import Response, Route

if TYPE_CHECKING:
    from sds.bridge.metrics import Metrics
    from sds.bridge.state import Bridge
    from sds.workloadapi.watcher import Watcher
    from sds.xds.service import SdsServicer

__all__ = ["BridgeViews"]

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class BridgeViews:
    """The pages about one bridge: its state, its upstreams, its Envoys and its metrics."""

    def __init__(
        self,
        bridge: Bridge,
        watchers: Sequence[Watcher],
        servicer: SdsServicer,
        metrics: Metrics | None,
    ) -> None:
        self.bridge = bridge
        self.watchers = watchers
        self.servicer = servicer
        self.metrics = metrics

    def admin_routes(self) -> tuple[dict[str, Route], dict[str, Callable[[str], Response]]]:
        """The admin endpoint's exact paths and path prefixes (``/jwks/<trust domain>``)."""
        routes: dict[str, Route] = {
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/metrics": self.metrics_page,
            "/envoys": self.envoys,
            "/secrets": self.secrets,
            "/upstreams": self.upstreams,
        }
        return routes, {"/jwks/": self.jwks}

    def scrape_routes(self) -> dict[str, Route]:
        """The metrics listener's paths: probes and metrics, nothing that names a secret."""
        return {"/healthz": self.healthz, "/readyz": self.readyz, "/metrics": self.metrics_page}

    # -- pages ----------------------------------------------------------------------------------

    def healthz(self) -> Response:
        """200 while the process answers at all (liveness)."""
        return Response(200, b"ok\n")

    def readyz(self) -> Response:
        """200 ``ready`` once secrets are servable, else 503 with the reason; with several
        upstreams, one more line per upstream."""
        bridge = self.bridge
        detail = bridge.upstreams_text().encode() if len(self.watchers) > 1 else b""
        if bridge.ready:
            return Response(200, b"ready\n" + detail)
        return Response(503, f"not ready: {bridge.readiness_reason()}\n".encode() + detail)

    def metrics_page(self) -> Response:
        """The Prometheus text exposition (empty when metrics are off)."""
        body = self.metrics.render() if self.metrics is not None else b""
        return Response(200, body, METRICS_CONTENT_TYPE)

    def envoys(self) -> Response:
        """Each connected Envoy: node, peer credentials, names, what it last ACKed."""
        return Response.json([info.as_dict() for info in self.servicer.streams.values()])

    def secrets(self) -> Response:
        """Every resource served: name, version and, per kind, serial and expiry or trust
        domains. Never key bytes."""
        cache = self.bridge.cache
        out = []
        for name in cache.names():
            spec = cache.spec(name)
            item: dict[str, Any] = {"name": name, "version": cache.resource_version(name)}
            svid = getattr(spec, "svid", None)
            if svid is not None:
                item |= {
                    "type": "tls_certificate",
                    "spiffe_id": str(svid.spiffe_id),
                    "serial": f"{svid.serial:x}",
                    "not_after": svid.not_after.isoformat(),
                }
            else:
                item |= {
                    "type": "validation_context",
                    "trust_domains": [b.trust_domain.name for b in getattr(spec, "bundles", ())],
                }
            out.append(item)
        return Response.json(out)

    def upstreams(self) -> Response:
        """Each Workload API: connected, healthy, which SPIFFE IDs it serves."""
        return Response.json(self.bridge.upstreams_view())

    def jwks(self, trust_domain: str) -> Response:
        """The JWT bundle of ``trust_domain`` as a JWKS, from the first upstream that has it."""
        for watcher in self.watchers:
            for td, bundle in watcher.jwt_bundles().items():
                if td.name == trust_domain:
                    return Response(200, bundle.to_jwks(), "application/json")
        return Response(404, f"no JWT bundle for trust domain {trust_domain!r}\n".encode())
