"""bench/locustfile.py: locust, run headless in a subprocess, against a real server.

Locust is never imported here: it monkey-patches the standard library with gevent on import,
which would break every test that runs after it in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import RunningServer

pytestmark = pytest.mark.slow  # locust as a subprocess: make test runs it, make test-fast leaves it out

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "bench" / "locustfile.py"
MODEL = "tiny-cnn-bn"


def run_locust(url: str, stats: Path, model: str, data: str) -> tuple[subprocess.CompletedProcess[str], list[Any]]:
    """Run the locustfile headless for 3 s with 3 users; its exit and the stats it saved."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}  # only the flags below
    env |= {"NORMSERVE_LOCUST_MODEL": model, "NORMSERVE_LOCUST_DATA": data, "NORMSERVE_LOCUST_WAIT_S": "0"}
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", url]
    command += ["--headless", "-u", "3", "-r", "3", "-t", "3s", "--stop-timeout", "5", "--json-file", str(stats)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    saved = stats.with_name(stats.name + ".json")  # locust adds the suffix
    return done, json.loads(saved.read_text()) if saved.exists() else []


@pytest.mark.parametrize("data", ["json", "binary"])
def test_locust_drives_the_model_without_failures(server: RunningServer, tmp_path: Path, data: str) -> None:
    done, stats = run_locust(server.url, tmp_path / "stats", MODEL, data)
    output = f"locust exited {done.returncode}:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, output
    (entry,) = stats
    assert entry["name"] == f"/v2/models/{MODEL}/infer [{data}]", output
    assert entry["method"] == "POST"
    assert entry["num_requests"] > 0, output
    assert entry["num_failures"] == 0, output
    assert (
        server.metric("normserve_request_success_total", model=MODEL, version="1", protocol="http")
        == entry["num_requests"]
    )


def test_unknown_model_stops_locust_at_start(server: RunningServer, tmp_path: Path) -> None:
    done, stats = run_locust(server.url, tmp_path / "stats", "no-such-model", "json")
    assert done.returncode == 1, done.stderr[-4000:]
    assert "answered 404: unknown model 'no-such-model'" in done.stderr
    assert not any(entry["num_requests"] for entry in stats)
