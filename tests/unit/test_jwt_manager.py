"""JWT-SVID lifetimes and bounds in the bridge (issue 9 item 7, issue 7 hole 7): a token is
withdrawn at its exp, every failure is retried, audiences are capped, length-checked and
reaped once no stream names them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sds.bridge.config import BridgeConfig
from sds.bridge.jwtsvids import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_AUDIENCES,
    MAX_AUDIENCE_BYTES,
    JwtSvidManager,
    JwtToken,
    wanted_audiences,
)
from sds.bridge.state import Bridge
from sds.errors import WorkloadApiUnavailable
from tests.conftest import event_lines
from tests.harness.fake_workload_api import eventually


@pytest.fixture(autouse=True)
def _capture(sds_debug_logs: None) -> None:
    """Every test here reads ``sds`` logs through caplog."""


def lines(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return event_lines(caplog, "sds.jwt", name)


class Upstream:
    """A scripted fetcher: each call pops the next outcome (a lifetime, an exception, or
    'hang'); once the script is empty, tokens live ``ttl`` seconds."""

    def __init__(self, *script: Any, ttl: float = 300.0) -> None:
        self.script = list(script)
        self.ttl = ttl
        self.calls: list[str] = []

    async def __call__(self, audience: str, spiffe_id: str | None) -> JwtToken:
        self.calls.append(audience)
        outcome = self.script.pop(0) if self.script else self.ttl
        if outcome == "hang":
            await asyncio.sleep(3600)
        if isinstance(outcome, BaseException):
            raise outcome
        n = len(self.calls)
        return JwtToken(f"tok-{audience}-{n}", "spiffe://example.org/web", time.time() + outcome)


@pytest.fixture
async def cleanup() -> AsyncIterator[list[JwtSvidManager]]:
    managers: list[JwtSvidManager] = []
    yield managers
    for manager in managers:
        await manager.close()


def jwt_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("jwt-") and not t.done()]


def test_defaults_are_stated() -> None:
    assert (DEFAULT_MAX_AUDIENCES, DEFAULT_IDLE_TIMEOUT, MAX_AUDIENCE_BYTES) == (64, 600.0, 1024)


@pytest.mark.chaos
async def test_a_token_is_withdrawn_at_exp_while_the_upstream_hangs(
    caplog: pytest.LogCaptureFixture, cleanup: list[JwtSvidManager]
) -> None:
    # The first token lives 0.4 s; its refresh (at the 1 s floor) hangs forever.
    bridge = Bridge(BridgeConfig(source="test"), [])
    upstream = Upstream(0.4, "hang")
    bridge.jwt = manager = JwtSvidManager(upstream, bridge.refresh)
    cleanup.append(manager)
    manager.want(["aud"])
    await eventually(lambda: bridge.cache.spec("jwt-svid:aud") is not None, what="token served")
    # Withdrawn from what Envoy is served at exp, not at the next (hanging) refresh.
    await eventually(lambda: bridge.cache.spec("jwt-svid:aud") is None, 5, "token withdrawn")
    assert len(upstream.calls) <= 2
    [line] = lines(caplog, "jwt.expired")
    assert "audience=aud" in line
    assert 'action="withdrawn: no refresh succeeded before exp"' in line


@pytest.mark.chaos
async def test_any_fetch_failure_is_logged_and_retried(
    caplog: pytest.LogCaptureFixture, cleanup: list[JwtSvidManager]
) -> None:
    upstream = Upstream(
        RuntimeError("boom"), WorkloadApiUnavailable("workload API at x is unavailable: gone")
    )
    changes: list[int] = []
    manager = JwtSvidManager(
        upstream, lambda: changes.append(1), retry_initial=0.01, retry_max=0.02
    )
    cleanup.append(manager)
    manager.want(["aud"])
    await eventually(lambda: "aud" in manager.tokens(), what="token after two failures")
    assert upstream.calls == ["aud", "aud", "aud"]
    failed = lines(caplog, "jwt.fetch_failed")
    assert len(failed) == 2
    assert "error=RuntimeError('boom')" in failed[0] and "attempt=1" in failed[0]
    assert 'error="workload API at x is unavailable: gone"' in failed[1]
    assert "attempt=2" in failed[1]


async def test_an_already_expired_token_is_not_served(
    caplog: pytest.LogCaptureFixture, cleanup: list[JwtSvidManager]
) -> None:
    upstream = Upstream(-5.0)
    manager = JwtSvidManager(upstream, lambda: None, retry_initial=0.01, retry_max=0.02)
    cleanup.append(manager)
    manager.want(["aud"])
    await eventually(lambda: len(upstream.calls) >= 2, what="a retry")
    assert "the Workload API issued a token that expired at" in lines(caplog, "jwt.fetch_failed")[0]
    await eventually(lambda: "aud" in manager.tokens(), what="the good token")


@pytest.mark.hostile
async def test_300_audiences_on_one_stream_are_capped_then_released_when_it_closes(
    caplog: pytest.LogCaptureFixture, cleanup: list[JwtSvidManager]
) -> None:
    stream_names: list[frozenset[str] | None] = [frozenset(f"jwt-svid:aud-{i}" for i in range(300))]
    upstream = Upstream()
    manager = JwtSvidManager(
        upstream,
        lambda: None,
        wanted=lambda: wanted_audiences(stream_names),
        idle_timeout=0.3,
    )
    cleanup.append(manager)
    manager.want(sorted(wanted_audiences(stream_names)))
    assert len(manager.audiences()) == 64
    await eventually(lambda: len(upstream.calls) == 64, what="64 fetches")
    # One line for the burst of refusals (rate-limited), counting them.
    [refused] = lines(caplog, "jwt.audience_refused")
    assert 'reason="64 audiences are followed already (jwt_svids.max_audiences: 64)"' in refused
    assert "refused_since_last_line=1" in refused
    manager.want(sorted(wanted_audiences(stream_names)))  # Envoy asks again: still refused
    assert len(manager.audiences()) == 64
    assert len(lines(caplog, "jwt.audience_refused")) == 1
    # While the stream is open, nothing is reaped.
    await asyncio.sleep(0.5)
    assert len(manager.audiences()) == 64
    stream_names.clear()  # the stream closed
    await eventually(lambda: not manager.audiences(), 10, "audiences reaped")
    assert not manager.tokens()
    assert [t for t in jwt_tasks() if t.get_name() != "jwt-reaper"] == []
    assert len(lines(caplog, "jwt.audience_dropped")) == 64


@pytest.mark.hostile
async def test_at_the_cap_an_audience_no_stream_names_makes_room(
    cleanup: list[JwtSvidManager],
) -> None:
    named = {"a", "b"}
    changes: list[int] = []
    manager = JwtSvidManager(
        Upstream(), lambda: changes.append(1), wanted=lambda: named, max_audiences=2
    )
    cleanup.append(manager)
    manager.want(["a", "b"])
    await eventually(lambda: len(manager.tokens()) == 2, what="two tokens")
    manager.want(["c"])  # both still named: refused
    assert manager.audiences() == ["a", "b"]
    named.discard("a")
    named.add("c")
    manager.want(["c"])
    assert manager.audiences() == ["b", "c"]
    await eventually(lambda: sorted(manager.tokens()) == ["b", "c"], what="c replaces a")


@pytest.mark.hostile
async def test_an_audience_over_1_kib_is_refused(
    caplog: pytest.LogCaptureFixture, cleanup: list[JwtSvidManager]
) -> None:
    manager = JwtSvidManager(Upstream(), lambda: None)
    cleanup.append(manager)
    manager.want(["x" * 1024, "é" * 513])
    assert manager.audiences() == ["x" * 1024]
    [refused] = lines(caplog, "jwt.audience_refused")
    assert 'reason="audience is 1026 bytes (the limit is 1024)"' in refused
    assert "audience=" + "é" * 64 + "..." in refused


def test_wanted_audiences_ignores_wildcards_and_other_names() -> None:
    streams = [None, frozenset({"default", "jwt-svid:a", "jwt-svid:"}), frozenset({"jwt-svid:b"})]
    assert wanted_audiences(streams) == {"a", "b"}
