"""bench/plot.py draws BENCHMARKS.md's figures from the committed JSON, reproducibly.

The tests here run in process, with no child process and no Envoy; the others are in
``tests/integration/test_bench_plot.py``.
"""

from __future__ import annotations

import json

from tests.harness.figures import DATA, FIGURES, REPO


def test_docs_cite_only_committed_results() -> None:
    for doc in ("README.md", "BENCHMARKS.md", "bench/README.md"):
        text = (REPO / doc).read_text()
        assert "bench/results/" not in text.replace("bench/results/<name>", ""), doc
    benchmarks = (REPO / "BENCHMARKS.md").read_text()
    for name in (*FIGURES, "rotation.json", "fanout.json", "footprint.json", "spire.json"):
        assert f"docs/bench/{name}" in benchmarks, name
        assert (DATA / name).is_file(), name


def test_committed_verdicts_judge_ratios_not_absolute_times() -> None:
    """A shared machine's load moves absolute times, so only ratios (and memory) get a verdict."""
    judged = []
    for name in ("rotation", "fanout", "footprint"):
        targets = json.loads((DATA / f"{name}.json").read_text())["targets"]
        for target, (_measured, verdict) in targets.items():
            if verdict == "info (absolute)":
                assert target.startswith("(") and "idle machine" in target, target
                continue
            assert verdict in ("MET", "NOT MET"), (target, verdict)
            assert (
                "x floor" in target
                or "x `python -c pass`" in target
                or ("RSS" in target or "CPU" in target)
            ), target
            judged.append(target)
    assert "exec -> first secret <= 6x `python -c pass` (150 ms at 25 ms)" in judged
    assert "p99 <= 1.5x floor" in judged
