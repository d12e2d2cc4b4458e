"""Triton's perf_analyzer against a server, from the venv ``make perf-analyzer`` builds, and its results read.

    python -m bench.perf_analyzer --url 127.0.0.1:8001 --protocol grpc --model cnn-bn --concurrency 1 16 64

perf_analyzer is a load tester nobody here wrote: it reads the model's metadata and config, sends random
inputs of the model's shapes (binary over HTTP, raw over gRPC; ``--json`` sends JSON over HTTP), and
reports throughput, latency percentiles and, from the statistics extension, where the server's time went
(queue, compute input, compute infer, compute output). Its CSV has one row per concurrency; its stdout
has the counts.
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

__all__ = ["binary", "environment", "run"]

ROOT = Path(__file__).resolve().parent.parent
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
    """Per concurrency, in order: the client's request count and the server's successful request count
    over perf_analyzer's measurement windows."""
    client = [int(n) for n in re.findall(r"^\s+Request count: (\d+)", stdout, re.M)]
    server = [int(n) for n in re.findall(r"^\s+Successful request count: (\d+)", stdout, re.M)]
    return [{"client_requests": c, "server_successes": s} for c, s in zip(client, server, strict=False)]


def run(
    url: str,
    protocol: str,
    model: str,
    concurrency: list[int],
    json_data: bool = False,
    batch: int = 1,
    interval_ms: int = 2000,
    timeout_s: float = 600,
) -> list[dict[str, Any]]:
    """One row per concurrency (one perf_analyzer run each): its CSV columns (microseconds;
    'Inferences/Second'), its counts, and the command that produced it."""
    path = binary()
    if path is None:
        raise FileNotFoundError("no perf_analyzer: `make perf-analyzer` installs it in .perf-venv")
    out = []
    for level in concurrency:
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
                "-f", str(report),
                "--verbose-csv",
            ]  # fmt: skip
            if json_data:
                argv += ["--input-tensor-format=json", "--output-tensor-format=json"]
            done = subprocess.run(argv, capture_output=True, text=True, env=environment(path), timeout=timeout_s)
            if done.returncode != 0:
                raise RuntimeError(
                    f"perf_analyzer failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}"
                )
            (row,) = list(csv.DictReader(io.StringIO(report.read_text())))
        parsed: dict[str, Any] = {k: float(v) for k, v in row.items() if _number(v)}
        counts = _counts(done.stdout)
        parsed |= counts[-1] if counts else {}
        command = " ".join(argv[1:]).replace(str(report), "report.csv")
        out.append(
            parsed | {"protocol": protocol, "model": model, "json": json_data, "command": f"perf_analyzer {command}"}
        )
    return out


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
    args = parser.parse_args(argv)
    rows = run(args.url, args.protocol, args.model, args.concurrency, args.json, args.batch)
    json.dump(rows, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
