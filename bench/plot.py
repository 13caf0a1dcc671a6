"""Draw BENCHMARKS.md's figures from the committed benchmark results.

Usage: ``.venv/bin/python bench/plot.py [--publish] [--data DIR] [--out DIR]``

Reads ``rotation.json`` and ``fanout.json`` from ``docs/bench/`` (the results
BENCHMARKS.md cites, committed) and writes next to them:

* ``rotation-cdf.png``: the distribution of rotation -> a fresh handshake
  presents the new leaf, bridge against the zero-work floor of the same run
  (empirical CDF, log-scale time axis);
* ``fanout-arrivals.png``: for each server, how many of the streams have the
  new leaf at each moment after the rotation (one line per measured
  rotation), and when each of the 3 Envoys presented it;
* ``spire-vs-bridge.png`` (from ``spire.json``, written by ``bench/spire.py``):
  rotation latency of Envoy on SPIRE's own SDS against Envoy on the bridge fed
  by the same agent (CDFs), and the 1,000-stream fan-out side by side.

``--publish`` first copies ``bench/results/{rotation,fanout,footprint}-latest.json``
(the last full runs, gitignored) into ``docs/bench/``, so running the three
benchmarks and then ``bench/plot.py --publish`` refreshes the committed data
BENCHMARKS.md and the README cite, and the figures, together. Rendering uses matplotlib's Agg
backend with fixed metadata, so the same JSON gives the same PNG bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _common import percentile
from matplotlib.ticker import NullFormatter, ScalarFormatter

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DATA = REPO / "docs" / "bench"
BENCHMARKS = ("rotation", "fanout", "footprint")  # published; the first two are plotted
# PNG metadata without a software version or date, so output is reproducible.
METADATA = {"Software": None}
COLORS = {
    "bridge": "#1f77b4",
    "floor": "#7f7f7f",
    "bridge-envoy-node": "#d62728",
    "spire": "#ff7f0e",
}


def _caption(data: dict[str, Any]) -> str:
    code = data["machine"]["code"]
    load = ", ".join(f"{x:.1f}" for x in data["machine"]["loadavg_at_start"])
    return (
        f"commit {code['commit']}, {data['machine']['date_utc']}, "
        f"{data['machine']['nproc']} CPU, load average at start {load}"
    )


def _legend_below(fig: Any, ax: Any, data: dict[str, Any]) -> None:
    """Legend under the axes (never over a curve), then the run's caption."""
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.13), fontsize=9, frameon=False)
    fig.text(0.01, 0.01, _caption(data), fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))


def rotation_cdf(data: dict[str, Any], out: Path) -> dict[str, dict[str, float]]:
    """Plot the end-to-end latency CDFs; return the p50/p99 drawn for each setup."""
    raw: dict[str, list[float]] = data["raw"]["end_to_end_ms"]
    drawn: dict[str, dict[str, float]] = {}
    fig, ax = plt.subplots(figsize=(8, 5.6), dpi=100)
    for name in ("floor", "bridge"):
        values = sorted(raw[name])
        n = len(values)
        p50, p99 = percentile(values, 50), percentile(values, 99)
        drawn[name] = {"n": n, "p50": p50, "p99": p99}
        label = "bridge (sds run)" if name == "bridge" else "floor (zero-work SDS server)"
        ax.step(
            values,
            [(i + 1) / n for i in range(n)],
            where="post",
            color=COLORS[name],
            linewidth=2,
            label=f"{label}: p50 {p50:.2f} ms, p99 {p99:.2f} ms (n={n})",
        )
        ax.axvline(p50, color=COLORS[name], linestyle=":", linewidth=1)
    ratio50 = drawn["bridge"]["p50"] / drawn["floor"]["p50"]
    ratio99 = drawn["bridge"]["p99"] / drawn["floor"]["p99"]
    ax.set_xscale("log")
    everything = [v for name in ("floor", "bridge") for v in raw[name]]
    lo, hi = min(everything), max(everything)
    ax.set_xticks([t for t in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500) if lo <= t <= hi])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("upstream rotation -> a fresh mTLS handshake presents the new leaf (ms, log)")
    ax.set_ylabel("fraction of rotations")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(
        f"Rotation latency, bridge vs floor in the same run "
        f"(p50 {ratio50:.2f}x, p99 {ratio99:.2f}x)"
    )
    _legend_below(fig, ax, data)
    fig.savefig(out, metadata=METADATA)
    plt.close(fig)
    return drawn


def fanout_arrivals(data: dict[str, Any], out: Path) -> dict[str, dict[str, float]]:
    """Plot per-stream arrival curves per case; return each case's median last arrival."""
    cases: dict[str, Any] = data["cases"]
    drawn: dict[str, dict[str, float]] = {}
    fig, ax = plt.subplots(figsize=(8, 5.6), dpi=100)
    for name, case in cases.items():
        color = COLORS.get(name, "#2ca02c")
        rotations: list[list[float]] = case["arrivals_ms"]
        lasts = [max(r + e) for r, e in zip(rotations, case["envoy_arrivals_ms"], strict=True)]
        median_last = percentile(lasts, 50)  # as fanout.py's "last of all" column
        drawn[name] = {"rotations": len(rotations), "median_last_ms": median_last}
        for k, arrivals in enumerate(rotations):
            ax.step(
                arrivals,
                range(1, len(arrivals) + 1),
                where="post",
                color=color,
                alpha=0.75,
                linewidth=1.2,
                label=(
                    f"{case['label'].replace('`', '')}: last of all, median "
                    f"{median_last:.0f} ms ({len(rotations)} rotations)"
                    if k == 0
                    else None
                ),
            )
        envoy = [t for r in case["envoy_arrivals_ms"] for t in r]
        ax.plot(
            envoy,
            [len(rotations[0]) * 1.02] * len(envoy),
            linestyle="none",
            marker="|",
            markersize=10,
            color=color,
        )
    streams = len(next(iter(cases.values()))["arrivals_ms"][0])
    ax.set_xlabel("time after the upstream rotation (ms)")
    ax.set_ylabel(f"SDS streams holding the new leaf (of {streams})")
    ax.set_ylim(0, streams * 1.06)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Fan-out: one rotation to {streams} SDS streams + 3 Envoys (| = an Envoy)")
    _legend_below(fig, ax, data)
    fig.savefig(out, metadata=METADATA)
    plt.close(fig)
    return drawn


def spire_side_by_side(data: dict[str, Any], out: Path) -> dict[str, dict[str, float]]:
    """Plot SPIRE's SDS against the bridge on one agent; return the p50s and fan-out medians."""
    raw: dict[str, list[float]] = data["raw"]["rotation_ms"]
    fanout: dict[str, Any] = data["fanout"]
    labels = {"spire": "SPIRE agent SDS (direct)", "bridge": "sds run on the same agent"}
    drawn: dict[str, dict[str, float]] = {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 5.6), dpi=100)
    for name in ("spire", "bridge"):
        values = sorted(raw[name])
        n = len(values)
        p50 = percentile(values, 50)
        last = percentile(fanout[name]["last_stream_ms"], 50)
        cpu = percentile(fanout[name]["cpu_per_rotation_s"], 50)
        drawn[name] = {"n": n, "p50": p50, "fanout_last_ms": last, "cpu_s": cpu}
        left.step(
            values,
            [(i + 1) / n for i in range(n)],
            where="post",
            color=COLORS[name],
            linewidth=2,
            label=f"{labels[name]}: p50 {p50:.1f} ms (n={n})",
        )
    left.set_xscale("log")
    left.xaxis.set_major_formatter(ScalarFormatter())
    left.xaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel("rotation -> fresh handshake shows new leaf (ms, log)")
    left.set_ylabel("fraction of rotations")
    left.set_ylim(0, 1.02)
    left.grid(True, which="both", alpha=0.3)
    left.set_title("Rotation", fontsize=10)
    names = ("spire", "bridge")
    bars = right.bar(
        [0, 1],
        [drawn[n]["fanout_last_ms"] for n in names],
        color=[COLORS[n] for n in names],
    )
    for bar, name in zip(bars, names, strict=True):
        right.annotate(
            f"{drawn[name]['fanout_last_ms']:.0f} ms\n{drawn[name]['cpu_s']:.2f} s CPU",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    right.set_xticks([0, 1], ["SPIRE", "bridge"])
    right.set_ylabel("rotation -> last of 1,000 streams (ms, median)")
    right.set_ylim(0, max(drawn[n]["fanout_last_ms"] for n in names) * 1.3)
    right.grid(True, axis="y", alpha=0.3)
    right.set_title("Fan-out to 1,000 SDS streams", fontsize=10)
    fig.suptitle(f"SPIRE {data['spire_version']} SDS vs the bridge, same agent, same run")
    left.legend(loc="upper left", bbox_to_anchor=(0, -0.13), fontsize=8, frameon=False)
    fig.text(0.01, 0.01, _caption(data), fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, metadata=METADATA)
    plt.close(fig)
    return drawn


def publish(data_dir: Path) -> None:
    """Copy the latest full runs from bench/results/ into ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in BENCHMARKS:
        latest = BENCH / "results" / f"{name}-latest.json"
        if not latest.exists():
            raise SystemExit(f"bench/plot.py: {latest} is missing; run bench/{name}.py first")
        shutil.copyfile(latest, data_dir / f"{name}.json")


def plot_all(data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Draw every figure from ``data_dir``'s JSON into ``out_dir``; return what was drawn."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update({"svg.hashsalt": "sds", "font.family": "DejaVu Sans"})
    rotation = json.loads((data_dir / "rotation.json").read_text())
    fanout = json.loads((data_dir / "fanout.json").read_text())
    spire = json.loads((data_dir / "spire.json").read_text())
    return {
        "rotation-cdf.png": rotation_cdf(rotation, out_dir / "rotation-cdf.png"),
        "fanout-arrivals.png": fanout_arrivals(fanout, out_dir / "fanout-arrivals.png"),
        "spire-vs-bridge.png": spire_side_by_side(spire, out_dir / "spire-vs-bridge.png"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--publish", action="store_true", help="copy bench/results/*-latest.json into --data first"
    )
    parser.add_argument("--data", type=Path, default=DATA, help="where the JSON results are")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default --data)")
    args = parser.parse_args()
    if args.publish:
        publish(args.data)
    drawn = plot_all(args.data, args.out or args.data)
    for name, values in drawn.items():
        print(f"{(args.out or args.data) / name}: {json.dumps(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
