"""Benchmark helper: run ``sds ARGS`` with cProfile switched on and off by signals.

``python bench/_profiled.py OUT.prof ARGS...``

SIGUSR1 starts profiling the main thread (where the event loop runs);
SIGUSR2 stops it and writes the statistics to ``OUT.prof``. This profiles
only a chosen window (e.g. the measured rotations), not start-up or idling.
"""

from __future__ import annotations

import cProfile
import signal
import sys
from typing import Any

from sds.cli import main


def run() -> int:
    out = sys.argv[1]
    profiler = cProfile.Profile()

    def start(_signum: int, _frame: Any) -> None:
        profiler.enable()

    def stop(_signum: int, _frame: Any) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(run())
