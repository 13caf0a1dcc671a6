"""A local certificate authority that issues X.509-SVIDs and JWT-SVIDs for one trust domain.

The CA key is EC P-256. It is either kept in a state directory (directory
0700, key files 0600, reused on the next start) or held in memory only
(``ephemeral``). Leaf keys are generated per issuance and never written.
Issued SVIDs follow the X509-SVID standard, section 4: exactly one URI SAN,
``CA=false``, key usage ``digitalSignature`` (plus ``keyEncipherment`` is not
set: EC keys need none), a random 128-bit serial, and a short lifetime.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sds._util.peercred import open_private_dir, read_private_file, write_private_file
from sds.errors import ConfigError
from sds.spiffe.id import SpiffeId, TrustDomain
from sds.spiffe.jwt import JwtBundle, sign_jwt_svid
from sds.spiffe.x509 import X509Bundle, X509Svid, utcnow

__all__ = ["LocalCA"]

CA_LIFETIME = dt.timedelta(days=365)
# Backdate certificates slightly so peers with a little clock skew accept them.
BACKDATE = dt.timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class _Keys:
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    jwt_key: ec.EllipticCurvePrivateKey


class LocalCA:
    """Issues SVIDs for ``trust_domain`` from a self-signed root kept on disk or in memory."""

    def __init__(self, trust_domain: TrustDomain, keys: _Keys) -> None:
        self.trust_domain = trust_domain
        self._keys = keys
        self.jwt_kid = _kid(keys.jwt_key)

    @classmethod
    def ephemeral(cls, trust_domain: TrustDomain) -> LocalCA:
        """A CA whose keys exist only in this process's memory."""
        return cls(trust_domain, _new_keys(trust_domain))

    @classmethod
    def load_or_create(cls, trust_domain: TrustDomain, state_dir: Path) -> LocalCA:
        """Load the CA from ``state_dir``, creating it (0700 dir, 0600 keys) on first start.

        The directory must be ours and private (see
        :func:`sds._util.peercred.open_private_dir`); every file is opened relative
        to its fd without following symlinks, and new files are written
        exclusively, fsynced and renamed into place (``ca.key`` last, so a
        crash never leaves a half-written CA that looks complete). Raises
        ConfigError (UnsafePath for a directory or file others could reach)
        naming the file when the stored CA is unreadable, too open, or belongs
        to another trust domain.
        """
        where = str(state_dir)
        dir_fd = open_private_dir(where)
        try:
            return cls._load_or_create(trust_domain, dir_fd, where)
        finally:
            os.close(dir_fd)

    @classmethod
    def _load_or_create(cls, trust_domain: TrustDomain, dir_fd: int, where: str) -> LocalCA:
        key_pem = read_private_file(dir_fd, "ca.key", where=where)
        if key_pem is None:
            keys = _new_keys(trust_domain)
            write_private_file(dir_fd, "jwt.key", _private_pem(keys.jwt_key))
            write_private_file(
                dir_fd, "ca.crt", keys.ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644
            )
            write_private_file(dir_fd, "ca.key", _private_pem(keys.ca_key))
            return cls(trust_domain, keys)
        jwt_pem = read_private_file(dir_fd, "jwt.key", where=where)
        cert_pem = read_private_file(dir_fd, "ca.crt", where=where, secret=False)
        cert_path = f"{where}/ca.crt"
        try:
            if jwt_pem is None or cert_pem is None:
                missing = "jwt.key" if jwt_pem is None else "ca.crt"
                raise ValueError(f"{missing} is missing")
            ca_key = serialization.load_pem_private_key(key_pem, password=None)
            jwt_key = serialization.load_pem_private_key(jwt_pem, password=None)
            ca_cert = x509.load_pem_x509_certificate(cert_pem)
            uris = ca_cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.UniformResourceIdentifier)
        except (ValueError, TypeError, x509.ExtensionNotFound) as exc:
            raise ConfigError(f"{where}: stored CA does not load: {exc}") from exc
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not isinstance(
            jwt_key, ec.EllipticCurvePrivateKey
        ):
            raise ConfigError(f"{where}: stored CA keys must be EC keys")
        if uris != [trust_domain.id]:
            raise ConfigError(f"{cert_path}: CA is for {uris}, not {trust_domain.id}")
        if ca_cert.not_valid_after_utc <= utcnow():
            raise ConfigError(
                f"{cert_path}: CA expired at {ca_cert.not_valid_after_utc.isoformat()}; "
                "move the state directory away to create a new CA (peers must get the new bundle)"
            )
        return cls(trust_domain, _Keys(ca_key, ca_cert, jwt_key))

    @property
    def bundle(self) -> X509Bundle:
        """The trust domain's X.509 bundle: the CA certificate."""
        return X509Bundle(self.trust_domain, (self._keys.ca_cert,))

    @property
    def jwt_bundle(self) -> JwtBundle:
        """The trust domain's JWT bundle: the JWT signing key's public half."""
        return JwtBundle(self.trust_domain, {self.jwt_kid: self._keys.jwt_key.public_key()})

    def issue_x509_svid(
        self,
        spiffe_id: SpiffeId,
        ttl: dt.timedelta,
        *,
        hint: str = "",
        dns_sans: Sequence[str] = (),
        ip_sans: Sequence[str] = (),
        now: dt.datetime | None = None,
    ) -> X509Svid:
        """Issue a fresh X.509-SVID with a new in-memory P-256 key."""
        now = now or utcnow()
        key = ec.generate_private_key(ec.SECP256R1())
        ca = self._keys.ca_cert
        not_after = min(now + ttl, ca.not_valid_after_utc)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        sans += [x509.DNSName(name) for name in dns_sans]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_sans]
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]
        if dns_sans:
            subject.append(x509.NameAttribute(NameOID.COMMON_NAME, dns_sans[0]))
        cert = (
            _builder(x509.Name(subject), ca.subject, key, now, not_after, ca=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._keys.ca_key.public_key()),
                critical=False,
            )
            .sign(self._keys.ca_key, hashes.SHA256())
        )
        return X509Svid(spiffe_id, (cert,), key, hint)

    def issue_jwt_svid(
        self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: dt.timedelta
    ) -> str:
        """Issue an ES256 JWT-SVID for ``audience``."""
        return sign_jwt_svid(
            self._keys.jwt_key, self.jwt_kid, spiffe_id, audience, int(ttl.total_seconds())
        )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    not_after: dt.datetime,
    *,
    ca: bool,
) -> x509.CertificateBuilder:
    """What every certificate we issue shares: names, key, random serial, validity from
    ``now - BACKDATE``, critical basic constraints and key usage (a CA signs certificates
    and CRLs; a leaf signs handshakes), and the subject key identifier."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _new_keys(trust_domain: TrustDomain) -> _Keys:
    now = utcnow()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} local CA"),
        ]
    )
    cert = (
        _builder(name, name, key, now, now + CA_LIFETIME, ca=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain.id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return _Keys(key, cert, ec.generate_private_key(ec.SECP256R1()))


def _kid(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:32]


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
