"""
Held-out accuracy with running vs batch statistics, as the batchnorm endpoint answers it.

    make serve &
    python -m bench.batchnorm_accuracy                                  # cnn-bn and vit-bn at 1, 2, 64
    python -m bench.batchnorm_accuracy --models cnn-bn --batch-sizes 1 4 16 --url http://127.0.0.1:8000

The held-out test split (the digits the page shows, service/static/demo/digits.json) is cut into
consecutive batches of each size, in its stored (shuffled, stratified) order; the last batch is
filled up from the start of the split so that every batch has exactly that size, and only its new
rows are counted. Each batch is one request to POST /v2/models/{m}/batchnorm, which runs it with
the running statistics (the served graph) and with its own statistics (the batch-statistics
graph). A table goes to stdout; ``--out FILE`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

__all__ = ["held_out_digits", "measure", "main"]

DIGITS = Path(__file__).resolve().parent.parent / "service" / "static" / "demo" / "digits.json"


def held_out_digits(path: Path = DIGITS) -> tuple[np.ndarray, np.ndarray]:
    """The held-out test split as (N, 1, 8, 8) float32 in [0, 1] and (N,) labels."""
    data = json.loads(path.read_text())
    images = np.array(data["images"], dtype=np.float32).reshape(-1, 1, 8, 8) / data["pixel_scale"]
    return images, np.array(data["targets"])


def measure(client: httpx.Client, model: str, x: np.ndarray, y: np.ndarray, size: int) -> dict[str, Any]:
    """Accuracy of both statistics on every held-out sample, in batches of exactly ``size``."""
    running = batch = changed = 0
    starts = range(0, len(x), size)
    for start in tqdm(starts, desc=f"{model} batch {size}", unit="batch", leave=False):
        idx = (start + np.arange(size)) % len(x)
        response = client.post(
            f"/v2/models/{model}/batchnorm",
            json={
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [size, 1, 8, 8], "data": x[idx].ravel().tolist()}
                ]
            },
        )
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code}: {response.text[:300]}")
        answer = response.json()
        new = min(size, len(x) - start)  # rows that wrapped around were counted in the first batch
        truth = y[idx][:new]
        running += int((np.array(answer["running"]["predictions"][:new]) == truth).sum())
        batch += int((np.array(answer["batch"]["predictions"][:new]) == truth).sum())
        changed += sum(answer["changed"][:new])
    n = len(x)
    return {
        "model": model,
        "batch_size": size,
        "samples": n,
        "requests": len(starts),
        "running_accuracy": running / n,
        "batch_accuracy": batch / n,
        "changed_predictions": changed,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | batch size | running statistics | batch statistics | predictions changed |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['running_accuracy']:.2%} | {r['batch_accuracy']:.2%} | "
            f"{r['changed_predictions']} of {r['samples']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the normserve server")
    parser.add_argument("--models", nargs="+", default=["cnn-bn", "vit-bn"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 64])
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if any(s < 1 for s in args.batch_sizes):
        parser.error(f"batch sizes must be positive, got {args.batch_sizes}")
    x, y = held_out_digits()
    rows = []
    try:
        with httpx.Client(base_url=args.url, timeout=60) as client:
            for model in args.models:
                for size in args.batch_sizes:
                    rows.append(measure(client, model, x, y, size))
    except (httpx.HTTPError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
