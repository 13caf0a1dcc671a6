"""`sds run` as a process: socket bound only after the first SVID, readiness, wait, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from grpclib.client import Channel

from tests.conftest import PYTHON, Processes, run_sds, wait_for
from tests.harness.sdsfake import fetch
from tests.harness.stack import Stack


@pytest.fixture(autouse=True)
def _sds_logs_reach_caplog(sds_logs_reach_caplog: None) -> None:
    """Every test here reads ``sds`` logs through caplog."""


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_sds("run", *args, timeout=timeout)


def _fetch_ids(path: Path, names: list[str]) -> dict[str, str]:
    """Fetch ``names`` over a new SDS connection; the SPIFFE ID (or type) per name served."""

    async def go() -> dict[str, str]:
        channel = Channel(path=str(path))
        try:
            async with asyncio.timeout(20):
                response = await fetch(channel, names)
        finally:
            channel.close()
        out = {}
        for resource_ in response.resources:
            secret = Secret.parse(resource_.value)
            out[secret.name] = "tls" if secret.tls_certificate is not None else "validation"
        return out

    return asyncio.run(go())


def _wait(*args: str) -> subprocess.CompletedProcess[str]:
    return run_sds("wait", *args)


def test_socket_appears_only_with_secrets_then_sigterm_cleans_up(
    procs: Processes, sockdir: Path
) -> None:
    stack = Stack(procs, sockdir)
    stack.write_config()
    bridge = procs.sds("run", "--config", str(stack.config_path), name="bridge")
    stack.bridge = bridge
    port = int(wait_for(stack._admin_port_from_log, 15, "admin port"))

    # No Workload API yet: no socket, not ready, and the reason says why.
    status, body = _readyz(port)
    assert (status, body) == (503, "not ready: no X.509 context from the Workload API yet\n")
    assert not stack.sds_socket.exists()
    waited = _wait("--socket", f"unix://{stack.sds_socket}", "--timeout", "0.5")
    assert waited.returncode == 1
    assert waited.stderr.strip() == "sds wait: not ready after 0.5s: socket does not exist yet"

    stack.start_provider()
    assert _wait("--socket", f"unix://{stack.sds_socket}", "--timeout", "30").returncode == 0
    assert _wait("--admin", f"127.0.0.1:{port}", "--timeout", "30").stdout.strip() == "ready"
    assert _readyz(port) == (200, "ready\n")
    assert stack.sds_socket.stat().st_mode & 0o777 == 0o600

    assert procs.stop(bridge, signal.SIGTERM) == 0
    assert not stack.sds_socket.exists()
    assert "bridge.stopping" in procs.log(bridge)


@pytest.mark.hostile
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory owned by another uid")
@pytest.mark.parametrize(
    ("owner", "mode", "message"),
    [
        (1000, 0o777, ": owned by uid 1000, not by us (uid 0) or root; use a directory we own"),
        (1000, 0o755, ": owned by uid 1000, not by us (uid 0) or root; use a directory we own"),
        (
            0,
            0o777,
            ": mode 777 lets others replace the socket; remove group/other write or set "
            "the sticky bit",
        ),
        (
            0,
            0o770,
            ": mode 770 lets others replace the socket; remove group/other write or set "
            "the sticky bit",
        ),
    ],
)
def test_socket_directory_another_user_controls_is_refused(
    sockdir: Path, owner: int, mode: int, message: str
) -> None:
    shared = sockdir / "shared"
    shared.mkdir()
    os.chown(shared, owner, owner)
    shared.chmod(mode)
    result = _run("--listen", f"unix://{shared}/sds.sock", "--admin", "off")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"sds run: socket directory {shared}{message}"]
    assert not (shared / "sds.sock").exists()


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("{file}/sds.sock", "socket directory {file}: cannot create: File exists"),
        ("{file}/sub/sds.sock", "socket directory {file}/sub: cannot create: Not a directory"),
        ("{file}", "{file}: exists and is not a socket"),
    ],
)
def test_startup_failures_are_one_line_exit_2(sockdir: Path, listen: str, message: str) -> None:
    regular = sockdir / "plain"
    regular.write_text("x")
    result = _run("--listen", "unix://" + listen.format(file=regular), "--admin", "off")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["sds run: " + message.format(file=regular)]


def test_nul_in_listen_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "sds.yaml"
    config.write_text('listen: "unix:///tmp/a\\0b"\n')
    result = _run("--config", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"sds run: {config}: listen: 'unix:///tmp/a\\x00b': must not contain control characters"
    ]


@contextlib.contextmanager
def _taken_port() -> Iterator[int]:
    """A loopback TCP port some other socket is listening on, for the duration."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        yield taken.getsockname()[1]


def test_admin_port_in_use_is_one_line_exit_2(sockdir: Path) -> None:
    with _taken_port() as port:
        result = _run(
            "--workload-api",
            f"unix://{sockdir}/none.sock",
            "--listen",
            f"unix://{sockdir}/s/sds.sock",
            "--admin",
            f"127.0.0.1:{port}",
        )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"sds run: admin: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_tcp_listen_port_in_use_is_one_line_exit_2(procs: Processes, sockdir: Path) -> None:
    stack = Stack(procs, sockdir)
    stack.start_provider()
    with _taken_port() as port:
        result = _run(
            "--workload-api",
            f"unix://{stack.workload_socket}",
            "--listen",
            f"tcp://127.0.0.1:{port}",
            "--admin",
            "off",
        )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"sds run: cannot listen on tcp://127.0.0.1:{port}: Address already in use"
    )


@pytest.mark.hostile
def test_second_bridge_on_the_same_socket_is_refused_and_the_first_keeps_serving(
    procs: Processes, sockdir: Path
) -> None:
    stack = Stack(procs, sockdir)
    stack.start_provider()
    stack.start_bridge()
    inode = stack.sds_socket.stat().st_ino
    second = _run("--config", str(stack.config_path))
    assert second.returncode == 2
    assert second.stderr.splitlines()[-1] == (
        f"sds run: {stack.sds_socket}: another server is already listening there; "
        "stop it or choose another listen address"
    )
    assert stack.sds_socket.stat().st_ino == inode
    assert _fetch_ids(stack.sds_socket, ["default"]) == {"default": "tls"}


@pytest.mark.hostile
def test_stale_socket_is_replaced_and_a_foreign_one_is_left_on_exit(
    procs: Processes, sockdir: Path
) -> None:
    stack = Stack(procs, sockdir)
    stack.start_provider()
    stack.sds_socket.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(stack.sds_socket))  # bound, never listening: what a dead process leaves
    stale.close()
    stack.start_bridge()  # returns once the path exists, which the stale socket already does
    wait_for(lambda: "sds.listening" in procs.log(stack.bridge), 15, "sds.listening")
    assert _fetch_ids(stack.sds_socket, ["default"]) == {"default": "tls"}
    # Someone replaces our socket; on exit we must not delete theirs.
    stack.sds_socket.unlink()
    foreign = socket.socket(socket.AF_UNIX)
    foreign.bind(str(stack.sds_socket))
    try:
        assert procs.stop(stack.bridge) == 0
        assert stack.sds_socket.exists()
    finally:
        foreign.close()


@pytest.mark.chaos
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_before_the_first_svid_is_clean(
    procs: Processes, sockdir: Path, sig: signal.Signals
) -> None:
    stack = Stack(procs, sockdir)
    stack.write_config()
    bridge = procs.sds("run", "--config", str(stack.config_path), name="bridge")
    wait_for(lambda: "bridge.starting" in procs.log(bridge), 15, "bridge.starting")
    assert procs.stop(bridge, sig) == 0
    log = procs.log(bridge)
    assert "Traceback" not in log
    assert "bridge.stopping" in log
    assert not stack.sds_socket.exists()


@pytest.mark.chaos
def test_stop_during_a_reload_is_clean(procs: Processes, sockdir: Path) -> None:
    stack = Stack(procs, sockdir)
    stack.start_provider()
    stack.start_bridge()
    wait_for(lambda: "sds.listening" in procs.log(stack.bridge), 15, "sds.listening")
    os.kill(stack.bridge.pid, signal.SIGHUP)  # the reload reads the file twice, 50 ms apart
    assert procs.stop(stack.bridge, signal.SIGTERM) == 0
    log = procs.log(stack.bridge)
    assert "Traceback" not in log
    assert "bridge.stopping" in log
    assert not stack.sds_socket.exists()


def _hup_and_wait(procs: Processes, bridge: subprocess.Popen[bytes], marker: str) -> list[str]:
    """Send SIGHUP; return the log lines it produced once one contains ``marker``."""
    before = len(procs.log(bridge).splitlines())
    os.kill(bridge.pid, signal.SIGHUP)

    def new_lines() -> list[str] | None:
        lines = procs.log(bridge).splitlines()[before:]
        return lines if any(marker in line for line in lines) else None

    lines: list[str] = wait_for(new_lines, 20, marker)
    return [line.split(" ", 3)[3] for line in lines]  # drop time, level, logger


@pytest.mark.hostile
def test_reload_of_an_empty_or_partial_file_keeps_the_old_state(
    procs: Processes, sockdir: Path
) -> None:
    stack = Stack(procs, sockdir)
    stack.start_provider()
    policy = {"name": "callers", "allow": ["spiffe://example.org/client-a"]}
    stack.write_config(socket_mode="0660", allowed_uids=[0], policies=[policy])
    stack.start_bridge()
    good = stack.config_path.read_text()
    path = stack.config_path
    for text, error in [
        (b"", f"{path}: is empty: a config file must be a non-empty mapping"),
        (b"# being rewritten\n", f"{path}: is empty: a config file must be a non-empty mapping"),
        (good[: good.index("allowed_uids")].encode(), "no SDS listen address: set listen"),
        (good[: good.index("allowed_uids") + 15].encode(), f"{path}: allowed_uids: must be a"),
        (b"listen: \xff\n", f"{path}: not UTF-8 (byte 8)"),
        (b"socket_mode: .inf\n", f"{path}: socket_mode: must be an octal string such as '0600'"),
        (b"allowed_uids: 5\n", f"{path}: allowed_uids: must be a list of non-negative integers"),
        (b"x: 2024-02-30\n", f"{path}: unknown field 'x'"),
        (b"allowed_uids: [" + b"9" * 5000 + b"]\n", f"{path}: line 1: invalid YAML: integer"),
    ]:
        path.write_bytes(text)
        lines = _hup_and_wait(procs, stack.bridge, "config.")
        failed = [line for line in lines if line.startswith("config.reload_failed")]
        assert len(failed) == 1, lines
        assert failed[0].startswith(f'config.reload_failed error="{error}'), failed[0]
        assert failed[0].endswith(" kept=previous")
        assert not any("config.reloaded" in line for line in lines)
    names = {item["name"] for item in stack.admin("/secrets")}
    assert {"default", "callers"} <= names
    assert "Traceback" not in procs.log(stack.bridge)


@pytest.mark.hostile
def test_reload_that_widens_access_is_logged_loudly(procs: Processes, sockdir: Path) -> None:
    stack = Stack(procs, sockdir)
    stack.start_provider()
    policy = {"name": "callers", "allow": ["spiffe://example.org/client-a"]}
    stack.write_config(allowed_uids=[0], policies=[policy])
    stack.start_bridge()
    wider = {
        "name": "callers",
        "allow": ["spiffe://example.org/client-a", "spiffe://example.org/*"],
    }
    stack.write_config(socket_mode="0660", policies=[wider], disable_spiffe_cert_validation=True)
    lines = _hup_and_wait(procs, stack.bridge, "config.reloaded")
    assert [line for line in lines if line.startswith("config.")] == [
        'config.widened key=allowed_uids old=[0] new="[] (anyone who can open the socket)" '
        "applied=now",
        'config.widened key=socket_mode old=0600 new=0660 applied="at restart"',
        "config.widened key=disable_spiffe_cert_validation old=false new=true applied=now",
        "config.widened key=policies[callers].allow old=spiffe://example.org/client-a "
        "new=spiffe://example.org/client-a,spiffe://example.org/* applied=now",
        'config.restart_needed keys=socket_mode detail="socket_mode: 0600 -> 0660"',
        f"config.reloaded source={stack.config_path} "
        "applied=allowed_uids,disable_spiffe_cert_validation,policies",
    ]


def test_reload_names_keys_that_need_a_restart(procs: Processes, sockdir: Path) -> None:
    stack = Stack(procs, sockdir)
    stack.start_provider()
    stack.start_bridge()
    config = yaml.safe_load(stack.config_path.read_text())
    config |= {
        "listen": f"unix://{sockdir}/other/sds.sock",
        "workload_api": f"unix://{sockdir}/elsewhere.sock",
        "admin": "127.0.0.1:1",
        "trust_domain": "example.org",
    }
    stack.config_path.write_text(yaml.safe_dump(config))
    lines = _hup_and_wait(procs, stack.bridge, "config.reloaded")
    assert [line for line in lines if line.startswith("config.")] == [
        "config.restart_needed keys=workload_api,listen,admin "
        f'detail="workload_api: unix://{stack.workload_socket} -> unix://{sockdir}/elsewhere.sock; '
        f"listen: unix://{stack.sds_socket} -> unix://{sockdir}/other/sds.sock; "
        'admin: 127.0.0.1:0 -> 127.0.0.1:1"',
        f"config.reloaded source={stack.config_path} applied=trust_domain",
    ]
    # Nothing that needs a restart was applied: still serving on the old socket.
    assert _fetch_ids(stack.sds_socket, ["default"]) == {"default": "tls"}


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.hostile
def test_admin_flood_does_not_starve_sds_or_the_upstream(procs: Processes, sockdir: Path) -> None:
    stack = Stack(procs, sockdir)
    stack.start_provider()
    stack.write_config()

    bridge = procs.start(  # prlimit execs: the pid is the bridge's
        [
            "prlimit",
            "--nofile=1024:1024",
            PYTHON,
            "-m",
            "sds",
            "run",
            "--config",
            str(stack.config_path),
        ],
        "bridge",
    )
    stack.bridge = bridge
    wait_for(stack.sds_socket.exists, 15, "SDS socket")
    port = int(wait_for(stack._admin_port_from_log, 10, "admin port"))
    baseline_log = len(procs.log(bridge))

    flood = []
    try:
        for _ in range(1100):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            flood.append(sock)
        time.sleep(1)
        for sock in flood:  # a request line, never finished
            with contextlib.suppress(OSError):
                sock.send(b"GET /metrics HTTP/1.1\r\n")
        assert _fd_count(bridge.pid) < 300
        # A new SDS client is served while the flood holds.
        assert _fetch_ids(stack.sds_socket, ["default"]) == {"default": "tls"}
        # The upstream goes away and comes back: the bridge reconnects to it.
        assert procs.stop(stack.provider) == 0
        stack.start_provider()
        wait_for(lambda: procs.log(bridge).count("workload_api.connected") >= 2, 30, "reconnect")
        assert _fetch_ids(stack.sds_socket, ["default"]) == {"default": "tls"}
        assert _fd_count(bridge.pid) < 300
    finally:
        for sock in flood:
            sock.close()
    wait_for(lambda: _readyz(port)[0] == 200, 30, "admin answers again")
    log = procs.log(bridge)
    assert "Traceback" not in log
    assert len(log) - baseline_log < 20_000


@pytest.mark.hostile
def test_reload_of_mutated_configs_keeps_the_old_state(procs: Processes, sockdir: Path) -> None:
    from sds.bridge.config import parse_config_text
    from sds.errors import ConfigError
    from tests.harness.mutate import mutations

    stack = Stack(procs, sockdir)
    stack.start_provider()
    policy = {"name": "callers", "allow": ["spiffe://example.org/client-a"]}
    stack.write_config(allowed_uids=[0], policies=[policy])
    stack.start_bridge()
    before = stack.admin("/secrets")
    sample = []
    for raw in mutations(2_000, seed=9, base=stack.config_path.read_bytes()):
        try:
            parse_config_text(raw, "x")
        except ConfigError:
            sample.append(raw)
        if len(sample) == 25:
            break
    for raw in sample:
        stack.config_path.write_bytes(raw)
        lines = _hup_and_wait(procs, stack.bridge, "config.reload_failed")
        assert not any(line.startswith("config.reloaded") for line in lines), lines
    assert stack.admin("/secrets") == before
    assert _readyz(stack.admin_port) == (200, "ready\n")
    assert "Traceback" not in procs.log(stack.bridge)


@pytest.mark.hostile
def test_wait_socket_needs_an_sds_server_not_just_a_socket(procs: Processes, sockdir: Path) -> None:
    path = sockdir / "foreign.sock"
    foreign = socket.socket(socket.AF_UNIX)
    foreign.bind(str(path))
    foreign.listen(16)  # accepts connections, speaks nothing
    try:
        waited = _wait("--socket", f"unix://{path}", "--timeout", "0.5")
    finally:
        foreign.close()
    assert waited.returncode == 1
    assert waited.stderr == (
        "sds wait: not ready after 0.5s: socket does not answer an SDS call within 2s\n"
    )
    # A gRPC server that is not SDS (our Workload API provider) is not mistaken for one either.
    stack = Stack(procs, sockdir)
    stack.start_provider()
    waited = _wait("--socket", f"unix://{stack.workload_socket}", "--timeout", "0.5")
    assert waited.returncode == 1
    # UNIMPLEMENTED once the provider sends a content-type with it; UNKNOWN before.
    [line] = waited.stderr.splitlines()
    assert line.startswith("sds wait: not ready after 0.5s: socket is not an SDS server: U"), line


@pytest.mark.chaos
def test_default_is_withdrawn_not_repointed_when_the_upstream_dies(
    procs: Processes, sockdir: Path
) -> None:
    """Provider killed; web (short TTL) expires while the clients' SVIDs (1 h) live on."""
    stack = Stack(procs, sockdir, x509_ttl="4s")
    stack.start_provider()
    stack.start_bridge()
    wait_for(lambda: _readyz(stack.admin_port)[0] == 200, 15, "ready")
    assert procs.stop(stack.provider, signal.SIGKILL) != 0

    def withdrawn() -> tuple[int, str] | None:
        status, body = _readyz(stack.admin_port)
        return (status, body) if status == 503 else None

    _, body = wait_for(withdrawn, 30, "default withdrawn at expiry")
    assert body.startswith("not ready: default: SVID spiffe://example.org/web expired at ")
    assert body.endswith(
        "and the Workload API sent no replacement (not re-pointed to another identity)\n"
    )
    names = {item["name"] for item in stack.admin("/secrets")}
    assert "default" not in names
    assert "spiffe://example.org/client-a" in names  # held, but never served as `default`
    assert "svid.default_changed" not in procs.log(stack.bridge)
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{stack.admin_port}/metrics", timeout=5
    ).read()
    assert b'sds_unservable{name="default"} 1.0' in metrics
    # The upstream comes back with a fresh web SVID: default is web again, ready again.
    stack.start_provider()
    wait_for(lambda: _readyz(stack.admin_port) == (200, "ready\n"), 30, "ready again")
    default = next(i for i in stack.admin("/secrets") if i["name"] == "default")
    assert default["spiffe_id"] == "spiffe://example.org/web"
    assert "svid.default_changed" not in procs.log(stack.bridge)
