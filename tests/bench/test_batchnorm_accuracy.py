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
    answers: list[tuple[np.ndarray, dict]] = []  # each request's batch, and the endpoint's answer to it

    def keep(response: httpx.Response) -> None:
        response.read()
        batch = json.loads(response.request.content)["inputs"][0]
        answers.append((np.array(batch["data"], dtype=np.float32).reshape(batch["shape"]), response.json()))

    with httpx.Client(base_url=server.url, event_hooks={"response": [keep]}) as client:
        result = measure(client, CNN, x, y, 8)
    assert [len(batch) for batch, _ in answers] == [8, 8, 8]
    # 21 = 8 + 8 + 5 new rows: the last batch is filled up from the start, and only its new rows count.
    np.testing.assert_array_equal(np.concatenate([b for b, _ in answers])[:21], x)
    np.testing.assert_array_equal(answers[2][0][5:], x[:3])
    kept = {side: np.concatenate([a[side]["predictions"] for _, a in answers])[:21] for side in ("running", "batch")}
    changed = np.concatenate([a["changed"] for _, a in answers])[:21]
    assert result == {
        "model": CNN,
        "batch_size": 8,
        "samples": 21,
        "requests": 3,
        "running_accuracy": float((kept["running"] == y).mean()),
        "batch_accuracy": float((kept["batch"] == y).mean()),
        "changed_predictions": int(changed.sum()),
    }


def test_a_model_without_the_endpoint_fails_with_the_servers_message(server: RunningServer, capsys) -> None:
    assert main(["--url", server.url, "--models", "affine", "--batch-sizes", "2"]) == 1
    assert "HTTP 400" in capsys.readouterr().err
