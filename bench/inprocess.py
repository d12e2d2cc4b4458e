"""onnxruntime alone, in this process: the compute ceiling a server is measured against.

Times one model at several batch sizes with the service's own session options, on whatever
cores this process may use (pin it: ``taskset -c 0``). No HTTP, no parsing, no batching: what
is left when everything normserve adds costs nothing.

    taskset -c 0 python -m bench.inprocess model_repository/cnn-bn/1/model.onnx --batches 1 16 64
    taskset -c 0 python -m bench.inprocess unfolded.onnx --no-optimize --batches 1 --json

Each batch size is warmed up, then run in rounds of ``--seconds / 5``; the figure is the median
round's mean, so one slow round (the machine is shared) does not move it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.loadgen.samples import ModelSignature, digit_images
from service.runtime import session_options

__all__ = ["time_batches", "main"]

ROUNDS = 5


def _signature(session: ort.InferenceSession) -> ModelSignature:
    (spec,) = session.get_inputs()
    shape = [-1, *spec.shape[1:]]
    return ModelSignature.from_metadata(
        {"name": "model", "inputs": [{"name": spec.name, "datatype": "FP32", "shape": shape}], "outputs": []}
    )


def time_batches(
    model: Path,
    batches: list[int],
    threads: int = 1,
    optimize: bool = True,
    seconds: float = 1.0,
    feeds_for: Callable[[int], dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Per-batch and per-row time of ``model`` at each batch size, on real digits (or on
    ``feeds_for(batch)``, for a model whose inputs are not one image).

    Returns:
        ``{"batches": {b: {"batch_ms", "row_us", "rows_per_s"}}, "best": {...}}`` where ``best`` is the
        batch size with the most rows per second.
    """
    session = ort.InferenceSession(str(model), session_options(threads, optimize), providers=["CPUExecutionProvider"])
    if feeds_for is None:
        spec = _signature(session).input
        feeds_for = lambda batch: {spec.name: digit_images(batch, *spec.shape[1:])}  # noqa: E731
    results: dict[int, dict[str, float]] = {}
    for batch in batches:
        feeds = feeds_for(batch)
        for _ in range(3):
            session.run(None, feeds)
        rounds = []
        for _ in range(ROUNDS):
            runs, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds / ROUNDS or runs < 1:
                session.run(None, feeds)
                runs += 1
            rounds.append(elapsed / runs)
        per_batch = statistics.median(rounds)
        results[batch] = {
            "batch_ms": round(per_batch * 1e3, 4),
            "row_us": round(per_batch / batch * 1e6, 2),
            "rows_per_s": round(batch / per_batch, 1),
        }
    best = max(results, key=lambda b: results[b]["rows_per_s"])
    return {
        "model": str(model),
        "threads": threads,
        "optimize": optimize,
        "batches": results,
        "best": {"batch": best, **results[best]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.inprocess", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", type=Path, help="an ONNX file with one image input")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--no-optimize", action="store_true", help="onnxruntime graph optimizations off")
    p.add_argument("--seconds", type=float, default=1.0, help="measuring time per batch size (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    result = time_batches(args.model, args.batches, args.threads, not args.no_optimize, args.seconds)
    if args.json:
        print(json.dumps(result))
        return 0
    print("| batch | per batch | per row | rows/s |\n|---|---|---|---|")
    for batch, r in result["batches"].items():
        print(f"| {batch} | {r['batch_ms']:.3f} ms | {r['row_us']:.1f} µs | {r['rows_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
