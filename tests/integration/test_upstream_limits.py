"""The Workload API client's limits and edges: deadlines, message size, peers that are not.

The tests here start real processes (the bridge, the provider, peers), no Envoy; the others are in
``tests/unit/test_upstream_limits.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.hostile
def test_sds_run_with_a_nul_in_workload_api_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "sds.yaml"
    config.write_text('workload_api: "unix:///run/a\\0b.sock"\nlisten: unix:///tmp/x/sds.sock\n')
    result = subprocess.run(
        [sys.executable, "-m", "sds", "run", "--config", str(config), "--admin", "off"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"sds run: {config}: workload_api[0]: 'unix:///run/a\\x00b.sock': "
        "must not contain control characters"
    ]
