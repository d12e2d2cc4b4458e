"""bench.batchnorm_accuracy: every held-out digit counted once, at every batch size, through the endpoint."""

from __future__ import annotations

import json

import httpx
import numpy as np

from bench.batchnorm_accuracy import held_out_digits, main, measure
from models.data import load_splits
from tests.service.conftest import RunningServer

CNN = "tiny-cnn-bn"


def test_the_shipped_digits_are_the_held_out_split() -> None:
    x, y = held_out_digits()
    data = load_splits()
    np.testing.assert_array_equal(x, data.x_test)
    np.testing.assert_array_equal(y, data.y_test)


def test_every_sample_is_counted_once_in_batches_of_exactly_the_size(server: RunningServer) -> None:
    x, y = held_out_digits()
    x, y = x[:21], y[:21]
    seen: list[int] = []
    with httpx.Client(base_url=server.url, event_hooks={"request": [lambda r: seen.append(_rows(r))]}) as client:
        result = measure(client, CNN, x, y, 8)
        alone = measure(client, CNN, x, y, 1)
    assert seen == [8, 8, 8] + [1] * 21  # 21 = 8 + 8 + 5 new rows, the last batch filled up from the start
    assert result["samples"] == 21 and result["requests"] == 3
    # Running statistics do not care about the batch; batch statistics do.
    assert result["running_accuracy"] == alone["running_accuracy"]
    assert 0 <= result["batch_accuracy"] <= 1 and 0 <= result["changed_predictions"] <= 21


def _rows(request: httpx.Request) -> int:
    return int(json.loads(request.content)["inputs"][0]["shape"][0])


def test_a_model_without_the_endpoint_fails_with_the_servers_message(server: RunningServer, capsys) -> None:
    assert main(["--url", server.url, "--models", "affine", "--batch-sizes", "2"]) == 1
    assert "HTTP 400" in capsys.readouterr().err
