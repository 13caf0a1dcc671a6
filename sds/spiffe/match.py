"""SPIFFE-ID allow entries: an exact ID, or every ID below a path (``spiffe://td/path/*``).

The one parser of the allow syntax shared by the bridge's policies (``allow``)
and the bootstrap generator (``--allow``, ``--expect``). A pattern becomes an
Envoy ``StringMatcher`` on the URI SAN: ``exact`` for an ID, ``prefix``
``spiffe://td/path/`` for ``spiffe://td/path/*`` (so ``/path`` itself and
``/pathology`` do not match).
"""

from __future__ import annotations

from dataclasses import dataclass

from sds.errors import InvalidSpiffeId
from sds.spiffe.id import SpiffeId

__all__ = ["WILDCARD_RULE", "IdPattern"]

#: The message of the InvalidSpiffeId raised for a ``*`` anywhere but a final ``/*``.
WILDCARD_RULE = "'*' is allowed only as a final '/*'"


@dataclass(frozen=True, slots=True)
class IdPattern:
    """An exact SPIFFE ID (``prefix`` False) or an ID prefix ending in ``/`` (``prefix`` True)."""

    value: str
    prefix: bool = False

    @classmethod
    def parse(cls, text: str) -> IdPattern:
        """Parse ``spiffe://td/path`` or ``spiffe://td/path/*``; the ID part is normalized.

        Raises InvalidSpiffeId: the SPIFFE ID's own error, or :data:`WILDCARD_RULE`.
        """
        prefix = text.endswith("/*")
        base = text[:-2] if prefix else text
        if "*" in base:
            raise InvalidSpiffeId(WILDCARD_RULE)
        spiffe_id = str(SpiffeId.parse(base))
        return cls(spiffe_id + "/", True) if prefix else cls(spiffe_id)

    def matches(self, spiffe_id: str) -> bool:
        """Whether ``spiffe_id`` (normalized, as :class:`SpiffeId` prints it) is this ID or,
        for a prefix, strictly below it."""
        if self.prefix:
            return spiffe_id.startswith(self.value)
        return spiffe_id == self.value

    def __str__(self) -> str:
        """The allow syntax: the ID, or the prefix followed by ``*``."""
        return self.value + "*" if self.prefix else self.value
