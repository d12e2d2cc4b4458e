"""Replicas behind a real HAProxy (Debian's) on loopback, with the project's own configuration: an open-loop
load through a rolling restart of every replica loses nothing, and HAProxy's own view shows each replica
taken out before it stopped and put back after it was ready."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.fleet import CONFIG, Fleet, haproxy, measure

pytestmark = [
    pytest.mark.slow,  # three servers and a rolling restart: make test runs it, make test-fast leaves it out
    pytest.mark.skipif(haproxy() is None, reason="no haproxy: `make debian-tools` installs Debian's"),
]
ROOT = Path(__file__).resolve().parents[2]


def test_the_configuration_is_valid_haproxy(tmp_path: Path) -> None:
    env = os.environ | {
        "HAPROXY_BIND": ":8000",  # as the image sets it
        "HAPROXY_STATS_SOCKET": str(tmp_path / "s.sock"),
        **{f"NORMSERVE_{i}": f"normserve-{i}:8000" for i in (1, 2, 3)},
    }
    done = subprocess.run([str(haproxy()), "-c", "-f", str(CONFIG)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # and the compose file's HAProxy is given every address the configuration reads
    services = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    assert set(services["haproxy"]["environment"]) == {"NORMSERVE_1", "NORMSERVE_2", "NORMSERVE_3"}
    assert all(services[f"normserve-{i}"]["profiles"] == ["fleet"] for i in (1, 2, 3))


def test_a_rolling_restart_under_load_loses_nothing(built_repository: Path) -> None:
    with Fleet(built_repository, drain_s=2.0) as fleet:
        result = measure(fleet, "tiny-cnn-bn", rate=100, before_s=2.0, after_s=1.0)
    assert_nothing_lost(result, at_least=100)


def assert_nothing_lost(result: dict[str, Any], at_least: int) -> None:
    """``bench.fleet.measure``'s result: every request answered, and by HAProxy's own view each replica taken
    out before it stopped and put back once it was ready."""
    assert result["errors"] == {}, result["error_samples"]
    assert result["answered"] == result["sent"] > at_least
    events = result["replica_events"]
    assert sorted(events) == ["normserve-1", "normserve-2", "normserve-3"]
    for name, at in events.items():
        # HAProxy took it out (readiness 503 from the SIGTERM) before it stopped, and back once it was ready
        assert at["out"] is not None and at["sigterm"] <= at["out"] < at["stopped"], (name, at)
        assert at["back"] is not None and at["back"] >= at["ready"] - 0.5, (name, at)
