"""JWT-SVIDs for Envoy: fetched per audience on demand, refreshed before they expire.

Resource name scheme: ``jwt-svid:<audience>`` (everything after the first
colon is the audience, so URL audiences work). The secret is an SDS
``generic_secret`` whose value is ``Bearer <JWT-SVID>``, ready for Envoy's
credential injector (``envoy.http.injected_credentials.generic``) to place in
``Authorization`` on outbound requests. The JWT-SVID is for the default SVID's
SPIFFE ID.

A token is refreshed at half its lifetime (JWT-SVID standard s.3: short
lifetimes; Envoy must never inject an expired one). A failed refresh is
retried with backoff; a token that expires before a refresh succeeds is
withdrawn and said loudly in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .._log import event
from ..errors import SdsError

__all__ = ["JWT_PREFIX", "JwtSvidManager", "JwtToken", "audience_of"]

log = logging.getLogger("sds.jwt")

JWT_PREFIX = "jwt-svid:"


def audience_of(name: str) -> str | None:
    """The audience a resource name asks for, or None if it is not a JWT-SVID name."""
    if name.startswith(JWT_PREFIX) and len(name) > len(JWT_PREFIX):
        return name[len(JWT_PREFIX) :]
    return None


@dataclass(frozen=True, slots=True)
class JwtToken:
    """A fetched JWT-SVID: token, subject and expiry (Unix seconds)."""

    token: str
    spiffe_id: str
    expiry: float


# Fetch a token for (audience, spiffe_id or None).
Fetch = Callable[[str, str | None], Awaitable[JwtToken]]


class JwtSvidManager:
    """One refresh task per audience that Envoy (or config) asked for."""

    def __init__(
        self,
        fetch: Fetch,
        on_change: Callable[[], None],
        *,
        spiffe_id: Callable[[], str | None] = lambda: None,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        self._fetch = fetch
        self._on_change = on_change
        self._spiffe_id = spiffe_id
        self._retry = (retry_initial, retry_max)
        self._tokens: dict[str, JwtToken] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def tokens(self) -> dict[str, JwtToken]:
        """Current unexpired tokens by audience."""
        now = time.time()
        return {aud: tok for aud, tok in self._tokens.items() if tok.expiry > now}

    def want(self, audiences: Sequence[str]) -> None:
        """Start fetching (and keep refreshing) ``audiences`` not tracked yet."""
        for audience in audiences:
            if audience not in self._tasks:
                self._tasks[audience] = asyncio.get_running_loop().create_task(
                    self._follow(audience), name=f"jwt-{audience}"
                )

    async def close(self) -> None:
        """Stop every refresh task."""
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _follow(self, audience: str) -> None:
        delay = self._retry[0]
        while True:
            try:
                token = await self._fetch(audience, self._spiffe_id())
            except SdsError as exc:
                held = self._tokens.get(audience)
                if held is not None and held.expiry <= time.time():
                    del self._tokens[audience]
                    event(log, logging.ERROR, "jwt.expired", audience=audience, error=str(exc))
                    self._on_change()
                event(log, logging.WARNING, "jwt.fetch_failed", audience=audience, error=str(exc))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self._retry[1])
                continue
            delay = self._retry[0]
            self._tokens[audience] = token
            event(
                log,
                logging.INFO,
                "jwt.fetched",
                audience=audience,
                spiffe_id=token.spiffe_id,
                expires=int(token.expiry),
            )
            self._on_change()
            lifetime = max(token.expiry - time.time(), 0.0)
            await asyncio.sleep(max(lifetime / 2, 1.0))
