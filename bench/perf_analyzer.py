"""Triton's perf_analyzer against a server, from the venv ``make perf-analyzer`` builds, and its results read.

    python -m bench.perf_analyzer --url 127.0.0.1:8001 --protocol grpc --model cnn-bn --concurrency 1 16 64

perf_analyzer is a load tester nobody here wrote: it reads the model's metadata and config, sends zeros of
the model's shapes (its default, random bytes, holds NaN, which the server refuses) as binary over HTTP, raw
over gRPC (``--json``: JSON over HTTP), and reports throughput, latency percentiles and, from the
statistics extension, where the server's time went (queue, compute input, compute infer, compute output).
Its CSV has one row per concurrency; its stdout has the counts.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["MAX_TRIALS", "binary", "environment", "run", "tensors_label"]

ROOT = Path(__file__).resolve().parent.parent
MAX_TRIALS = 6  # measurement windows per level at most, stable or not (perf_analyzer's default is 10)
VENV = ROOT / ".perf-venv"


def binary() -> Path | None:
    """perf_analyzer, from PERF_ANALYZER, the project's .perf-venv or PATH; None where it is not installed."""
    for candidate in (os.environ.get("PERF_ANALYZER"), VENV / "bin" / "perf_analyzer", shutil.which("perf_analyzer")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def environment(path: Path) -> dict[str, str]:
    """The environment it runs in: libcudart.so.12 from the CUDA runtime wheel beside it on LD_LIBRARY_PATH."""
    found = sorted(path.parent.parent.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    paths = [str(p) for p in found] + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    return os.environ | {"LD_LIBRARY_PATH": ":".join(paths)}


def _counts(stdout: str) -> list[dict[str, int]]:
    """Per concurrency, in order: the client's request count, the server's successful request count over
    perf_analyzer's measurement windows, and the server's overhead (microseconds: a request's time in the
    server outside its queue and compute, from the statistics extension)."""
    client = [int(n) for n in re.findall(r"^\s+Request count: (\d+)", stdout, re.M)]
    server = [int(n) for n in re.findall(r"^\s+Successful request count: (\d+)", stdout, re.M)]
    overhead = [int(n) for n in re.findall(r"Avg request latency: \d+ usec \(overhead (\d+) usec", stdout)]
    return [
        {"client_requests": c, "server_successes": s, "Server Overhead": o}
        for c, s, o in zip(client, server, overhead, strict=False)
    ]


def run(
    url: str,
    protocol: str,
    model: str,
    concurrency: list[int],
    json_data: bool = False,
    batch: int = 1,
    interval_ms: int = 2000,
    timeout_s: float = 600,
    streaming: bool = False,
    version: str | None = None,
    stability_pct: int = 10,
) -> list[dict[str, Any]]:
    """One row per concurrency (one perf_analyzer run each): its CSV columns (microseconds;
    'Inferences/Second'), its counts, and the command that produced it. ``version``: the model version it
    asks for (``-x``; by default the one the server's statistics name). ``stability_pct``: how far its last
    three windows may differ and still count as stable (perf_analyzer's ``-s``, default 10)."""
    path = binary()
    if path is None:
        raise FileNotFoundError("no perf_analyzer: `make perf-analyzer` installs it in .perf-venv")
    out = []
    for level in concurrency:
        # A level whose windows never agree within stability_pct is run again with windows 2.5 times as long;
        # if they still do not, its figures are those of the last window, marked unstable.
        row: dict[str, Any] | None = None
        for interval in (interval_ms, int(interval_ms * 2.5)):
            args = (path, url, protocol, model, level, json_data, batch, interval, timeout_s)
            row = _one_level(*args, streaming=streaming, version=version, stability_pct=stability_pct)
            if row["stable"]:
                break
        assert row is not None
        out.append(row)
    return out


def _one_level(
    path: Path,
    url: str,
    protocol: str,
    model: str,
    level: int,
    json_data: bool,
    batch: int,
    interval_ms: int,
    timeout_s: float,
    streaming: bool = False,
    version: str | None = None,
    stability_pct: int = 10,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "report.csv"
        argv = [
            str(path),
            "-m", model,
            "-u", url,
            "-i", protocol,
            "-b", str(batch),
            "--concurrency-range", str(level),
            "--measurement-interval", str(interval_ms),
            "--max-trials", str(MAX_TRIALS),
            "--stability-percentage", str(stability_pct),
            # Its default, random bytes, makes NaN and Infinity floats, which the server refuses (400).
            "--input-data", "zero",
            "-f", str(report),
            "--verbose-csv",
            # Each window's throughput and latency on its own line: what is left to report (``_last_window``)
            # when the windows never agree and no CSV is written.
            "-v",
        ]  # fmt: skip
        if json_data:
            argv += ["--input-tensor-format=json", "--output-tensor-format=json"]
        if streaming:  # gRPC's ModelStreamInfer: one stream per concurrent client
            argv.append("--streaming")
        if version:
            argv += ["-x", version]
        done = subprocess.run(argv, capture_output=True, text=True, env=environment(path), timeout=timeout_s)
        rows = list(csv.DictReader(io.StringIO(report.read_text()))) if report.exists() else []
    command = "perf_analyzer " + " ".join(argv[1:]).replace(str(report), "report.csv")
    labels = {"protocol": protocol, "model": model, "json": json_data, "streaming": streaming, "command": command}
    if rows:
        parsed: dict[str, Any] = {k: float(v) for k, v in rows[-1].items() if _number(v)}
        counts = _counts(done.stdout)
        return parsed | (counts[-1] if counts else {}) | {"stable": done.returncode == 0} | labels
    said = done.stdout + done.stderr
    if "Failed to obtain stable measurement" in said:  # no CSV: whatever it printed of its windows
        return _last_window(said, level) | {"stable": False} | labels
    raise RuntimeError(f"perf_analyzer failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")


def _last_window(stdout: str, level: int) -> dict[str, Any]:
    """What perf_analyzer printed of its last window where it wrote no CSV (its windows never agreed)."""

    def last(pattern: str) -> float:
        found = re.findall(pattern, stdout, re.IGNORECASE)
        return float(found[-1]) if found else 0.0

    return {
        "Concurrency": float(level),
        "Inferences/Second": last(r"throughput: ([\d.]+) infer/sec"),  # "Pass [n] throughput: ..." too
        "p50 latency": last(r"p50 latency: (\d+) usec"),
        "p99 latency": last(r"p99 latency: (\d+) usec"),
        "Server Queue": last(r"queue (\d+) usec"),
        "Server Compute Input": last(r"compute input (\d+) usec"),
        "Server Compute Infer": last(r"compute infer (\d+) usec"),
        "Server Compute Output": last(r"compute output (\d+) usec"),
        "Server Overhead": last(r"\(overhead (\d+) usec"),
    }


def tensors_label(row: dict[str, Any]) -> str:
    """How a row's tensors went: JSON or binary over HTTP, raw over gRPC (a call each, or on streams)."""
    if row["protocol"] == "http":
        return "JSON" if row["json"] else "binary"
    if row.get("floor"):
        return "raw, answered at once without the model (`bench.grpc_floor`)"
    return "raw, streaming" if row.get("streaming") else "raw"


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_analyzer", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="host:port, no scheme")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="grpc")
    parser.add_argument("--model", default="cnn-bn")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--json", action="store_true", help="JSON tensors over HTTP (default: binary or raw)")
    parser.add_argument("--batch", type=int, default=1, help="rows per request")
    parser.add_argument("--streaming", action="store_true", help="gRPC: ModelStreamInfer instead of ModelInfer")
    args = parser.parse_args(argv)
    rows = run(args.url, args.protocol, args.model, args.concurrency, args.json, args.batch, streaming=args.streaming)
    json.dump(rows, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
