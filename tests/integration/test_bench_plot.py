"""bench/plot.py draws BENCHMARKS.md's figures from the committed JSON, reproducibly."""

from __future__ import annotations

import json
import statistics
import struct
import subprocess
import sys
from pathlib import Path

from tests.harness.figures import DATA, FIGURES, REPO


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def plot(out: Path) -> dict[str, dict[str, dict[str, float]]]:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "plot.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin", "HOME": str(out)},
    )
    assert done.returncode == 0, done.stderr
    drawn = {}
    for line in done.stdout.splitlines():
        path, _, values = line.partition(": ")
        drawn[Path(path).name] = json.loads(values)
    return drawn


def test_plots_render_from_committed_json_and_match_it(tmp_path: Path) -> None:
    drawn = plot(tmp_path)
    assert sorted(drawn) == sorted(FIGURES)
    for name in FIGURES:
        assert png_size(tmp_path / name) == (800, 560)

    rotation = json.loads((DATA / "rotation.json").read_text())
    for setup in ("bridge", "floor"):
        summary = rotation["end_to_end_ms"][setup]
        assert drawn["rotation-cdf.png"][setup] == {
            "n": summary["n"],
            "p50": summary["p50"],
            "p99": summary["p99"],
        }
        assert len(rotation["raw"]["end_to_end_ms"][setup]) == summary["n"]

    fanout = json.loads((DATA / "fanout.json").read_text())
    for name, case in fanout["cases"].items():
        assert len(case["arrivals_ms"]) == len(case["last_ms"]) == fanout["args"]["rotations"]
        assert all(len(r) == fanout["args"]["streams"] for r in case["arrivals_ms"])
        figure = drawn["fanout-arrivals.png"][name]
        assert figure["rotations"] == len(case["last_ms"])
        # The curves' last arrivals (rounded to 1 us) are the run's "last of all".
        assert abs(figure["median_last_ms"] - statistics.median(case["last_ms"])) < 0.01

    spire = json.loads((DATA / "spire.json").read_text())
    for server in ("spire", "bridge"):
        figure = drawn["spire-vs-bridge.png"][server]
        assert figure["n"] == spire["rotation_ms"][server]["n"]
        assert abs(figure["p50"] - spire["rotation_ms"][server]["p50"]) < 1e-6
        last = statistics.median(spire["fanout"][server]["last_stream_ms"])
        assert abs(figure["fanout_last_ms"] - last) < 1e-6


def test_committed_figures_are_what_the_committed_json_draws(tmp_path: Path) -> None:
    plot(tmp_path)
    for name in FIGURES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), (
            f"docs/bench/{name} is stale: run .venv/bin/python bench/plot.py"
        )
