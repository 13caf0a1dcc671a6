"""The secrets Envoy can be sent, as plain values: what :mod:`sds.xds.codec` renders.

A spec holds domain objects (SVIDs, bundles, SAN matchers), never protobuf, and
has a content digest: equal digests mean byte-identical secrets, so the cache
serializes each content once and shares the bytes across streams. Which name
carries which spec is the bridge's business (:mod:`sds.bridge.names`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sds.spiffe.x509 import X509Bundle, X509Svid

__all__ = ["GenericSpec", "SecretSpec", "TlsSpec", "ValidationSpec"]


@dataclass(frozen=True, slots=True)
class TlsSpec:
    """A TLS certificate secret: one SVID's chain and key."""

    svid: X509Svid

    def digest(self) -> str:
        """A content hash: equal digests mean byte-identical secrets."""
        h = hashlib.sha256(b"tls\0")
        h.update(self.svid.chain_der())
        h.update(self.svid.key_der())
        return h.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class ValidationSpec:
    """A validation context: bundles (one per trust domain) plus optional URI SAN matchers."""

    bundles: tuple[X509Bundle, ...]
    exact: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    def digest(self) -> str:
        """A content hash over bundles and matchers."""
        h = hashlib.sha256(b"validation\0")
        for bundle in self.bundles:
            h.update(bundle.trust_domain.name.encode() + b"\0" + bundle.der())
        for value in self.exact:
            h.update(b"=" + value.encode() + b"\0")
        for value in self.prefixes:
            h.update(b"^" + value.encode() + b"\0")
        return h.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class GenericSpec:
    """A generic secret (e.g. ``Bearer <JWT-SVID>`` for Envoy's credential injector)."""

    value: str

    def digest(self) -> str:
        """A content hash of the value."""
        return hashlib.sha256(b"generic\0" + self.value.encode()).hexdigest()[:16]


SecretSpec = TlsSpec | ValidationSpec | GenericSpec
