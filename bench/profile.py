"""Reading other tools' output: py-spy's raw samples (where a server's core goes) and wrk's summary."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

__all__ = ["AREAS", "summarize_raw", "parse_wrk"]

# What each sample was doing: the first area (from the innermost frame outwards) a frame matches.
AREAS: list[tuple[str, tuple[str, ...]]] = [
    ("onnxruntime", ("onnxruntime/", "Runtime.run ")),
    ("request parsing", ("parse_infer_request", "read_body", "_decompress")),
    ("response encoding", ("encode_infer_response",)),
    ("metrics", ("prometheus_client/", "service/metrics.py")),
    ("batching", ("service/batcher.py",)),
    ("inference endpoint", ("service/routes/inference.py", "service/app.py")),
    ("HTTP (uvicorn, httptools)", ("uvicorn/protocols/", "uvicorn/middleware/", "httptools")),
]
OTHER = "event loop, sockets and the rest"


def _area(frames: list[str]) -> str:
    for frame in reversed(frames):
        for area, patterns in AREAS:
            if any(p in frame for p in patterns):
                return area
    return OTHER


def summarize_raw(raw: str, top: int = 12) -> dict[str, Any]:
    """py-spy's ``--format raw`` (one ``frame;frame;...;frame count`` line per stack) as shares of samples:
    by area of the server, and the functions with the most samples of their own."""
    areas: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        areas[_area(frames)] += count
        own[re.sub(r":\d+\)$", ")", frames[-1])] += count
    if not total:
        return {"samples": 0, "areas": {}, "own": []}

    def share(n: int) -> float:
        return round(100 * n / total, 1)

    return {
        "samples": total,
        "areas": {area: share(n) for area, n in areas.most_common()},
        "own": [[frame, share(n)] for frame, n in own.most_common(top)],
    }


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """Throughput, p50/p99 and non-2xx count from ``wrk --latency``'s output."""
    result: dict[str, Any] = {}
    for line in out.splitlines():
        fields = line.split()
        if line.startswith("Requests/sec:"):
            result["throughput"] = float(fields[1])
        elif len(fields) == 2 and fields[0] in ("50%", "99%"):
            result[f"p{fields[0][:-1]}_ms"] = _ms(fields[1])
        elif "Non-2xx" in line:
            result["non_2xx"] = int(fields[-1])
    if "throughput" not in result:
        raise ValueError(f"wrk printed no Requests/sec: {out[-300:]!r}")
    return result
