import json
from pathlib import Path

import numpy as np

from models.data import PIXEL_SCALE, demo_digits, load_splits

DEMO_DIGITS = Path(__file__).parents[2] / "service" / "static" / "demo" / "digits.json"


def test_split_is_fixed_disjoint_stratified_and_scaled() -> None:
    s = load_splits()
    sizes = [len(s.x_train), len(s.x_val), len(s.x_test)]
    assert sum(sizes) == 1797 and min(sizes) > 200
    assert s.x_train.shape[1:] == (1, 8, 8) and s.x_train.dtype == np.float32
    assert 0.0 <= s.x_train.min() and s.x_train.max() <= 1.0
    # disjoint and complete: every image of load_digits in exactly one split
    train, val, test = (set(i.tolist()) for i in s.indices)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(1797))
    # every class in every split, in proportion
    for y in (s.y_train, s.y_val, s.y_test):
        counts = np.bincount(y, minlength=10)
        assert counts.min() >= 0.8 * counts.mean()
    # the same split when made again (seeded, not a cached accident)
    load_splits.cache_clear()
    again = load_splits()
    np.testing.assert_array_equal(again.y_test, s.y_test)
    np.testing.assert_array_equal(again.x_test, s.x_test)


def test_demo_page_ships_exactly_the_held_out_split() -> None:
    shipped = json.loads(DEMO_DIGITS.read_text())
    assert shipped == demo_digits(), "regenerate it: python -m models.data --write-demo-digits " + str(DEMO_DIGITS)
    s = load_splits()
    images = np.array(shipped["images"], dtype=np.float32).reshape(-1, 1, 8, 8) / shipped["pixel_scale"]
    assert shipped["pixel_scale"] == PIXEL_SCALE
    np.testing.assert_array_equal(images, s.x_test)
    np.testing.assert_array_equal(shipped["targets"], s.y_test)
