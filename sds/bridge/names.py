"""Which secrets exist, by name, for a given X.509 state and configuration (no protobuf here).

Names follow SPIRE agent's SDS (``pkg/agent/endpoints/sdsv3``) so existing
Envoy configs work unchanged, plus our additions:

- ``default`` (configurable): TLS certificate of the default SVID: the one
  chosen by ``default_svid`` in config, else the first the Workload API sent.
- ``spiffe://td/path``: TLS certificate of the SVID with that SPIFFE ID.
- ``ROOTCA`` (configurable): validation context for the own trust domain.
- ``ALL`` (configurable): validation context for the own and every federated
  trust domain, one bundle per trust domain.
- ``spiffe://td``: validation context for that trust domain.
- configured ``secrets``: TLS certificates chosen by SPIFFE ID or hint.
- configured ``policies``: validation contexts that also carry SAN matchers.
"""

from __future__ import annotations

from collections.abc import Mapping

from sds.bridge.config import BridgeConfig, SvidSelector
from sds.spiffe.id import TrustDomain
from sds.spiffe.x509 import X509Bundle, X509Context, X509Svid
from sds.xds.resources import SecretSpec, TlsSpec, ValidationSpec

__all__ = ["build_specs", "own_trust_domain", "select_default"]

_AUTO: object = object()


def _select(ctx: X509Context, selector: SvidSelector) -> X509Svid | None:
    return ctx.find(spiffe_id=selector.spiffe_id, hint=selector.hint)


def own_trust_domain(
    ctx: X509Context, config: BridgeConfig, fallback: TrustDomain | None = None
) -> TrustDomain | None:
    """The trust domain ``ROOTCA`` stands for: configured, else the default SVID's, else
    ``fallback`` (the last one seen, so bundles stay served while no SVID is)."""
    if config.trust_domain is not None:
        return config.trust_domain
    default = _default_svid(ctx, config)
    return default.spiffe_id.trust_domain if default is not None else fallback


def select_default(ctx: X509Context, config: BridgeConfig) -> X509Svid | None:
    """The SVID ``ctx`` makes the default: chosen by ``default_svid``, else the first."""
    return _default_svid(ctx, config)


def _default_svid(ctx: X509Context, config: BridgeConfig) -> X509Svid | None:
    if config.default_svid is not None:
        return _select(ctx, config.default_svid)
    return ctx.default_svid


def build_specs(
    ctx: X509Context,
    config: BridgeConfig,
    own: TrustDomain | None = None,
    *,
    default: X509Svid | object | None = _AUTO,
) -> dict[str, SecretSpec]:
    """Every secret that can be served now, by resource name.

    A name whose material is missing (no such SVID, no bundle for a trust
    domain) is simply absent: the server does not answer for it, and Envoy
    keeps waiting, as it does for a secret that is not ready yet. ``own`` is
    the fallback own trust domain when neither config nor an SVID names one.
    ``default`` overrides which SVID ``default`` serves (None: withdrawn); the
    bridge passes the one it keeps pinned.
    """
    specs: dict[str, SecretSpec] = {}
    names = config.names
    # SPIFFE IDs first, so explicit names below win if they collide.
    for svid in reversed(ctx.svids):
        specs[str(svid.spiffe_id)] = TlsSpec(svid)
    picked = _default_svid(ctx, config) if default is _AUTO else default
    default_svid = picked if isinstance(picked, X509Svid) else None
    if default_svid is not None:
        specs[names.default_svid] = TlsSpec(default_svid)
    for secret in config.secrets:
        chosen = _select(ctx, secret.selector)
        if chosen is not None:
            specs[secret.name] = TlsSpec(chosen)
    bundles: Mapping[TrustDomain, X509Bundle] = ctx.bundles
    for td, bundle in bundles.items():
        specs[td.id] = ValidationSpec((bundle,))
    if default is _AUTO:
        own = own_trust_domain(ctx, config, own)
    elif config.trust_domain is not None:
        own = config.trust_domain
    elif default_svid is not None:
        own = default_svid.spiffe_id.trust_domain
    if own is not None and own in bundles:
        specs[names.own_bundle] = ValidationSpec((bundles[own],))
        others = tuple(bundles[td] for td in sorted(bundles) if td != own)
        specs[names.all_bundles] = ValidationSpec((bundles[own], *others))
    elif bundles:
        specs[names.all_bundles] = ValidationSpec(tuple(bundles[td] for td in sorted(bundles)))
    default_id = str(default_svid.spiffe_id) if default_svid is not None else None
    for policy in config.policies_for(default_id):
        wanted = policy.trust_domains or ((own,) if own is not None else ())
        chosen_bundles = tuple(bundles[td] for td in wanted if td in bundles)
        if chosen_bundles:
            specs[policy.name] = ValidationSpec(chosen_bundles, policy.exact, policy.prefixes)
    return specs
