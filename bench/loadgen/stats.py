"""Measurement windows: latency histograms that keep the tail, errors by status, and the stability rule.

Latencies go into an HDR histogram (1 µs to 10 minutes at 3 significant digits): every value,
the slowest included, lands in a bucket no wider than 0.1 % of it, so p99.9 and max are as true
as the median. Only successful (2xx) answers carry a latency; the rest are counted by status, and
refusals (503) also get a histogram of their own, from the send: how fast a server says no.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ["PERCENTILES", "Window", "new_histogram", "is_stable", "summarize"]

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
LOWEST_US, HIGHEST_US, DIGITS = 1, 600_000_000, 3
ERROR_SAMPLE_CHARS = 200


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


@dataclass
class Window:
    """What completed between ``start`` and ``end`` (seconds on the generator's clock)."""

    start: float
    end: float = 0.0
    histogram: HdrHistogram = field(default_factory=new_histogram)
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)
    server_cpu_s: float | None = None  # CPU the server used in the window, when its pid is known
    refusals: HdrHistogram = field(default_factory=new_histogram)  # 503s: from the send to the answer
    # 2xx from the send (open loop: without the wait for a free connection, with the time in the server's
    # and the kernel's hands), those carried over from the warm-up included
    sent: HdrHistogram = field(default_factory=new_histogram)
    retry_after: int = 0  # 503s that came with Retry-After
    # Successful answers in the window to requests sent (or due) before the measurement began: work the
    # server did in the window, so they count for throughput, not for latency. Without them the first
    # window would miss a latency's worth of answers, and a server whose answers take 0.5 s in 6 s of
    # windows would be charged 8 % less throughput than it delivered.
    carried: int = 0

    def record(self, status: int, latency_s: float, body: bytes = b"", response_s: float | None = None) -> None:
        """One answer: its latency if it succeeded (and, given ``response_s``, its time from the send), else
        its status (and the first body seen for it)."""
        if 200 <= status < 300:
            self.histogram.record_value(_us(latency_s))
            self.sent.record_value(_us(latency_s if response_s is None else response_s))
            self.ok += 1
        else:
            self.fail(str(status), body.decode("utf-8", "replace"))

    def carry(self, response_s: float) -> None:
        """A success to a request sent or due before the measurement began: it counts for throughput, and its
        time from the send (the server's and the kernel's part, which is the same whenever it was due)."""
        self.carried += 1
        self.sent.record_value(_us(response_s))

    def refused(self, response_s: float, retry_after: bool) -> None:
        """A 503 (already counted by ``record``): how fast it came from the send, and whether it said when to retry."""
        self.refusals.record_value(_us(response_s))
        self.retry_after += retry_after

    def fail(self, reason: str, detail: str = "", count: int = 1) -> None:
        """Requests that got no usable answer: an HTTP status, or ``timeout`` / ``connection`` / ``unanswered``."""
        self.errors[reason] += count
        self.error_samples.setdefault(reason, detail[:ERROR_SAMPLE_CHARS])

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def throughput(self) -> float:
        """Successful answers per second, those carried over from the warm-up included."""
        return (self.ok + self.carried) / self.duration if self.duration > 0 else 0.0

    def latency_ms(self, percentile: float) -> float:
        return float(self.histogram.get_value_at_percentile(percentile)) / 1000 if self.ok else float("nan")

    def row(self) -> dict[str, Any]:
        """The window as one flat record (for progress lines, CSV and JSON)."""
        return {
            "start_s": round(self.start, 3),
            "duration_s": round(self.duration, 3),
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "throughput": round(self.throughput, 1),
            "p50_ms": round(self.latency_ms(50), 3),
            "p99_ms": round(self.latency_ms(99), 3),
        }


def _us(seconds: float) -> int:
    return min(max(int(seconds * 1e6), LOWEST_US), HIGHEST_US)


def is_stable(windows: list[Window], tolerance: float = 0.10, count: int = 3) -> bool:
    """Triton perf_analyzer's rule: the last ``count`` windows' throughput and median latency each lie
    within ``tolerance`` of their mean over those windows."""
    if len(windows) < count:
        return False
    last = windows[-count:]
    if any(w.ok == 0 for w in last):
        return False
    for values in ([w.throughput for w in last], [w.latency_ms(50) for w in last]):
        mean = sum(values) / count
        if any(abs(v - mean) > tolerance * mean for v in values):
            return False
    return True


def summarize(windows: list[Window], drained: Window | None = None) -> dict[str, Any]:
    """Throughput over ``windows``; latency and errors over them and over ``drained``, the answers that
    came after the last window closed (requests sent in time, still charged for their wait)."""
    histogram, refusals, sent = new_histogram(), new_histogram(), new_histogram()
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    retry_after = 0
    for w in [*windows, *([drained] if drained else [])]:
        histogram.add(w.histogram)
        refusals.add(w.refusals)
        sent.add(w.sent)
        retry_after += w.retry_after
        errors.update(w.errors)
        for reason, text in w.error_samples.items():
            samples.setdefault(reason, text)
    seconds = sum(w.duration for w in windows)
    ok = sum(w.ok for w in windows)
    carried = sum(w.carried for w in windows)
    count = histogram.get_total_count()
    summary: dict[str, Any] = {
        "windows": len(windows),
        "seconds": round(seconds, 3),
        "ok": ok,
        "throughput": round((ok + carried) / seconds, 1) if seconds else 0.0,
        "carried": carried,
        "latency_ms": {
            **{f"p{p:g}": float(histogram.get_value_at_percentile(p)) / 1000 if count else None for p in PERCENTILES},
            "max": float(histogram.get_max_value()) / 1000 if count else None,
            "mean": round(histogram.get_mean_value() / 1000, 4) if count else None,
        },
        "from_send_ms": {
            f"p{p:g}": float(sent.get_value_at_percentile(p)) / 1000 if sent.get_total_count() else None
            for p in (50.0, 99.0)
        },
        "errors": dict(sorted(errors.items())),
        "error_samples": samples,
        "answered_after_end": drained.ok + sum(drained.errors.values()) if drained else 0,
    }
    if refused := refusals.get_total_count():
        summary["refused"] = {
            "count": refused,
            "p50_ms": float(refusals.get_value_at_percentile(50)) / 1000,
            "p99_ms": float(refusals.get_value_at_percentile(99)) / 1000,
            "with_retry_after": round(retry_after / refused, 4),
        }
    cpu = [w.server_cpu_s for w in windows]
    if ok and all(c is not None for c in cpu):
        summary["server_cpu_ms_per_request"] = round(sum(c for c in cpu if c is not None) * 1000 / ok, 4)
    return summary
