"""What the suite runs and for how long: the full plan behind ``make bench`` and a seconds-long smoke plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["FULL", "ROOT", "SMOKE", "Plan"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Plan:
    """How long each part runs."""

    window_s: float
    warmup_s: float
    max_windows: int
    large_window_s: float
    tiny_concurrency: tuple[int, ...]
    large_concurrency: tuple[int, ...]
    rate_fractions: tuple[float, ...]  # of the saturated (concurrency 64) throughput
    memory_requests: int
    startups: int
    inprocess_seconds: float
    tiny_batches: tuple[int, ...]
    large_batches: tuple[int, ...]
    profile_s: float
    wrk_s: int
    overload_multiples: tuple[float, ...]  # open-loop rates, as multiples of the closed-loop capacity
    overload_connections: int
    overload_s: float
    perf_concurrency: tuple[int, ...]  # Triton's perf_analyzer, over HTTP and gRPC
    perf_interval_ms: int
    worker_counts: tuple[str, ...]  # NORMSERVE_WORKERS values measured
    fleet_rate: float  # requests a second through HAProxy during the rolling restart
    fleet_drain_s: float  # each replica's NORMSERVE_DRAIN_S
    limit_rounds: int  # T9's side-by-side rounds: onnxruntime alone, then bare ASGI and normserve at each level
    limit_s: float  # each level of a round, after its warm-up


FULL = Plan(
    window_s=2.0,
    warmup_s=2.0,
    max_windows=6,
    large_window_s=3.0,
    tiny_concurrency=(1, 16, 64),
    large_concurrency=(1, 8, 32),
    rate_fractions=(0.25, 0.5, 0.75, 0.9, 1.0, 1.2),
    memory_requests=100_000,
    startups=3,
    inprocess_seconds=1.5,
    tiny_batches=(1, 2, 4, 8, 16, 32, 64),
    large_batches=(1, 4, 8, 32),
    profile_s=8.0,
    wrk_s=8,
    overload_multiples=(1.5, 3.0, 10.0),
    overload_connections=1024,
    overload_s=6.0,
    perf_concurrency=(1, 16, 64),
    perf_interval_ms=2000,
    worker_counts=("1", "2", "auto"),
    fleet_rate=400.0,
    fleet_drain_s=5.0,
    limit_rounds=3,
    limit_s=3.0,
)
SMOKE = Plan(
    window_s=0.25,
    warmup_s=0.1,
    max_windows=2,
    large_window_s=0.25,
    tiny_concurrency=(1, 8),
    large_concurrency=(1, 4),
    rate_fractions=(0.5, 1.0),
    memory_requests=300,
    startups=1,
    inprocess_seconds=0.05,
    tiny_batches=(1, 4),
    large_batches=(1, 2),
    profile_s=1.0,
    wrk_s=1,
    overload_multiples=(3.0,),
    overload_connections=32,
    overload_s=0.5,
    perf_concurrency=(1,),
    perf_interval_ms=200,
    worker_counts=("1", "2"),
    fleet_rate=50.0,
    fleet_drain_s=1.0,
    limit_rounds=1,
    limit_s=0.25,
)
