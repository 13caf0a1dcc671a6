"""The generated Workload API code matches proto/workload.proto.

The tests here start real processes (the bridge, the provider, peers), no Envoy; the others are in
``tests/unit/test_proto.py``.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_generated_code_is_not_stale() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
