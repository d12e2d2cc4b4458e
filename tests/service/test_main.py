"""``python -m service``, the command ``make serve`` and the container run: start-up, logs, SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import KeepAliveLoad, affine_expected, infer_json, metric, start_service


def test_sigterm_finishes_every_accepted_request_then_exits(built_repository: Path) -> None:
    # A 1.5 s batch delay holds the accepted requests in the queue when SIGTERM arrives.
    process, url = start_service(built_repository, NORMSERVE_MAX_QUEUE_DELAY_MS="1500", NORMSERVE_DRAIN_S="0")
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    responses: list[httpx.Response] = []

    def send(i: int) -> None:
        responses.append(
            httpx.post(f"{url}/v2/models/affine/infer", json=infer_json("x", x + i, id=str(i)), timeout=30)
        )

    senders = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in senders:
        thread.start()
    deadline = time.monotonic() + 20
    while metric(url, "normserve_pending_requests", model="affine", version="1") < 4:  # all four accepted and queued
        assert time.monotonic() < deadline, "the requests were never queued"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.post(f"{url}/v2/models/affine/infer", json=infer_json("x", x), timeout=5)
    for thread in senders:
        thread.join(timeout=30)
    _, log = process.communicate(timeout=30)
    assert process.returncode == 0, log  # a clean shutdown
    assert sorted(r.status_code for r in responses) == [200] * 4
    for response in responses:
        y = np.array(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 3)
        np.testing.assert_allclose(y, affine_expected(x + int(response.json()["id"]))[0], rtol=1e-6)
    assert "Traceback" not in log and "stopped" in log


def test_sigterm_drains_readiness_first_and_loses_no_request_it_accepted(built_repository: Path) -> None:
    """Open-loop load through SIGTERM and into the drain: readiness turns 503 at once, every request is
    still answered (with Connection: close, so keep-alive clients reconnect elsewhere), then the listener
    closes and new connections are refused; the process exits 0."""
    process, url = start_service(built_repository, NORMSERVE_DRAIN_S="2")
    with KeepAliveLoad(url, np.ones((1, 4), dtype=np.float32)) as load:
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        ready = httpx.get(f"{url}/v2/health/ready")
        assert ready.status_code == 503 and "draining" in ready.json()["error"]
        time.sleep(1.0)  # the load runs on into the drain, as clients that have not yet seen readiness do
    outcomes = load.outcomes
    _, log = process.communicate(timeout=40)
    assert process.returncode == 0, log
    assert not [o for o in outcomes if o.startswith("lost")], outcomes
    assert "200 close" in outcomes and set(outcomes) <= {"200 keep-alive", "200 close"}
    with pytest.raises(httpx.ConnectError):  # the listener is closed
        httpx.get(f"{url}/v2/health/live", timeout=2)
    assert "draining for 2 s" in log and "drained: closing the listener" in log and "Traceback" not in log


def test_json_logs_carry_the_request_id(built_repository: Path) -> None:
    process, url = start_service(built_repository, NORMSERVE_JSON_LOGS="1", NORMSERVE_LOG_LEVEL="debug")
    try:
        response = httpx.post(
            f"{url}/v2/models/affine/infer",
            json=infer_json("x", np.ones((1, 5), np.float32)),
            headers={"X-Request-ID": "trace-me-42"},
        )
        assert response.status_code == 400
    finally:
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=30)
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert records, log
    assert all({"time", "level", "logger", "message", "request_id"} <= set(r) for r in records)
    traced = [r for r in records if r["request_id"] == "trace-me-42"]
    assert traced and "shape" in traced[0]["message"]
    # the request's id stays its own: what the server logs afterwards (its shutdown) does not carry it
    after = [r for r in records if "draining" in r["message"] or r["message"] == "stopped"]
    assert after and all(r["request_id"] != "trace-me-42" for r in after), after
    assert any("starting on http://127.0.0.1" in r["message"] and "/docs" in r["message"] for r in records)
