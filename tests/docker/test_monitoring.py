"""Compose, Prometheus and Grafana files (docker/): valid offline, and every query shows data for real.

Offline: the compose file against the compose spec, Prometheus's config and rules with promtool, a
promtool unit test for every alert, the dashboard as docker/grafana/dashboard.py writes it. For real:
Debian's prometheus on 127.0.0.1 scrapes a running normserve under traffic, and every PromQL
expression of the dashboard, and the signal of every alert, returns data through its HTTP API.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.service.conftest import RunningServer, free_port, infer_json

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="no promtool: `make debian-tools` installs Debian's prometheus"
)
sys.path.insert(0, str(DOCKER / "grafana"))
from dashboard import dashboard  # noqa: E402


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_signal(expr: str) -> str:
    """An alert's expression without its final comparison: the signal its threshold is applied to."""
    found = re.fullmatch(r"(.*?)\s*(?:==|!=|>=|<=|>|<)\s*[-0-9.e]+\s*", expr, flags=re.DOTALL)
    assert found, f"alert expression {expr!r} does not end in a comparison with a number"
    return found[1]


def dashboard_queries() -> list[tuple[str, str]]:
    """Every query of the dashboard, as Grafana sends it with this test's 1 s scrapes ($__rate_interval
    is at least four scrape intervals)."""
    saved = json.loads((DOCKER / "grafana" / "dashboards" / "normserve.json").read_text())
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", "4s"))
        for panel in saved["panels"]
        for target in panel["targets"]
    ]


def test_the_compose_file_follows_the_compose_spec_and_runs_normserve_as_the_image_expects() -> None:
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DOCKER / "compose.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    assert services["normserve-cpu"]["profiles"] == ["cpu"] and services["normserve-gpu"]["profiles"] == ["gpu"]
    devices = services["normserve-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name in ("normserve-cpu", "normserve-gpu"):
        service = services[name]
        assert service["read_only"] and service["stop_grace_period"] == "40s"
        assert service["networks"]["default"]["aliases"] == ["normserve"]
        assert any(v.endswith(":/models:ro") for v in service["volumes"])


@needs_promtool
def test_promtool_accepts_the_config_and_the_rules_and_every_alert_passes_its_unit_test() -> None:
    prometheus = DOCKER / "prometheus"
    for command in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ):
        result = subprocess.run([str(PROMTOOL), *command], capture_output=True, text=True, cwd=prometheus)
        assert result.returncode == 0, f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"
    tests = yaml.safe_load((prometheus / "alerts.test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert needs a unit test in which it fires"


def test_the_dashboard_is_what_its_generator_writes_on_the_provisioned_data_source() -> None:
    saved = json.loads((DOCKER / "grafana" / "dashboards" / "normserve.json").read_text())
    assert saved == dashboard(), "run `python docker/grafana/dashboard.py` and commit the result"
    datasource = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    titles = [panel["title"] for panel in saved["panels"]]
    for wanted in ("Throughput", "Request latency p50 / p99", "Rows per batch", "Queue depth", "Failures by reason"):
        assert wanted in titles
    assert {"Provider per model", "Model readiness"} <= set(titles)
    for panel in saved["panels"]:
        assert panel["datasource"]["uid"] == uid and panel["targets"]
        assert all(target["datasource"]["uid"] == uid and target["expr"] for target in panel["targets"])


@pytest.fixture
def prometheus(server: RunningServer, tmp_path: Path) -> Iterator[str]:
    """Debian's prometheus on a free loopback port, scraping ``server`` every second, with the alert rules."""
    if PROMETHEUS is None:
        pytest.skip("no prometheus: `make debian-tools` installs Debian's prometheus")
    shutil.copy(DOCKER / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "normserve", "static_configs": [{"targets": [server.host]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:  # listening and its storage open: it answers /-/ready
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "prometheus did not start"
        time.sleep(0.2)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        assert process.stderr is not None
        process.stderr.close()


def _traffic(url: str, until: float) -> None:
    """Concurrent requests (so batches form), with client errors and requests that cannot make their
    deadline among them (a 1 µs timeout: shorter than any batch takes, so answered 504 on arrival)."""
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() < until:
            client.post("/v2/models/tiny-cnn-bn/infer", json=infer_json("input", x))
            client.post("/v2/models/tiny-cnn-bn/infer", json=infer_json("input", x[:, :, :4]))  # 400
            client.post("/v2/models/affine/infer", json=infer_json("x", x[0, 0, :1, :4], parameters={"timeout": 1}))


def _query(prometheus: str, expr: str) -> list[Any]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    result: list[Any] = answer["data"]["result"]
    return result


@pytest.mark.slow  # a real prometheus
def test_every_dashboard_query_and_alert_signal_returns_data_from_a_real_prometheus(
    server: RunningServer, prometheus: str
) -> None:
    expressions = dashboard_queries() + [(rule["alert"], alert_signal(rule["expr"])) for rule in alert_rules()]
    # and what the KEDA ScaledObject scales on
    keda = yaml.safe_load((DOCKER / "k8s" / "scaledobject.yaml").read_text())["spec"]["triggers"][0]["metadata"]
    expressions.append(("KEDA trigger", keda["query"]))
    until = time.monotonic() + 12
    senders = [threading.Thread(target=_traffic, args=(server.url, until)) for _ in range(4)]
    for sender in senders:
        sender.start()
    empty = expressions
    deadline = time.monotonic() + 60
    try:
        while empty and time.monotonic() < deadline:
            time.sleep(1)
            empty = [(name, expr) for name, expr in empty if not _query(prometheus, expr)]
    finally:
        for sender in senders:
            sender.join()
    assert not empty, f"these queries return no data from a scraped, loaded server: {empty}"
    # The server's failures were seen by reason: the invalid inputs, and the 1 µs timeouts (504, not run).
    reasons = {r["metric"]["reason"] for r in _query(prometheus, "normserve_request_failure_total")}
    assert {"invalid_input", "deadline"} <= reasons
