"""Write docker/grafana/dashboards/normserve.json, the Grafana dashboard, from the panel list below.

    python docker/grafana/dashboard.py

Each panel is a title, a unit and PromQL queries over normserve's own metrics (service/metrics.py);
the tests run every query against a real Prometheus scraping a real server, so that no panel can
stay empty. Edit the list, run this, commit both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["PANELS", "dashboard", "main"]

OUT = Path(__file__).resolve().parent / "dashboards" / "normserve.json"
DATASOURCE = {"type": "prometheus", "uid": "normserve-prometheus"}  # provisioning/datasources/prometheus.yml


def _quantiles(histogram: str) -> list[tuple[str, str]]:
    """The p50 and p99 of one of normserve's histograms, by model."""
    rate = f"rate({histogram}_bucket[$__rate_interval])"
    return [(f"{{{{model}}}} p{q}", f"histogram_quantile(0.{q}, sum by (le, model) ({rate}))") for q in (50, 99)]


# (title, unit, kind, [(legend, PromQL)], description). $__rate_interval is Grafana's: at least four
# scrape intervals, so that rate() has samples whatever the scrape interval is.
PANELS: list[tuple[str, str, str, list[tuple[str, str]], str]] = [
    (
        "Throughput",
        "reqps",
        "timeseries",
        [("{{model}}", "sum by (model) (rate(normserve_request_success_total[$__rate_interval]))")],
        "Requests answered with 200 per second, by model.",
    ),
    (
        "Request latency p50 / p99",
        "s",
        "timeseries",
        _quantiles("normserve_request_duration_seconds"),
        "From a request's headers to its answer, in the server, for requests answered with 200.",
    ),
    (
        "Queue wait p50 / p99",
        "s",
        "timeseries",
        _quantiles("normserve_queue_duration_seconds"),
        "How long requests waited in their model's queue before their batch ran.",
    ),
    (
        "Compute per batch p50 / p99",
        "s",
        "timeseries",
        _quantiles("normserve_compute_duration_seconds"),
        "onnxruntime's time per batch.",
    ),
    (
        "Rows per batch",
        "short",
        "timeseries",
        [
            (
                "{{model}} mean",
                "sum by (model) (rate(normserve_batch_size_sum[$__rate_interval]))"
                " / sum by (model) (rate(normserve_batch_size_count[$__rate_interval]))",
            ),
            (
                "{{model}} p99",
                "histogram_quantile(0.99, sum by (le, model) (rate(normserve_batch_size_bucket[$__rate_interval])))",
            ),
        ],
        "Dynamic batching at work: how many rows each batch ran.",
    ),
    (
        "Queue depth",
        "short",
        "timeseries",
        [
            ("{{model}} queued", "sum by (model) (normserve_pending_requests)"),
            ("{{model}} fullest replica", "max by (model) (normserve_pending_requests / normserve_queue_limit)"),
        ],
        "Requests waiting, over all replicas, and the fullest replica's queue as a fraction of its limit "
        "(past 1, requests get 503).",
    ),
    (
        "Failures by reason",
        "reqps",
        "timeseries",
        [("{{model}} {{reason}}", "sum by (model, reason) (rate(normserve_request_failure_total[$__rate_interval]))")],
        "Errors per second: invalid_input, not_found, too_large and unsupported_media_type are the client's; "
        "overloaded, deadline, not_ready and internal the server's.",
    ),
    (
        "Provider per model",
        "short",
        "table",
        [("", "max by (model, version, provider) (normserve_model_provider) == 1")],
        "The execution provider each model version really runs on (CPU fallbacks included).",
    ),
    (
        "Model readiness",
        "short",
        "stat",
        [("{{model}} v{{version}}", "normserve_model_ready")],
        "1 when the model version serves.",
    ),
]


def _panel(index: int, title: str, unit: str, kind: str, queries: list[tuple[str, str]], text: str) -> dict[str, Any]:
    width = 24 if kind == "table" else 12
    return {
        "id": index + 1,
        "type": kind,
        "title": title,
        "description": text,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": width, "x": (index % 2) * 12 if width == 12 else 0, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            | ({"format": "table", "instant": True} if kind == "table" else {})
            for i, (legend, expr) in enumerate(queries)
        ],
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": "normserve",
        "title": "normserve",
        "description": "Throughput, latency, batching, queues, failures, providers and readiness of normserve",
        "tags": ["normserve", "inference"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "panels": [_panel(i, *p) for i, p in enumerate(PANELS)],
    }


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
