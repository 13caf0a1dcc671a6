"""JWT-SVIDs and JWT bundles (JWKS), signed and checked with ``cryptography`` alone.

JWT-SVID standard: section 2 (JOSE header: ``alg`` one of the listed
algorithms, ``kid`` required, ``typ`` ``JWT`` or ``JOSE`` when present),
section 3 (claims: ``sub`` is the SPIFFE ID, ``aud`` required, ``exp``
required) and section 4 (validation). SPIFFE Trust Domain and Bundle
standard, section 4: a bundle is a JWKS whose keys carry ``use`` of
``jwt-svid`` or ``x509-svid``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from sds.errors import InvalidBundle, InvalidJwt, InvalidSpiffeId
from sds.spiffe.id import SpiffeId, TrustDomain

__all__ = [
    "JwtBundle",
    "JwtSvidClaims",
    "PublicKey",
    "b64url_decode",
    "b64url_encode",
    "sign_jwt_svid",
    "validate_jwt_svid",
]

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

_EC_ALGS: dict[str, tuple[ec.EllipticCurve, type[hashes.HashAlgorithm], int]] = {
    "ES256": (ec.SECP256R1(), hashes.SHA256, 32),
    "ES384": (ec.SECP384R1(), hashes.SHA384, 48),
    "ES512": (ec.SECP521R1(), hashes.SHA512, 66),
}
_RSA_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "RS256": hashes.SHA256,
    "RS384": hashes.SHA384,
    "RS512": hashes.SHA512,
    "PS256": hashes.SHA256,
    "PS384": hashes.SHA384,
    "PS512": hashes.SHA512,
}
_CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515, section 2), as JWS and JWK fields are written."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; ``binascii.Error`` (a ValueError) if invalid."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class JwtBundle:
    """The JWT authorities of one trust domain: key id -> public key."""

    trust_domain: TrustDomain
    keys: Mapping[str, PublicKey]

    @classmethod
    def from_jwks(cls, trust_domain: TrustDomain, data: bytes) -> JwtBundle:
        """Parse a JWKS document; keys with ``use: x509-svid`` are skipped.

        Raises InvalidBundle naming the trust domain and the first bad key.
        """
        where = f"JWT bundle for {trust_domain.id}"
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidBundle(f"{where}: not JSON: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise InvalidBundle(f"{where}: no 'keys' list")
        keys: dict[str, PublicKey] = {}
        for index, jwk in enumerate(doc["keys"]):
            if not isinstance(jwk, dict):
                raise InvalidBundle(f"{where}: keys[{index}] is not an object")
            if jwk.get("use", "jwt-svid") != "jwt-svid":
                continue
            kid = jwk.get("kid")
            if not isinstance(kid, str) or not kid:
                raise InvalidBundle(f"{where}: keys[{index}] has no 'kid'")
            try:
                keys[kid] = _jwk_public_key(jwk)
            except (KeyError, ValueError, TypeError) as exc:
                raise InvalidBundle(f"{where}: keys[{index}] ({kid}): {exc}") from exc
        return cls(trust_domain, keys)

    def to_jwks(self) -> bytes:
        """Serialize as a SPIFFE bundle JWKS (keys with ``use: jwt-svid``), sorted by kid."""
        keys = [
            dict(_public_jwk(key), kid=kid, use="jwt-svid")
            for kid, key in sorted(self.keys.items())
        ]
        return json.dumps({"keys": keys}, sort_keys=True, separators=(",", ":")).encode()


def _jwk_public_key(jwk: Mapping[str, Any]) -> PublicKey:
    kty = jwk.get("kty")
    if kty == "EC":
        curve = _CURVES.get(str(jwk.get("crv")))
        if curve is None:
            raise ValueError(f"unsupported curve {jwk.get('crv')!r}")
        x = int.from_bytes(b64url_decode(jwk["x"]), "big")
        y = int.from_bytes(b64url_decode(jwk["y"]), "big")
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    if kty == "RSA":
        n = int.from_bytes(b64url_decode(jwk["n"]), "big")
        e = int.from_bytes(b64url_decode(jwk["e"]), "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    raise ValueError(f"unsupported key type {kty!r}")


def _public_jwk(key: PublicKey) -> dict[str, str]:
    if isinstance(key, ec.EllipticCurvePublicKey):
        numbers = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        crv = {v.name: k for k, v in _CURVES.items()}[key.curve.name]
        return {
            "kty": "EC",
            "crv": crv,
            "x": b64url_encode(numbers.x.to_bytes(size, "big")),
            "y": b64url_encode(numbers.y.to_bytes(size, "big")),
        }
    rsa_numbers = key.public_numbers()
    return {
        "kty": "RSA",
        "n": b64url_encode(rsa_numbers.n.to_bytes((rsa_numbers.n.bit_length() + 7) // 8, "big")),
        "e": b64url_encode(rsa_numbers.e.to_bytes((rsa_numbers.e.bit_length() + 7) // 8, "big")),
    }


def sign_jwt_svid(
    key: ec.EllipticCurvePrivateKey,
    kid: str,
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    ttl_seconds: int,
    *,
    now: float | None = None,
) -> str:
    """Return a compact ES256 JWT-SVID for ``spiffe_id`` and ``audience`` (JWT-SVID s. 2-3)."""
    if not audience:
        raise InvalidJwt("JWT-SVID needs at least one audience")
    issued = int(now if now is not None else time.time())
    header = {"alg": "ES256", "kid": kid, "typ": "JWT"}
    claims: dict[str, Any] = {
        "sub": str(spiffe_id),
        "aud": list(audience),
        "iat": issued,
        "exp": issued + ttl_seconds,
    }
    signing_input = (
        b64url_encode(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    )
    der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return signing_input + "." + b64url_encode(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


@dataclass(frozen=True, slots=True)
class JwtSvidClaims:
    """A validated JWT-SVID: its subject and all its claims."""

    spiffe_id: SpiffeId
    claims: Mapping[str, Any]
    expiry: int


def validate_jwt_svid(
    token: str,
    audience: str,
    bundles: Mapping[TrustDomain, JwtBundle],
    now: float | None = None,
) -> JwtSvidClaims:
    """Validate a JWT-SVID per JWT-SVID section 4; raise InvalidJwt naming what failed.

    Checks, in order: three parts, header (``alg`` supported, ``kid`` present),
    ``sub`` is a SPIFFE ID whose trust domain has a bundle holding ``kid``,
    the signature, ``exp`` in the future, and ``audience`` in ``aud``.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidJwt("token is not a compact JWS (want header.payload.signature)")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
        signature = b64url_decode(parts[2])
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJwt("token header or payload is not base64url JSON") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidJwt("token header or payload is not a JSON object")
    alg = header.get("alg")
    if alg not in _EC_ALGS and alg not in _RSA_HASHES:
        raise InvalidJwt(f"unsupported signing algorithm {alg!r}")
    if header.get("typ", "JWT") not in ("JWT", "JOSE"):
        raise InvalidJwt(f"unsupported token type {header.get('typ')!r}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidJwt("token header has no 'kid'")
    try:
        subject = SpiffeId.parse(claims.get("sub", ""))
    except InvalidSpiffeId as exc:
        raise InvalidJwt(f"token subject is not a SPIFFE ID: {exc}") from exc
    bundle = bundles.get(subject.trust_domain)
    if bundle is None:
        raise InvalidJwt(f"no JWT bundle for trust domain {subject.trust_domain}")
    key = bundle.keys.get(kid)
    if key is None:
        raise InvalidJwt(f"no key {kid!r} in the JWT bundle for {subject.trust_domain}")
    signing_input = (parts[0] + "." + parts[1]).encode()
    if not _signature_ok(str(alg), key, signing_input, signature):
        raise InvalidJwt("token signature is invalid")
    exp = claims.get("exp")
    if not isinstance(exp, int | float):
        raise InvalidJwt("token has no 'exp' claim")
    current = now if now is not None else time.time()
    if exp <= current:
        raise InvalidJwt(f"token expired at {int(exp)}")
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if audience not in auds:
        raise InvalidJwt(f"token audience {auds} does not include {audience!r}")
    return JwtSvidClaims(subject, claims, int(exp))


def _signature_ok(alg: str, key: PublicKey, data: bytes, signature: bytes) -> bool:
    try:
        if alg in _EC_ALGS:
            curve, digest, size = _EC_ALGS[alg]
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve.name:
                return False
            if len(signature) != 2 * size:
                return False
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(digest()))
            return True
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        digest_cls = _RSA_HASHES[alg]
        pad: padding.AsymmetricPadding
        if alg.startswith("PS"):
            pad = padding.PSS(mgf=padding.MGF1(digest_cls()), salt_length=padding.PSS.DIGEST_LENGTH)
        else:
            pad = padding.PKCS1v15()
        key.verify(signature, data, pad, digest_cls())
        return True
    except InvalidSignature:
        return False
