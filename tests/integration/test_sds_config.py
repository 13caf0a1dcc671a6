"""`sds run` configuration: every bad input is one line naming the file and key; exit code 2.

The tests here start real processes (the bridge, the provider, peers), no Envoy; the others are in
``tests/unit/test_sds_config.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import run_sds


def test_cli_exits_2_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "sds.yaml"
    path.write_text("listen: unix:///tmp/x.sock\nbogus: 1\n")
    result = run_sds("run", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"sds run: {path}: unknown field 'bogus' (want one of admin, allowed_gids, allowed_uids, "
        "default_svid, disable_spiffe_cert_validation, failover, jwt_svids, listen, metrics, "
        "names, per_caller, policies, secrets, socket_mode, trust_domain, upstream_backoff, "
        "workload_api)"
    ]


def test_missing_listen_is_reported() -> None:
    result = run_sds("run")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "sds run: no SDS listen address: set listen in the config or pass --listen"
    )


@pytest.mark.hostile
def test_fifo_or_directory_as_config_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        result = run_sds("run", "--config", str(path))
        assert result.returncode == 2
        assert result.stderr.splitlines() == [f"sds run: {path}: cannot read: not a regular file"]
