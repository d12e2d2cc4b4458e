"""``python -m service``, the command ``make serve`` and the container run: start-up, logs, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import affine_expected, free_port, infer_json, metric


def start_service(repository: Path, **env: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    environment = os.environ | {"NORMSERVE_REPOSITORY": str(repository), "NORMSERVE_PORT": str(port)} | env
    process = subprocess.Popen([sys.executable, "-m", "service"], env=environment, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the service did not become ready: {process.communicate()[1]}")


def test_sigterm_finishes_every_accepted_request_then_exits(built_repository: Path) -> None:
    # A 1.5 s batch delay holds the accepted requests in the queue when SIGTERM arrives.
    process, url = start_service(built_repository, NORMSERVE_MAX_QUEUE_DELAY_MS="1500")
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
    # uvicorn re-raises the signal once it has drained, so the exit reads "terminated by SIGTERM".
    assert process.returncode in (0, -signal.SIGTERM), log
    assert sorted(r.status_code for r in responses) == [200] * 4
    for response in responses:
        y = np.array(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 3)
        np.testing.assert_allclose(y, affine_expected(x + int(response.json()["id"]))[0], rtol=1e-6)
    assert "Traceback" not in log and "stopped" in log


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
    assert any("starting on http://127.0.0.1" in r["message"] and "/docs" in r["message"] for r in records)
