"""python -m service.healthcheck, the container's HEALTHCHECK: 0 only when the server says it is ready."""

from __future__ import annotations

import subprocess
import sys

from service.healthcheck import check
from tests.service.conftest import RunningServer, free_port


def test_ready_server_passes_and_a_closed_port_fails_with_the_reason(server: RunningServer) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    assert check(port) == (True, f"http://127.0.0.1:{port}/v2/health/ready: 200")
    ready, said = check(free_port())
    assert not ready and "Connection refused" in said


def test_the_command_exits_1_when_not_ready_and_0_when_ready(server: RunningServer) -> None:
    port = server.url.rsplit(":", 1)[1]
    ok = subprocess.run(
        [sys.executable, "-m", "service.healthcheck"], env={"NORMSERVE_PORT": port}, capture_output=True
    )
    assert ok.returncode == 0
    env = {"NORMSERVE_PORT": str(free_port())}
    down = subprocess.run([sys.executable, "-m", "service.healthcheck"], env=env, capture_output=True, text=True)
    assert down.returncode == 1 and "/v2/health/ready" in down.stderr
