"""sds._util.procs without a child: the wait's own failure message.

The tests that start children are in ``tests/integration/test_procs.py``.
"""

from __future__ import annotations

import pytest

from sds._util.procs import WaitFailed, wait_until


def test_wait_until_returns_the_first_truthy_value() -> None:
    answers = iter([None, 0, "", "yes"])
    assert wait_until(lambda: next(answers), 5, "the answer") == "yes"


def test_wait_until_names_what_it_waited_for() -> None:
    with pytest.raises(WaitFailed, match=r"^timed out after 0.05s waiting for the answer$"):
        wait_until(lambda: None, 0.05, "the answer")
