"""Real SPIRE (server + agents) for tests, built from the Go module proxy on first use.

:func:`spire_binaries` builds ``spire-server`` and ``spire-agent`` v1.13.3 once
(:func:`tests.harness.gotools.go_tool`; 10-20 minutes on 2 cores the first time).
:class:`SpireServer` runs a server on loopback: a kernel-chosen ``bind_port``,
a sqlite datastore and its API socket in a private temp directory,
``join_token`` node attestation and a short ``default_x509_svid_ttl``.
:class:`SpireAgent` runs an agent attested with a fresh join token, the
``unix`` workload attestor, its keys on disk in its own data dir (so a
restart re-attests without a new token), and its Workload API (and SDS)
socket in its own private directory. With ``admin=True`` it also serves the
admin API (the Delegated Identity API among it) on ``admin_socket``, in a
second private directory: SPIRE refuses an ``admin_socket_path`` in, or
under, the Workload API socket's directory (``cmd/spire-agent/cli/run/run_posix.go``).
:class:`SpireDelegated` is such an agent beside the tests' shared one.

SPIRE backdates certificates by 10 s, so with ``x509_ttl="30s"`` an SVID lasts
40 s and the agent renews it every 10-15 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from sds.spiffe.x509 import X509Context
from sds.workloadapi.client import WorkloadApiClient
from tests.harness.gotools import go_tool
from tests.harness.procs import Processes, wait_for
from tests.harness.stack import Material

__all__ = [
    "BRIDGE",
    "SPIRE_VERSION",
    "TRUST_DOMAIN",
    "SpireAgent",
    "SpireDelegated",
    "SpireServer",
    "fetch_context",
    "own_uid_selector",
    "prebuild",
    "private_dir",
    "spire_binaries",
    "uid_selector",
]

SPIRE_VERSION = "v1.13.3"
TRUST_DOMAIN = "example.org"
_MODULE = "github.com/spiffe/spire"
_TOKEN_RE = re.compile(r"Token: (\S+)")
_ENTRY_RE = re.compile(r"Entry ID\s*:\s*(\S+)")


_BUILD_FAILED: list[str] = []


def _binaries() -> tuple[Path, Path]:
    server = go_tool(_MODULE, "cmd/spire-server", SPIRE_VERSION)
    return server, go_tool(_MODULE, "cmd/spire-agent", SPIRE_VERSION)


def prebuild() -> None:
    """Build SPIRE before the first test runs (``tests/conftest.py`` PREBUILDS), outside any
    test's timeout: a first build takes 10-20 minutes. A failure is remembered and every
    SPIRE test reports it."""
    try:
        _binaries()
    except pytest.fail.Exception as exc:
        _BUILD_FAILED.append(str(exc))
        raise RuntimeError(f"building SPIRE {SPIRE_VERSION} failed") from exc


def spire_binaries() -> tuple[Path, Path]:
    """(spire-server, spire-agent) at SPIRE_VERSION; builds them once, skips without Go."""
    if _BUILD_FAILED:
        pytest.fail(_BUILD_FAILED[0])
    return _binaries()


def private_dir(prefix: str) -> Path:
    """A short 0700 directory under /tmp (Unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _free_port() -> int:
    """A loopback TCP port the kernel just handed out (SPIRE needs the number up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch_context(socket_path: Path, timeout: float = 5.0) -> X509Context:
    """One X.509 context from the Workload API at ``socket_path`` (as the calling uid)."""

    async def fetch() -> X509Context:
        async with WorkloadApiClient(f"unix://{socket_path}") as client:
            return await asyncio.wait_for(client.fetch_x509_context(), timeout)

    return asyncio.run(fetch())


@dataclass
class _Run:
    returncode: int
    out: str


class SpireServer:
    """One spire-server on 127.0.0.1 with its state in a private directory."""

    def __init__(
        self, procs: Processes, binary: Path, *, x509_ttl: str = "30s", name: str = "spire-server"
    ) -> None:
        self.procs = procs
        self.binary = binary
        self.name = name
        self.dir = private_dir("spire-s-")
        self.socket = self.dir / "api.sock"
        self.port = _free_port()
        self.config = self.dir / "server.conf"
        self.config.write_text(
            f"""
server {{
    bind_address = "127.0.0.1"
    bind_port = "{self.port}"
    socket_path = "{self.socket}"
    trust_domain = "{TRUST_DOMAIN}"
    data_dir = "{self.dir}/data"
    log_level = "DEBUG"
    default_x509_svid_ttl = "{x509_ttl}"
    agent_ttl = "1h"
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{self.dir}/data/datastore.sqlite3"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
}}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SpireServer:
        self.proc = self.procs.start(
            [str(self.binary), "run", "-config", str(self.config)], self.name
        )
        wait_for(self.healthy, 60, "spire-server healthcheck")
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"spire-server exited:\n{self.procs.log(self.proc)[-3000:]}")
        return self.run("healthcheck", check=False).returncode == 0

    def run(self, command: str, *args: str, check: bool = True) -> _Run:
        """``spire-server COMMAND -socketPath <ours> ARGS``; raise on failure when ``check``."""
        argv = [str(self.binary), *command.split(), "-socketPath", str(self.socket), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        out = result.stdout + result.stderr
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {out}")
        return _Run(result.returncode, out)

    def join_token(self) -> str:
        """A fresh single-use join token."""
        match = _TOKEN_RE.search(self.run("token generate", "-ttl", "600").out)
        assert match is not None, "spire-server token generate printed no token"
        return match.group(1)

    def entry_create(
        self, parent_id: str, spiffe_id: str, *selectors: str, hint: str | None = None
    ) -> str:
        """Register ``spiffe_id`` for workloads with ``selectors`` under ``parent_id``."""
        args = ["-parentID", parent_id, "-spiffeID", spiffe_id]
        for selector in selectors:
            args += ["-selector", selector]
        if hint is not None:
            args += ["-hint", hint]
        match = _ENTRY_RE.search(self.run("entry create", *args).out)
        assert match is not None, "spire-server entry create printed no entry id"
        return match.group(1)

    def entry_delete(self, entry_id: str) -> None:
        self.run("entry delete", "-entryID", entry_id)

    def mint(self, spiffe_id: str, ttl: str = "1h") -> Material:
        """An X509-SVID straight from the server (a TLS client's cert, key and bundle)."""
        out = self.dir / f"mint-{abs(hash(spiffe_id))}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(mode=0o700)
        self.run("x509 mint", "-spiffeID", spiffe_id, "-ttl", ttl, "-write", str(out))
        return Material(
            cert=(out / "svid.pem").read_bytes(),
            key=(out / "key.pem").read_bytes(),
            ca=(out / "bundle.pem").read_bytes(),
            spiffe_id=spiffe_id,
        )

    def close(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class SpireAgent:
    """One spire-agent attested to ``server`` with a join token; restartable without a token."""

    def __init__(
        self,
        server: SpireServer,
        binary: Path,
        *,
        name: str = "spire-agent",
        admin: bool = False,
        authorized_delegates: Sequence[str] = (),
    ) -> None:
        """``admin`` (implied by ``authorized_delegates``) adds the admin socket; only the
        callers whose SPIFFE ID is in ``authorized_delegates`` may use its Delegated
        Identity API."""
        self.server = server
        self.binary = binary
        self.name = name
        self.dir = private_dir("spire-a-")
        self.socket = self.dir / "api.sock"
        self.admin_socket: Path | None = None
        admin_lines = ""
        if admin or authorized_delegates:
            self.admin_socket = private_dir("spire-adm-") / "api.sock"
            delegates = ", ".join(f'"{d}"' for d in authorized_delegates)
            admin_lines = (
                f'    admin_socket_path = "{self.admin_socket}"\n'
                f"    authorized_delegates = [{delegates}]\n"
            )
        self.config = self.dir / "agent.conf"
        self.token = server.join_token()
        self.spiffe_id = f"spiffe://{TRUST_DOMAIN}/spire/agent/join_token/{self.token}"
        self.config.write_text(
            f"""
agent {{
    data_dir = "{self.dir}/data"
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "{server.port}"
    socket_path = "{self.socket}"
    trust_domain = "{TRUST_DOMAIN}"
    insecure_bootstrap = true
{admin_lines}}}
plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            directory = "{self.dir}/data"
        }}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._attested = False

    def start(self) -> SpireAgent:
        """Start the agent (with the join token the first time) and wait for its socket."""
        argv = [str(self.binary), "run", "-config", str(self.config)]
        if not self._attested:
            argv += ["-joinToken", self.token]
        for sock in (self.socket, self.admin_socket):
            if sock is not None:
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()
        self.proc = self.server.procs.start(argv, self.name)
        wait_for(self._socket_up, 60, f"{self.name} Workload API socket")
        if self.admin_socket is not None:
            wait_for(self.admin_socket.exists, 60, f"{self.name} admin socket")
        self._attested = True
        return self

    def _socket_up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log = self.server.procs.log(self.proc)[-3000:]
            raise AssertionError(f"{self.name} exited:\n{log}")
        return self.socket.exists()

    def log(self) -> str:
        assert self.proc is not None
        return self.server.procs.log(self.proc)

    def context(self, timeout: float = 5.0) -> X509Context:
        """What this agent hands the calling (root) process now."""
        return fetch_context(self.socket, timeout)

    def wait_svid(self, spiffe_id: str, timeout: float = 60.0) -> X509Context:
        """Wait until the agent issues ``spiffe_id`` to the calling process."""

        def issued() -> X509Context | None:
            try:
                ctx = self.context()
            except Exception:
                return None
            return ctx if any(str(s.spiffe_id) == spiffe_id for s in ctx.svids) else None

        result: X509Context = wait_for(issued, timeout, f"{self.name} to issue {spiffe_id}")
        return result

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.server.procs.stop(self.proc, sig)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.admin_socket is not None:
            shutil.rmtree(self.admin_socket.parent, ignore_errors=True)


def own_uid_selector() -> str:
    """The unix attestor selector matching this test process (and the bridge it starts)."""
    return uid_selector(os.getuid())


def uid_selector(uid: int) -> str:
    """The unix attestor selector matching every process running as ``uid``."""
    return f"unix:uid:{uid}"


# --------------------------------------------------------------------------- the tests' SPIRE

WEB = f"spiffe://{TRUST_DOMAIN}/web"


CLIENT_A = f"spiffe://{TRUST_DOMAIN}/client-a"


CLIENT_B = f"spiffe://{TRUST_DOMAIN}/client-b"


class Spire:
    """A SPIRE for the tests: a server, one agent issuing :data:`WEB` to this process's uid
    (so to the bridges it starts), and client material minted by the server."""

    def __init__(self, procs: Processes) -> None:
        server_bin, agent_bin = spire_binaries()
        self.procs = procs
        self.server = SpireServer(procs, server_bin).start()
        self.agent = SpireAgent(self.server, agent_bin).start()
        self.server.entry_create(self.agent.spiffe_id, WEB, own_uid_selector(), hint="web")
        self.agent.wait_svid(WEB)
        self.client_a = self.server.mint(CLIENT_A)
        self.client_b = self.server.mint(CLIENT_B)

    def close(self) -> None:
        self.agent.close()
        self.server.close()


BRIDGE = f"spiffe://{TRUST_DOMAIN}/sds-bridge"


class SpireDelegated:
    """An agent of ``spire``'s server whose admin socket serves the Delegated Identity API
    to :data:`BRIDGE`, the identity it issues to this process's uid (so to the bridges the
    tests start).

    A second agent rather than the shared one: entries hang off their agent's SPIFFE ID, so
    what is registered here (the bridge, the workloads of other uids) never reaches the
    shared agent, whose callers keep getting exactly :data:`WEB`; and one server serves both.
    """

    def __init__(self, spire: Spire) -> None:
        _, agent_bin = spire_binaries()
        self.server = spire.server
        self.agent = SpireAgent(
            self.server, agent_bin, name="spire-agent-delegated", authorized_delegates=[BRIDGE]
        ).start()
        assert self.agent.admin_socket is not None
        self.admin_socket: Path = self.agent.admin_socket
        self.bridge_entry = self.register(os.getuid(), BRIDGE, hint="bridge")
        self.agent.wait_svid(BRIDGE)

    def register(self, uid: int, spiffe_id: str, *, hint: str | None = None) -> str:
        """Issue ``spiffe_id`` to processes of ``uid`` on this agent; the entry's id."""
        return self.server.entry_create(
            self.agent.spiffe_id, spiffe_id, uid_selector(uid), hint=hint
        )

    def close(self) -> None:
        self.agent.close()
