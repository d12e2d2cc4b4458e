"""scikit-learn's bundled handwritten digits, split once for every script.

``load_digits`` ships with scikit-learn (1,797 images of 8x8, pixel values 0..16): nothing is
downloaded. Images are scaled to [0, 1] and shaped (N, 1, 8, 8); the split is stratified and
seeded, so training, export and serving all see the same held-out test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

__all__ = ["SPLIT_SEED", "DigitSplits", "load_splits", "PIXEL_SCALE", "LABELS"]

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
