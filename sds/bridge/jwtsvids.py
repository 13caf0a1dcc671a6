"""JWT-SVIDs for Envoy: fetched per audience on demand, refreshed before they expire.

Resource name scheme: ``jwt-svid:<audience>`` (everything after the first
colon is the audience, so URL audiences work). The secret is an SDS
``generic_secret`` whose value is ``Bearer <JWT-SVID>``, ready for Envoy's
credential injector (``envoy.http.injected_credentials.generic``) to place in
``Authorization`` on outbound requests. The JWT-SVID is for the default SVID's
SPIFFE ID.

A token is refreshed at half its lifetime (JWT-SVID standard s.3: short
lifetimes; Envoy must never inject an expired one). A failed refresh, whatever
the exception, is logged and retried with backoff; a timer at the token's
``exp`` withdraws it if no refresh succeeded by then, so an expired token is
never served.

State is bounded: at most ``max_audiences`` audiences are followed (a name
over the cap is refused with a log line), an audience longer than
:data:`MAX_AUDIENCE_BYTES` is refused, and an audience that no open stream has
named for ``idle_timeout`` seconds is dropped with its task. When the cap is
reached, an audience no stream names now makes room for a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable
from dataclasses import dataclass

from sds._util.log import event
from sds.errors import SdsError

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_AUDIENCES",
    "JWT_PREFIX",
    "MAX_AUDIENCE_BYTES",
    "JwtSvidManager",
    "JwtToken",
    "audience_of",
    "wanted_audiences",
]

log = logging.getLogger("sds.jwt")

JWT_PREFIX = "jwt-svid:"
#: Audiences followed at once, by default (``jwt_svids.max_audiences``).
DEFAULT_MAX_AUDIENCES = 64
#: Seconds an audience no stream names is kept, by default (``jwt_svids.idle_timeout``).
DEFAULT_IDLE_TIMEOUT = 600.0
#: Longest audience fetched (UTF-8 bytes); longer ones are refused.
MAX_AUDIENCE_BYTES = 1024
# At most one "refused" line per this many seconds; the rest are counted in the next one.
_REFUSAL_LOG_INTERVAL = 10.0


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
# Start a named long-running task; the caller's owner runs it (default: a task of its own).
Spawn = Callable[[str, Coroutine[object, object, None]], "asyncio.Task[None]"]


def _own_task(name: str, work: Coroutine[object, object, None]) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(work, name=name)


class JwtSvidManager:
    """One refresh task per audience that Envoy (or config) asked for, bounded and reaped.

    ``wanted()`` returns the audiences the open SDS streams name now; it drives
    reaping. ``on_change()`` is called after a token is added, replaced or
    withdrawn. ``spawn(name, coroutine)`` starts the refresh and reaper tasks, so
    the program's task owner can hold them; they are cancelled by :meth:`close`.
    """

    def __init__(
        self,
        fetch: Fetch,
        on_change: Callable[[], None],
        *,
        spiffe_id: Callable[[], str | None] = lambda: None,
        wanted: Callable[[], Collection[str]] = frozenset,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        max_audiences: int = DEFAULT_MAX_AUDIENCES,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        spawn: Spawn = _own_task,
    ) -> None:
        self._fetch = fetch
        self._spawn = spawn
        self._on_change = on_change
        self._spiffe_id = spiffe_id
        self._wanted = wanted
        self._retry = (retry_initial, retry_max)
        self.max_audiences = max_audiences
        self.idle_timeout = idle_timeout
        self._tokens: dict[str, JwtToken] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._last_wanted: dict[str, float] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._refused = 0
        self._refusal_logged_at = -_REFUSAL_LOG_INTERVAL

    def tokens(self) -> dict[str, JwtToken]:
        """Current unexpired tokens by audience."""
        now = time.time()
        return {aud: tok for aud, tok in self._tokens.items() if tok.expiry > now}

    def audiences(self) -> list[str]:
        """The audiences followed now (each with a refresh task)."""
        return sorted(self._tasks)

    def want(self, audiences: Iterable[str]) -> None:
        """Start fetching (and keep refreshing) ``audiences`` not tracked yet, within the caps."""
        now = time.monotonic()
        for audience in audiences:
            if audience in self._tasks:
                self._last_wanted[audience] = now
                continue
            size = len(audience.encode("utf-8", "surrogatepass"))
            if size > MAX_AUDIENCE_BYTES:
                self._refuse(
                    audience, f"audience is {size} bytes (the limit is {MAX_AUDIENCE_BYTES})"
                )
                continue
            if len(self._tasks) >= self.max_audiences and not self._make_room():
                self._refuse(
                    audience,
                    f"{len(self._tasks)} audiences are followed already "
                    f"(jwt_svids.max_audiences: {self.max_audiences})",
                )
                continue
            self._last_wanted[audience] = now
            self._tasks[audience] = self._spawn(f"jwt-{audience[:64]}", self._follow(audience))
        if self._tasks and self._reaper is None:
            self._reaper = self._spawn("jwt-reaper", self._reap_forever())

    def abort(self) -> None:
        """Cancel every refresh task and timer without waiting (their owner reaps them)."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        for timer in self._expiry.values():
            timer.cancel()
        self._expiry.clear()
        self._tokens.clear()

    async def close(self) -> None:
        """Stop every refresh task and timer."""
        tasks = list(self._tasks.values())
        if self._reaper is not None:
            tasks.append(self._reaper)
            self._reaper = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for timer in self._expiry.values():
            timer.cancel()
        self._expiry.clear()

    # -- bounds ---------------------------------------------------------------------------

    def _refuse(self, audience: str, reason: str) -> None:
        """Log a refused audience, at most one line per interval (the rest are counted)."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_at < _REFUSAL_LOG_INTERVAL:
            return
        event(
            log,
            logging.WARNING,
            "jwt.audience_refused",
            audience=audience[:64] + ("..." if len(audience) > 64 else ""),
            reason=reason,
            refused_since_last_line=self._refused,
        )
        self._refused = 0
        self._refusal_logged_at = now

    def _drop(self, audience: str, why: str) -> None:
        task = self._tasks.pop(audience, None)
        if task is not None:
            task.cancel()
        timer = self._expiry.pop(audience, None)
        if timer is not None:
            timer.cancel()
        self._last_wanted.pop(audience, None)
        had_token = self._tokens.pop(audience, None) is not None
        event(log, logging.INFO, "jwt.audience_dropped", audience=audience[:64], reason=why)
        if had_token:
            self._on_change()

    def _make_room(self) -> bool:
        """At the cap: drop the least recently named audience no open stream names now."""
        named = self._wanted()
        idle = [aud for aud in self._tasks if aud not in named]
        if not idle:
            return False
        oldest = min(idle, key=lambda aud: self._last_wanted.get(aud, 0.0))
        self._drop(oldest, "the cap was reached and no open stream names it")
        return True

    def reap(self) -> None:
        """Drop audiences that no open stream has named for ``idle_timeout`` seconds."""
        now = time.monotonic()
        named = self._wanted()
        for audience in list(self._tasks):
            if audience in named:
                self._last_wanted[audience] = now
            elif now - self._last_wanted.get(audience, now) >= self.idle_timeout:
                self._drop(audience, f"no open stream named it for {self.idle_timeout:g}s")

    async def _reap_forever(self) -> None:
        interval = min(max(self.idle_timeout / 4, 0.05), 60.0)
        while True:
            await asyncio.sleep(interval)
            try:
                self.reap()
            except Exception as exc:  # noqa: BLE001 - policy: log once per round, keep reaping
                event(log, logging.ERROR, "jwt.reap_failed", error=repr(exc))

    # -- one audience ---------------------------------------------------------------------

    def _expire(self, audience: str, token: JwtToken) -> None:
        """The expiry timer: withdraw ``token`` if it is still the one held."""
        self._expiry.pop(audience, None)
        if self._tokens.get(audience) is not token:
            return
        if token.expiry > time.time():  # woke early (monotonic vs wall clock): re-arm
            self._arm(audience, token, minimum=0.01)
            return
        del self._tokens[audience]
        event(
            log,
            logging.ERROR,
            "jwt.expired",
            audience=audience[:64],
            spiffe_id=token.spiffe_id,
            action="withdrawn: no refresh succeeded before exp",
        )
        self._on_change()

    def _arm(self, audience: str, token: JwtToken, minimum: float = 0.0) -> None:
        old = self._expiry.pop(audience, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        delay = max(minimum, token.expiry - time.time())
        self._expiry[audience] = loop.call_at(loop.time() + delay, self._expire, audience, token)

    async def _follow(self, audience: str) -> None:
        delay = self._retry[0]
        attempt = 0
        while True:
            try:
                token = await self._fetch(audience, self._spiffe_id())
                if token.expiry <= time.time():
                    raise SdsError(
                        f"the Workload API issued a token that expired at {int(token.expiry)}"
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - policy: any failure is logged and retried
                attempt += 1
                wait = delay * random.uniform(0.5, 1.0)
                event(
                    log,
                    logging.WARNING if isinstance(exc, SdsError) else logging.ERROR,
                    "jwt.fetch_failed",
                    audience=audience[:64],
                    error=str(exc) if isinstance(exc, SdsError) else repr(exc),
                    attempt=attempt,
                    retry_in=f"{wait:.3f}",
                )
                await asyncio.sleep(wait)
                delay = min(delay * 2, self._retry[1])
                continue
            delay = self._retry[0]
            attempt = 0
            self._tokens[audience] = token
            self._arm(audience, token)
            event(
                log,
                logging.INFO,
                "jwt.fetched",
                audience=audience[:64],
                spiffe_id=token.spiffe_id,
                expires=int(token.expiry),
            )
            self._on_change()
            lifetime = max(token.expiry - time.time(), 0.0)
            await asyncio.sleep(max(lifetime / 2, 1.0))


def wanted_audiences(names: Iterable[Collection[str] | None]) -> set[str]:
    """The audiences of the ``jwt-svid:`` names in ``names`` (one name set per open stream;
    None, a wildcard stream, names none)."""
    return {
        aud
        for stream in names
        if stream is not None
        for name in stream
        if (aud := audience_of(name)) is not None
    }
