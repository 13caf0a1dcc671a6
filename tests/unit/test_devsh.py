"""``dev.sh``: says what it does on first run, hides pip's noise, shows it when a step fails.

The tests here run in process, with no child process and no Envoy; the others are in
``tests/integration/test_devsh.py``.
"""

from __future__ import annotations

from tests.conftest import REPO


def test_ci_runs_dev_sh_test() -> None:
    assert (REPO / ".ci/run").read_text().rstrip().endswith("exec ./dev.sh test")
