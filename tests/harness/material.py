"""Forge X.509-SVIDs for tests, good ones and ones that break one X509-SVID rule each.

Everything is built with ``cryptography`` directly (not with sds.provider.ca), so the
checks under test are exercised against independently made certificates.
Bad SVIDs are returned as X509Svid objects built without validation; a fake
Workload API serves their bytes as-is.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.x509 import X509Bundle, X509Svid, utcnow

__all__ = ["Authority", "rejection"]

SKEW = dt.timedelta(seconds=30)


def _key_usage(*, leaf: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=leaf,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not leaf,
        crl_sign=not leaf,
        encipher_only=False,
        decipher_only=False,
    )


class Authority:
    """A self-signed CA for one trust domain that signs test SVIDs."""

    def __init__(self, trust_domain: str = "example.org") -> None:
        self.trust_domain = TrustDomain(trust_domain)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test CA {trust_domain}")])
        now = utcnow()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(leaf=False), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(self.trust_domain.id)]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def bundle(self) -> X509Bundle:
        """This trust domain's bundle: the CA certificate."""
        return X509Bundle(self.trust_domain, (self.cert,))

    def spiffe_id(self, path: str) -> SpiffeId:
        """``spiffe://<td><path>``."""
        return SpiffeId.from_path(self.trust_domain, path)

    def svid(
        self,
        path: str,
        *,
        hint: str = "",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        ttl: dt.timedelta = dt.timedelta(hours=1),
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        extra_uris: Sequence[str] = (),
        ca: bool = False,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> X509Svid:
        """Issue an SVID for ``path``; the keyword arguments forge the broken variants.

        ``key`` replaces the private key handed out (the leaf still certifies
        its own, fresh key), which makes a key-mismatch SVID.
        """
        sid = self.spiffe_id(path)
        now = utcnow()
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        not_before = not_before or now - SKEW
        not_after = not_after or now + ttl
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(sid))]
        sans += [x509.UniformResourceIdentifier(uri) for uri in extra_uris]
        sans += [x509.DNSName(name) for name in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
            .issuer_name(self.cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(_key_usage(leaf=not ca), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return X509Svid(sid, (cert,), key or leaf_key, hint)

    # Broken variants, one X509-SVID rule each ------------------------------------

    def key_mismatch(self, path: str, hint: str = "") -> X509Svid:
        """The private key does not belong to the leaf."""
        return self.svid(path, hint=hint, key=ec.generate_private_key(ec.SECP256R1()))

    def expired(self, path: str, hint: str = "") -> X509Svid:
        """The leaf expired an hour ago."""
        now = utcnow()
        return self.svid(
            path,
            hint=hint,
            not_before=now - dt.timedelta(hours=2),
            not_after=(now - dt.timedelta(hours=1)).replace(microsecond=0),
        )

    def two_uris(self, path: str, hint: str = "") -> X509Svid:
        """The leaf has a second URI SAN (an X.509-SVID has exactly one)."""
        return self.svid(path, hint=hint, extra_uris=[f"{self.trust_domain.id}/other"])

    def ca_leaf(self, path: str, hint: str = "") -> X509Svid:
        """The leaf is a CA certificate (an X.509-SVID leaf must have CA=false)."""
        return self.svid(path, hint=hint, ca=True)

    def short_lived(self, path: str, seconds: float, hint: str = "") -> X509Svid:
        """A valid SVID that expires ``seconds`` from now."""
        return self.svid(path, hint=hint, not_after=utcnow() + dt.timedelta(seconds=seconds))


def rejection(svid: X509Svid, kind: str) -> str:
    """The exact InvalidSvid message sds gives for a forged SVID of ``kind``."""
    sid = svid.spiffe_id
    if kind == "key_mismatch":
        return f"SVID {sid}: private key does not match the leaf certificate"
    if kind == "expired":
        return f"SVID {sid}: leaf expired at {svid.leaf.not_valid_after_utc.isoformat()}"
    if kind == "two_uris":
        return f"SVID {sid}: leaf has 2 URI SANs, want exactly 1"
    if kind == "ca_leaf":
        return f"SVID {sid}: leaf is a CA certificate (basicConstraints CA=true)"
    raise ValueError(kind)
