"""X.509-SVIDs, trust bundles and the checks that gate publishing them.

Nothing here knows about gRPC or protobuf: the Workload API client turns wire
messages into these types, the SDS server turns them into Envoy secrets.
Checks follow the SPIFFE X509-SVID standard: section 4 (leaf: exactly one URI
SAN, ``CA=false``, ``digitalSignature`` set, ``keyCertSign``/``cRLSign`` not
set) and section 5 (the chain validates against the trust domain's bundle).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from sds.errors import InvalidBundle, InvalidSpiffeId, InvalidSvid
from sds.spiffe.id import SpiffeId, TrustDomain

__all__ = [
    "BundleSet",
    "X509Bundle",
    "X509Context",
    "X509Source",
    "X509Svid",
    "is_ca",
    "split_der_certificates",
    "utc_text",
    "utcnow",
]


def utc_text(when: dt.datetime) -> str:
    """``when`` in UTC as RFC 3339 to the second with a ``Z`` (``2026-01-02T03:04:05Z``)."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utcnow() -> dt.datetime:
    """The current time as an aware UTC datetime."""
    return dt.datetime.now(dt.UTC)


def split_der_certificates(data: bytes) -> list[x509.Certificate]:
    """Parse concatenated ASN.1 DER certificates, as the Workload API sends them.

    Raises ValueError with the byte offset of the first malformed certificate.
    """
    certs: list[x509.Certificate] = []
    offset = 0
    while offset < len(data):
        end = offset + _der_length(data, offset)
        try:
            certs.append(x509.load_der_x509_certificate(data[offset:end]))
        except ValueError as exc:
            raise ValueError(f"certificate at byte {offset} does not parse: {exc}") from exc
        offset = end
    return certs


def _der_length(data: bytes, offset: int) -> int:
    """Total length (header + body) of the DER SEQUENCE that starts at ``offset``."""
    if len(data) - offset < 2 or data[offset] != 0x30:
        raise ValueError(f"no DER SEQUENCE at byte {offset}")
    first = data[offset + 1]
    if first < 0x80:
        total = 2 + first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(data) - offset < 2 + count:
            raise ValueError(f"bad DER length at byte {offset}")
        body = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
        total = 2 + count + body
    if offset + total > len(data):
        raise ValueError(f"truncated certificate at byte {offset}")
    return total


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class X509Bundle:
    """The X.509 authorities (CA certificates) of one trust domain."""

    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...]

    @classmethod
    def from_der(cls, trust_domain: TrustDomain, data: bytes) -> X509Bundle:
        """Parse concatenated DER CA certificates; raise InvalidBundle naming the trust domain."""
        try:
            authorities = split_der_certificates(data)
        except ValueError as exc:
            raise InvalidBundle(f"bundle for {trust_domain.id}: {exc}") from exc
        if not authorities:
            raise InvalidBundle(f"bundle for {trust_domain.id} has no certificates")
        return cls(trust_domain, tuple(authorities))

    @classmethod
    def from_pem(cls, trust_domain: TrustDomain, data: bytes) -> X509Bundle:
        """Parse PEM CA certificates; raise InvalidBundle naming the trust domain."""
        try:
            authorities = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise InvalidBundle(f"bundle for {trust_domain.id}: {exc}") from exc
        return cls(trust_domain, tuple(authorities))

    def der(self) -> bytes:
        """Concatenated DER, the Workload API encoding."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.authorities)

    def pem(self) -> bytes:
        """One PEM block per authority, the Envoy encoding."""
        return b"".join(_pem(c) for c in self.authorities)


class BundleSet(Mapping[TrustDomain, X509Bundle]):
    """An immutable map from trust domain to its X.509 bundle."""

    __slots__ = ("_bundles",)

    def __init__(self, bundles: Iterable[X509Bundle] = ()) -> None:
        self._bundles: dict[TrustDomain, X509Bundle] = {b.trust_domain: b for b in bundles}

    def __getitem__(self, key: TrustDomain) -> X509Bundle:
        return self._bundles[key]

    def __iter__(self) -> Iterator[TrustDomain]:
        return iter(sorted(self._bundles))

    def __len__(self) -> int:
        return len(self._bundles)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BundleSet):
            return NotImplemented
        return {k: v.der() for k, v in self._bundles.items()} == {
            k: v.der() for k, v in other._bundles.items()
        }

    def __hash__(self) -> int:
        return hash(tuple((k, v.der()) for k, v in sorted(self._bundles.items())))

    def __repr__(self) -> str:
        return f"BundleSet({[td.name for td in self]})"


@dataclass(frozen=True, slots=True)
class X509Svid:
    """An X.509-SVID: its SPIFFE ID, chain (leaf first), private key and optional hint.

    Construct with :meth:`parse` (which validates) or from trusted code that
    just issued the material. The private key lives only in memory.
    """

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKeyTypes = field(repr=False)
    hint: str = ""

    @property
    def leaf(self) -> x509.Certificate:
        """The end-entity certificate."""
        return self.chain[0]

    @property
    def not_after(self) -> dt.datetime:
        """When the leaf expires (aware UTC)."""
        return self.leaf.not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        """When the leaf becomes valid (aware UTC)."""
        return self.leaf.not_valid_before_utc

    @property
    def serial(self) -> int:
        """The leaf's serial number."""
        return self.leaf.serial_number

    def chain_der(self) -> bytes:
        """Concatenated DER, leaf first (Workload API ``x509_svid``)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.chain)

    def chain_pem(self) -> bytes:
        """One PEM block per certificate, leaf first (Envoy ``certificate_chain``)."""
        return b"".join(_pem(c) for c in self.chain)

    def key_der(self) -> bytes:
        """Unencrypted PKCS#8 DER (Workload API ``x509_svid_key``)."""
        return self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM (Envoy ``private_key``)."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def dns_sans(self) -> list[str]:
        """DNS names in the leaf's SAN extension."""
        san = _san(self.leaf)
        return [] if san is None else san.get_values_for_type(x509.DNSName)

    def ip_sans(self) -> list[str]:
        """IP addresses in the leaf's SAN extension, as text."""
        san = _san(self.leaf)
        return [] if san is None else [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]

    @classmethod
    def parse(cls, spiffe_id: str, chain_der: bytes, key_der: bytes, hint: str = "") -> X509Svid:
        """Parse Workload API bytes into an SVID, checking structure (not trust or time).

        Raises InvalidSvid naming the SPIFFE ID and the first rule broken. Call
        :func:`X509Svid.verify` to check the chain and validity period.
        """
        try:
            sid = SpiffeId.parse(spiffe_id)
        except InvalidSpiffeId as exc:
            raise InvalidSvid(f"SVID has a bad spiffe_id: {exc}") from exc
        try:
            chain = split_der_certificates(chain_der)
        except ValueError as exc:
            raise InvalidSvid(f"SVID {sid}: chain: {exc}") from exc
        if not chain:
            raise InvalidSvid(f"SVID {sid}: chain is empty")
        try:
            key = serialization.load_der_private_key(key_der, password=None)
        except (ValueError, TypeError) as exc:
            raise InvalidSvid(f"SVID {sid}: private key does not parse as PKCS#8 DER") from exc
        svid = cls(sid, tuple(chain), key, hint)
        try:
            svid.check_structure()
        except (ValueError, TypeError) as exc:  # e.g. a malformed extension, parsed lazily
            raise InvalidSvid(f"SVID {sid}: certificate does not parse: {exc}") from exc
        return svid

    def check_structure(self) -> None:
        """Check the leaf and key against X509-SVID section 4; raise InvalidSvid if broken."""
        sid = self.spiffe_id
        leaf = self.leaf
        uris = _leaf_uris(leaf)
        if len(uris) != 1:
            raise InvalidSvid(f"SVID {sid}: leaf has {len(uris)} URI SANs, want exactly 1")
        if uris[0] != str(sid):
            raise InvalidSvid(f"SVID {sid}: leaf URI SAN is {uris[0]}, not the SVID's SPIFFE ID")
        if is_ca(leaf):
            raise InvalidSvid(f"SVID {sid}: leaf is a CA certificate (basicConstraints CA=true)")
        usage = _key_usage(leaf)
        if usage is not None:
            if not usage.digital_signature:
                raise InvalidSvid(f"SVID {sid}: leaf key usage lacks digitalSignature")
            if usage.key_cert_sign or usage.crl_sign:
                raise InvalidSvid(f"SVID {sid}: leaf key usage has keyCertSign or cRLSign")
        if not _same_public_key(self.private_key, leaf):
            raise InvalidSvid(f"SVID {sid}: private key does not match the leaf certificate")
        for position, cert in enumerate(self.chain[1:], start=1):
            if not is_ca(cert):
                raise InvalidSvid(f"SVID {sid}: chain certificate {position} is not a CA")

    def verify(self, bundle: X509Bundle | None, now: dt.datetime | None = None) -> None:
        """Check validity periods and that the chain leads to ``bundle``; raise InvalidSvid.

        Each certificate must be issued by the next one in the chain; the last
        must be issued by an authority of the SVID's own trust domain
        (X509-SVID section 5). Every certificate, authorities included, must be
        within its validity period at ``now``.
        """
        sid = self.spiffe_id
        now = now or utcnow()
        for position, cert in enumerate(self.chain):
            what = "leaf" if position == 0 else f"chain certificate {position}"
            if cert.not_valid_after_utc <= now:
                raise InvalidSvid(
                    f"SVID {sid}: {what} expired at {cert.not_valid_after_utc.isoformat()}"
                )
            if cert.not_valid_before_utc > now:
                raise InvalidSvid(
                    f"SVID {sid}: {what} is not valid before "
                    f"{cert.not_valid_before_utc.isoformat()}"
                )
        if bundle is None:
            raise InvalidSvid(f"SVID {sid}: no bundle for trust domain {sid.trust_domain}")
        if bundle.trust_domain != sid.trust_domain:
            raise InvalidSvid(f"SVID {sid}: bundle is for {bundle.trust_domain}, not its own")
        for position in range(len(self.chain) - 1):
            if not _issued_by(self.chain[position], self.chain[position + 1]):
                raise InvalidSvid(
                    f"SVID {sid}: chain out of order: certificate {position} "
                    f"is not issued by certificate {position + 1}"
                )
        last = self.chain[-1]
        for authority in bundle.authorities:
            if _issued_by(last, authority) or _same_cert(last, authority):
                if authority.not_valid_after_utc <= now:
                    raise InvalidSvid(
                        f"SVID {sid}: trust bundle authority expired at "
                        f"{authority.not_valid_after_utc.isoformat()}"
                    )
                return
        raise InvalidSvid(f"SVID {sid}: chain does not lead to the {sid.trust_domain} bundle")


@dataclass(frozen=True, slots=True)
class X509Context:
    """One complete Workload API X.509 state: the caller's SVIDs and every bundle it trusts.

    ``svids[0]`` is the default SVID (Workload API standard: the first one).
    ``bundles`` holds the own trust domain's bundle and federated ones.
    """

    svids: tuple[X509Svid, ...]
    bundles: BundleSet

    @property
    def default_svid(self) -> X509Svid | None:
        """The first SVID, or None when the caller has none."""
        return self.svids[0] if self.svids else None

    def find(self, *, spiffe_id: str | None = None, hint: str | None = None) -> X509Svid | None:
        """The first SVID with this SPIFFE ID and/or hint, or None."""
        for svid in self.svids:
            if spiffe_id is not None and str(svid.spiffe_id) != spiffe_id:
                continue
            if hint is not None and svid.hint != hint:
                continue
            return svid
        return None


class X509Source(Protocol):
    """Anything that can hand out the current X.509 context (a client, or fixed test material)."""

    def current(self) -> X509Context | None:
        """The latest validated context, or None before the first one arrives."""
        ...


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _leaf_uris(cert: x509.Certificate) -> list[str]:
    san = _san(cert)
    return [] if san is None else san.get_values_for_type(x509.UniformResourceIdentifier)


def is_ca(cert: x509.Certificate) -> bool:
    """Whether ``cert`` has basicConstraints CA=true.

    Raises ValueError for a malformed extension (cryptography parses them lazily).
    """
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _same_public_key(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        return False
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return key.public_key().public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt)


def _same_cert(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.public_bytes(serialization.Encoding.DER) == b.public_bytes(serialization.Encoding.DER)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
