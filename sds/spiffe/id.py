"""SPIFFE IDs and trust domains, parsed strictly per the SPIFFE-ID standard.

Rules (SPIFFE-ID standard, section 2): scheme ``spiffe`` in lower case; a
trust domain of lower-case letters, digits, ``.``, ``-`` and ``_`` (no port,
no user info, at most 255 characters); a path of ``/``-separated segments of
letters, digits, ``.``, ``-`` and ``_``, none empty, ``.`` or ``..``, no
trailing ``/``; no query or fragment. The X509-SVID standard caps a SPIFFE ID
at 2048 bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sds.errors import InvalidSpiffeId

__all__ = ["SpiffeId", "TrustDomain"]

_SCHEME = "spiffe://"
_TD_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_MAX_TD = 255
_MAX_ID = 2048


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """A validated trust domain name such as ``example.org`` (no scheme)."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.name, self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accept ``example.org`` or ``spiffe://example.org``; raise InvalidSpiffeId otherwise."""
        if text.startswith(_SCHEME):
            spiffe_id = SpiffeId.parse(text)
            if spiffe_id.path:
                raise InvalidSpiffeId(f"trust domain {text!r} must not have a path")
            return spiffe_id.trust_domain
        return cls(text)

    @property
    def id(self) -> str:
        """The trust domain's SPIFFE ID form, ``spiffe://<name>``, used as a bundle map key."""
        return _SCHEME + self.name

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A validated SPIFFE ID: a trust domain plus a path (``""`` or ``/a/b``)."""

    trust_domain: TrustDomain
    path: str

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://td/path``; raise InvalidSpiffeId naming the rule that failed."""
        if not isinstance(text, str) or not text:
            raise InvalidSpiffeId("SPIFFE ID is empty")
        if len(text.encode()) > _MAX_ID:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {_MAX_ID} bytes")
        if not text.startswith(_SCHEME):
            raise InvalidSpiffeId(f"SPIFFE ID {text!r} must start with {_SCHEME!r}")
        rest = text[len(_SCHEME) :]
        if "?" in rest or "#" in rest:
            raise InvalidSpiffeId(f"SPIFFE ID {text!r} must not have a query or fragment")
        td, slash, path = rest.partition("/")
        _check_trust_domain(td, text)
        if slash:
            path = "/" + path
            _check_path(path, text)
        return cls(TrustDomain(td), path)

    @classmethod
    def from_path(cls, trust_domain: TrustDomain, path: str) -> SpiffeId:
        """Build ``spiffe://<trust_domain><path>``; ``path`` must start with ``/``."""
        if not path.startswith("/"):
            raise InvalidSpiffeId(f"SPIFFE ID path {path!r} must start with '/'")
        _check_path(path, path)
        return cls(trust_domain, path)

    def __str__(self) -> str:
        return _SCHEME + self.trust_domain.name + self.path


def _check_trust_domain(td: str, whole: str) -> None:
    if not td:
        raise InvalidSpiffeId(f"SPIFFE ID {whole!r} has an empty trust domain")
    if len(td) > _MAX_TD:
        raise InvalidSpiffeId(f"trust domain of {whole!r} is longer than {_MAX_TD} characters")
    if not _TD_RE.fullmatch(td):
        raise InvalidSpiffeId(
            f"trust domain {td!r} may contain only lower-case letters, digits, '.', '-' and '_'"
        )


def _check_path(path: str, whole: str) -> None:
    if path == "/" or path.endswith("/"):
        raise InvalidSpiffeId(f"SPIFFE ID {whole!r} must not end with '/'")
    for segment in path[1:].split("/"):
        if not segment:
            raise InvalidSpiffeId(f"SPIFFE ID {whole!r} has an empty path segment")
        if segment in (".", ".."):
            raise InvalidSpiffeId(f"SPIFFE ID {whole!r} has a '.' or '..' path segment")
        if not _SEGMENT_RE.fullmatch(segment):
            raise InvalidSpiffeId(
                f"SPIFFE ID {whole!r}: path segment {segment!r} may contain only "
                "letters, digits, '.', '-' and '_'"
            )
