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
from sds.bridge.state import Bridge as _Bridge
from sds.xds.resources import GenericSpec

if TYPE_CHECKING:
    from sds.bridge.callers import Callers
    from sds.bridge.metrics import Metrics
    from sds.bridge.state import Bridge
    from sds.workloadapi.watcher import Watcher
    from sds.xds.cache import SecretCache
    from sds.xds.service import SdsServicer

__all__ = ["BridgeViews"]

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class BridgeViews:
    """The pages about one bridge: its state, its upstreams, its Envoys and its metrics.

    ``state`` is the bridge's own identity (:class:`~sds.bridge.state.Bridge`) or,
    in per-caller mode, the attested callers (:class:`~sds.bridge.callers.Callers`):
    then ``/secrets`` lists each caller's secrets and ``/callers`` who is attested.
    """

    def __init__(
        self,
        state: Bridge | Callers,
        watchers: Sequence[Watcher],
        servicer: SdsServicer,
        metrics: Metrics | None,
    ) -> None:
        self.state = state
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
            "/callers": self.callers,
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
        state = self.state
        if isinstance(state, _Bridge):
            detail = state.upstreams_text().encode() if len(self.watchers) > 1 else b""
        else:
            detail = state.upstreams_text().encode()
        if state.ready:
            return Response(200, b"ready\n" + detail)
        return Response(503, f"not ready: {state.readiness_reason()}\n".encode() + detail)

    def metrics_page(self) -> Response:
        """The Prometheus text exposition (empty when metrics are off)."""
        body = self.metrics.render() if self.metrics is not None else b""
        return Response(200, body, METRICS_CONTENT_TYPE)

    def envoys(self) -> Response:
        """Each connected Envoy: node, peer credentials, names, what it last ACKed."""
        return Response.json([info.as_dict() for info in self.servicer.streams.values()])

    def secrets(self) -> Response:
        """Every resource served: name, version and, per kind, serial and expiry or trust
        domains (per-caller mode: per attested caller, with its pid). Never key bytes."""
        state = self.state
        if isinstance(state, _Bridge):
            return Response.json(_describe(state.cache))
        return Response.json(
            [
                {"pid": w.process.pid, "workload": w.label(), "secrets": _describe(w.cache)}
                for w in state.workloads.values()
            ]
        )

    def callers(self) -> Response:
        """Per-caller mode: each attested process, its SPIFFE IDs and streams ([] otherwise)."""
        state = self.state
        return Response.json([] if isinstance(state, _Bridge) else state.view())

    def upstreams(self) -> Response:
        """Each Workload API (or Delegated Identity API): connected, healthy, what it serves."""
        return Response.json(self.state.upstreams_view())

    def jwks(self, trust_domain: str) -> Response:
        """The JWT bundle of ``trust_domain`` as a JWKS, from the first upstream that has it."""
        state = self.state
        sources = self.watchers if isinstance(state, _Bridge) else state.bundles
        for source in sources:
            for td, bundle in source.jwt_bundles().items():
                if td.name == trust_domain:
                    return Response(200, bundle.to_jwks(), "application/json")
        return Response(404, f"no JWT bundle for trust domain {trust_domain!r}\n".encode())


def _describe(cache: SecretCache) -> list[dict[str, Any]]:
    """What ``/secrets`` says about each resource in ``cache``: never key or token bytes."""
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
        elif isinstance(spec, GenericSpec):
            item["type"] = "generic_secret"
        else:
            item |= {
                "type": "validation_context",
                "trust_domains": [b.trust_domain.name for b in getattr(spec, "bundles", ())],
            }
        out.append(item)
    return out
