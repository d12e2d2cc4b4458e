"""scikit-learn's bundled handwritten digits, split once for every script.

``load_digits`` ships with scikit-learn (1,797 images of 8x8, pixel values 0..16): nothing is
downloaded. Images are scaled to [0, 1] and shaped (N, 1, 8, 8); the split is stratified and
seeded, so training, export and serving all see the same held-out test set.

    python -m models.data --write-demo-digits service/static/demo/digits.json

writes the held-out test split as JSON for the service's demo page (the service has no scikit-learn).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

__all__ = ["SPLIT_SEED", "DigitSplits", "load_splits", "PIXEL_SCALE", "LABELS", "demo_digits", "write_demo_digits"]

SPLIT_SEED = 20261121
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15
PIXEL_SCALE = 16.0  # load_digits pixels are integers 0..16
LABELS = [str(d) for d in range(10)]


@dataclass(frozen=True)
class DigitSplits:
    x_train: np.ndarray  # (N, 1, 8, 8) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int64
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    indices: tuple[np.ndarray, np.ndarray, np.ndarray]  # rows of load_digits() in train, val, test


@cache
def load_splits() -> DigitSplits:
    """Return the fixed train / validation / test split (about 70 / 15 / 15 %, stratified)."""
    digits = load_digits()
    x = (digits.images / PIXEL_SCALE).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = digits.target.astype(np.int64)
    rest, test = train_test_split(np.arange(len(y)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    train, val = train_test_split(
        rest, test_size=VAL_FRACTION / (1 - TEST_FRACTION), random_state=SPLIT_SEED, stratify=y[rest]
    )
    arrays = [a for idx in (train, val, test) for a in (x[idx], y[idx])]
    for a in (*arrays, train, val, test):
        a.flags.writeable = False
    return DigitSplits(*arrays, indices=(train, val, test))


def demo_digits() -> dict[str, Any]:
    """The held-out test split as the demo page reads it: pixels as load_digits' integers 0..16."""
    s = load_splits()
    images = np.rint(s.x_test.reshape(len(s.x_test), 64) * PIXEL_SCALE).astype(int)
    return {
        "source": "scikit-learn load_digits, the held-out test split of models/data.py",
        "pixel_scale": int(PIXEL_SCALE),
        "images": images.tolist(),
        "targets": s.y_test.tolist(),
    }


def write_demo_digits(path: Path) -> int:
    """Write ``demo_digits()`` to ``path``, one image a line so that a change shows in a diff; return how many."""
    digits = demo_digits()
    head = {k: v for k, v in digits.items() if k not in ("images", "targets")}
    lines = [json.dumps(head)[:-1] + ","]
    lines.append('"images": [')
    lines.append(",\n".join(json.dumps(image) for image in digits["images"]))
    lines.append("],")
    lines.append(f'"targets": {json.dumps(digits["targets"])}}}')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return len(digits["targets"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-demo-digits", type=Path, metavar="PATH", help="write the held-out split as JSON")
    args = parser.parse_args(argv)
    if args.write_demo_digits is None:
        parser.error("nothing to do: pass --write-demo-digits PATH")
    count = write_demo_digits(args.write_demo_digits)
    print(f"{count} held-out digits written to {args.write_demo_digits}")


if __name__ == "__main__":
    main()
