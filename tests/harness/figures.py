"""The benchmark figures and data that ``docs/bench`` publishes (drawn by ``bench/plot.py``)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DATA = REPO / "docs" / "bench"


FIGURES = ("rotation-cdf.png", "fanout-arrivals.png", "spire-vs-bridge.png")
