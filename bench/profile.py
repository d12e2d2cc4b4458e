"""Reading other tools' output: py-spy's raw samples (where a server's core goes) and wrk's summary."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

__all__ = ["OTHER", "STAGES", "parse_wrk", "summarize_raw"]

# What each sample was doing: the first stage (from the innermost frame outwards) a frame matches, the
# rules of one frame in this order. py-spy names a frame "function (file:line)" (native calls such as
# orjson.loads or np.concatenate are counted in the Python frame that made them).
# fmt: off
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("onnxruntime", ("onnxruntime/", "Runtime.run ")),
    ("metrics", ("prometheus_client/", "service/metrics.py")),
    ("logging", ("logging/", "service/logs.py")),
    ("result split", ("_split (service/batcher",)),
    (
        "batch assembly",
        ("_assemble (service/batcher", "Batcher._take ", "Batcher._execute", "Batcher._drained ", "Batcher._taken "),
    ),
    ("response encoding and write",
     ("encode_infer_response ", "response_headers ", "AnsweredHere.respond ", "send_response ")),
    ("tensor build", ("_from_json ", "_from_binary ", "_check_shape", "check_infer_document ", "_requested_outputs ")),
    ("JSON parse", ("_json ", "_split_body ", "parse_infer_request ")),
    (
        "body read",
        ("BodyReader", "read_request_body ", "request_body_reader ", "inflated ", "_check_content_type ",
         "check_json_header ", "body_limit ", "_decompress ", "service/bodies.py", "RequestHeaders"),
    ),
    (
        "admission and queueing",
        ("Batcher.admit ", "Batcher.refusal ", "Batcher.enqueue ", "Batcher.submit ", "Batcher.expected_latency_s ",
         "Batcher._expire ", "Batcher._dequeued ", "service/intake.py", "InferenceEndpoint.admission ", "_admission "),
    ),
    ("access check", ("service/access.py",)),
    ("inference endpoint", ("service/routes/inference.py", "service/app.py", "AnsweredHere")),
    ("HTTP and the transport guard", ("uvicorn/", "httptools", "service/transport.py")),
    # a batcher yielding to the loop while it waits for more requests to join its batch, and the loop itself
    ("event loop's own work", ("Batcher._settle ", "Batcher._work ", "asyncio/", "uvloop")),
]
# fmt: on
OTHER = "the rest"


def _stage(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, patterns in STAGES:
            if any(p in frame for p in patterns):
                return stage
    return OTHER


def summarize_raw(raw: str, top: int = 12) -> dict[str, Any]:
    """py-spy's ``--format raw`` (one ``frame;frame;...;frame count`` line per stack) as shares of samples:
    by area of the server, and the functions with the most samples of their own."""
    stages: Counter[str] = Counter()
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
        stages[_stage(frames)] += count
        own[re.sub(r":\d+\)$", ")", frames[-1])] += count
    if not total:
        return {"samples": 0, "stages": {}, "own": []}

    def share(n: int) -> float:
        return round(100 * n / total, 1)

    return {
        "samples": total,
        "stages": {stage: share(n) for stage, n in stages.most_common()},
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
