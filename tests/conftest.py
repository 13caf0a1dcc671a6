"""Shared test fixtures: short socket directories, managed subprocesses, log capture; tiers.

Every test lives in a tier directory (``unit``, ``integration``, ``e2e``,
``deploy``) and gets that tier's marker here; ``tests/harness`` holds what the
tests share with each other and with ``bench/``. Fixtures that tests of more
than one tier use live here (the stacks, the session's SPIRE, the Go peers);
a test module never imports another (``tests/unit/test_test_layout.py``).
Slow tools the selected tests need are built after collection (``PREBUILDS``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import gobuild
from tests.harness import gopeers as _gopeers
from tests.harness.envoy import echo_app, envoy_version, envoys
from tests.harness.logs import captured_log
from tests.harness.procs import PYTHON, Processes, wait_for
from tests.harness.spire import Spire, SpireDelegated
from tests.harness.stack import Stack

# Fixtures (the Envoy ones) and the helpers test modules import from here.
__all__ = [
    "PYTHON",
    "Processes",
    "captured_log",
    "echo_app",
    "envoy_version",
    "envoys",
    "wait_for",
]


REPO = Path(__file__).resolve().parent.parent


def run_sds(
    *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sds ARGS`` to completion; its exit status and text output, never raising."""
    return subprocess.run(
        [sys.executable, "-m", "sds", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def sds_debug_logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``sds.*`` record, DEBUG and up, reaches caplog (even once a CLI test set up logs)."""
    monkeypatch.setattr(logging.getLogger("sds"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="sds")


def event_lines(caplog: pytest.LogCaptureFixture, logger: str, name: str) -> list[str]:
    """The messages of ``logger``'s ``name`` events (``name key=value ...``), in order."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == logger and r.getMessage().startswith(name + " ")
    ]


@pytest.fixture
def restore_sds_logging() -> Iterator[None]:
    """The ``sds`` logger's handlers, level and propagation as they were, after the test."""
    root = logging.getLogger("sds")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved


@pytest.fixture
def sds_logs_reach_caplog() -> Iterator[None]:
    """cli.main() elsewhere in the session stops ``sds`` logs propagating; undo that here."""
    root = logging.getLogger("sds")
    saved = (root.handlers[:], root.level, root.propagate)
    root.handlers[:], root.propagate = [], True
    yield
    root.handlers[:], root.level, root.propagate = saved


@contextlib.contextmanager
def short_tmp(prefix: str, mode: int) -> Iterator[Path]:
    """A new directory under /tmp (short, for sun_path's 107 bytes) with ``mode``; removed after."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, mode)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory for Unix sockets (sun_path is limited to 107 bytes)."""
    with short_tmp("sds-", 0o755) as path:
        yield path


@pytest.fixture
def stack(procs: Processes, tmp_path: Path, sockdir: Path) -> Stack:
    """Provider and bridge in ``sockdir``, not started (a module may define its own ``stack``)."""
    del tmp_path
    return Stack(procs, sockdir)


@pytest.fixture
def gopeers_stack(procs: Processes, sockdir: Path) -> Iterator[Stack]:
    """A :class:`Stack` whose provider issues the Go-peer identities (``default`` = web)."""
    stack = Stack(procs, sockdir)
    stack.identities.write_text(_gopeers.IDENTITIES)
    yield stack


@pytest.fixture(scope="session")
def gopeers() -> Path:
    """The go-spiffe peer binary (built once per source hash, then cached)."""
    gobuild.require_go()
    return gobuild.gopeers_binary()


@pytest.fixture(scope="session")
def spire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spire]:
    """One SPIRE (server and agent) for every test that asks, in either tier; stopped at the end."""
    procs = Processes(tmp_path_factory.mktemp("spire-logs"))
    env = Spire(procs)
    yield env
    env.close()
    procs.close()


@pytest.fixture(scope="session")
def spire_delegated(spire: Spire) -> Iterator[SpireDelegated]:
    """A second agent of the session's SPIRE server with the Delegated Identity API on its
    admin socket, this process's uid registered as the authorized delegate ``BRIDGE``."""
    env = SpireDelegated(spire)
    yield env
    env.close()


@pytest.fixture
def spire_logs_on_failure(spire: Spire, request: pytest.FixtureRequest) -> Iterator[None]:
    """After a failed test, the tails of the SPIRE server's and agent's logs on stderr."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for proc in (spire.server.proc, spire.agent.proc):
            if proc is not None:
                sys.stderr.write(f"\n----- spire -----\n{spire.procs.log(proc)[-4000:]}")


@pytest.fixture
def spire_stack(procs: Processes, spire: Spire, sockdir: Path) -> Iterator[Stack]:
    """A bridge (``sds run``) whose only upstream is the session's SPIRE agent."""
    stack = Stack(procs, sockdir)
    stack.workload_socket = spire.agent.socket
    yield stack
    if stack.bridge is not None:
        procs.stop(stack.bridge)


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A sticky, world-writable directory like /tmp, where another uid can plant things."""
    with short_tmp("sds-pub-", 0o1777) as path:
        yield path


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    """Managed subprocesses; their logs are printed if the test fails."""
    manager = Processes(tmp_path)
    yield manager
    manager.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stderr.write("\n" + manager.tails(4000) + "\n")


# --------------------------------------------------------------------------- tiers

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "e2e", "deploy")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its tier, the directory it lives in (before ``-m`` selects).

    A test module outside the tier directories is a usage error, so none runs unmarked.
    """
    del config
    for item in items:
        tier = item.path.relative_to(TESTS).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(
                f"{item.path.relative_to(TESTS.parent)}: test modules live in tests/<tier>/, "
                f"one of {', '.join(TIERS)}"
            )
        item.add_marker(tier)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


# --------------------------------------------------------------------------- cold builds

# Fixtures whose first use builds something that takes minutes on a fresh machine (Go
# programs, container images), each with the call that builds (or finds cached) it.
# Extended by the modules that own those tools.
PREBUILDS: dict[str, Callable[[], object]] = {}


def _register_prebuilds() -> None:
    if shutil.which("go") is not None:
        from tests.harness import spire
        from tests.harness.gotools import HELM, PROMTOOL, go_tool

        PREBUILDS["helm"] = lambda: go_tool(*HELM)
        PREBUILDS["promtool"] = lambda: go_tool(*PROMTOOL)
        PREBUILDS["gopeers"] = gobuild.gopeers_binary
        PREBUILDS["ghostunnel"] = gobuild.ghostunnel_binary
        PREBUILDS["spire"] = PREBUILDS["two_agents"] = spire.prebuild
        PREBUILDS["spire_delegated"] = spire.prebuild


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the slow tools the selected tests need, before the first test starts.

    A cold build (SPIRE takes 10-20 minutes on 2 cores) inside a fixture would
    count against that test's timeout; built here, outside any test, it cannot
    be cut short, and the fixtures find the result cached. A build that fails
    is left to the fixture, which reports or skips with the reason.
    """
    if session.config.option.collectonly or not session.items:
        return
    _register_prebuilds()
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for fixture, build in PREBUILDS.items():
        if fixture not in wanted:
            continue
        started = time.monotonic()
        try:
            build()
        except Exception as exc:
            if reporter is not None:
                reporter.write_line(f"prebuild {fixture}: failed, its tests will say why ({exc})")
            continue
        elapsed = time.monotonic() - started
        if reporter is not None and elapsed > 1:
            reporter.write_line(f"prebuild {fixture}: ready in {elapsed:.0f} s (cached now)")
