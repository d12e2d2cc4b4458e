"""Results on disk: JSON (everything, window by window), CSV (a row per level) and a latency-vs-throughput PNG."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

from bench.loadgen.run import LevelResult

__all__ = ["machine", "ms", "plot", "table", "write_csv", "write_json"]

CSV_FIELDS = [
    "label",
    "mode",
    "level",
    "stable",
    "throughput",
    "p50",
    "p90",
    "p99",
    "p99.9",
    "max",
    "mean",
    "ok",
    "errors",
    "server_cpu_ms_per_request",
]


def machine() -> dict[str, Any]:
    """Where and when the figures were taken: they hold for this machine only."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "generator_cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _row(label: str, result: LevelResult) -> dict[str, Any]:
    summary = result.summary()
    latency = summary["latency_ms"]
    return {
        "label": label,
        "mode": result.mode,
        "level": result.level,
        "stable": result.stable,
        "throughput": summary["throughput"],
        **{key: latency[key] for key in ("p50", "p90", "p99", "p99.9", "max", "mean")},
        "ok": summary["ok"],
        "errors": sum(summary["errors"].values()),
        "server_cpu_ms_per_request": summary.get("server_cpu_ms_per_request"),
    }


def write_json(path: Path, meta: dict[str, Any], runs: dict[str, list[LevelResult]]) -> None:
    body = {
        "machine": machine(),
        **meta,
        "runs": {
            label: [{**r.summary(), "windows": [w.row() for w in r.windows]} for r in results]
            for label, results in runs.items()
        },
    }
    path.write_text(json.dumps(body, indent=2) + "\n")


def write_csv(path: Path, runs: dict[str, list[LevelResult]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for label, results in runs.items():
            writer.writerows(_row(label, r) for r in results)


def table(runs: dict[str, list[LevelResult]]) -> str:
    """A markdown table of every level, for a terminal or a document."""
    lines = [
        "| run | load | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | stable |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, results in runs.items():
        for r in results:
            row = _row(label, r)
            load = f"{r.level:g} conns" if r.mode == "concurrency" else f"{r.level:g}/s"
            errors = r.summary()["errors"]
            error_text = ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0"
            cells = [label, load, f"{row['throughput']:,.0f}"]
            cells += [ms(row[k]) for k in ("p50", "p90", "p99", "p99.9", "max")]
            cells += [error_text, "yes" if r.stable else "no"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ms(value: float | None) -> str:
    """Milliseconds for a table: three significant figures, whole numbers from 100 up, '-' for none."""
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def plot(path: Path, runs: dict[str, list[dict[str, Any]]], title: str) -> None:
    """Median (solid) and p99 (dashed) latency against achieved throughput, one colour per run, each
    run's points joined in the order its load (concurrency or rate) rose.

    Args:
        runs: label -> level summaries (``LevelResult.summary()``), in any order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, (label, summaries) in enumerate(runs.items()):
        points = sorted((s for s in summaries if s["ok"]), key=lambda s: s["level"])  # in the order load rose
        if not points:
            continue
        x = [s["throughput"] for s in points]
        color = f"C{i % 10}"
        ax.plot(x, [s["latency_ms"]["p50"] for s in points], "o-", color=color, label=f"{label} p50")
        ax.plot(x, [s["latency_ms"]["p99"] for s in points], "s--", color=color, label=f"{label} p99")
    ax.set_xlabel("throughput (successful requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
