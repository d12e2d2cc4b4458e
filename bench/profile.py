"""Reading other tools' output: py-spy's raw samples (where a server's core goes) and wrk's summary."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from service.compiled import MODULES

__all__ = ["OTHER", "STAGES", "parse_wrk", "summarize_raw"]

# What each sample was doing: the first stage (from the innermost frame outwards) a frame matches, the
# rules of one frame in this order. py-spy names a Python frame "Class.function (file.py:line)" and, with
# --native, a frame of the compiled request path (service/compiled.py) "function (module.c:line)", with no
# class; both read here as "service/module.py:function" (see _frame), so one rule matches either. A rule
# "service/module.py:function" matches that function and what is defined in it, "service/module.py:" the
# whole module, any other rule any frame with it in its name. Other native frames (orjson, numpy, libc,
# the interpreter) are counted in the first frame outside them that a rule matches.
# fmt: off
_ANSWERED_HERE = ("message_event", "set", "begin", "add", "complete", "_step", "_submit", "_answer", "_fail")
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("onnxruntime", ("onnxruntime/", "service/runtime.py:run")),
    ("metrics", ("prometheus_client/", "service/metrics.py:")),
    ("logging", ("logging/", "service/logs.py:")),
    ("result split", ("service/batcher.py:_split",)),
    (
        "batch assembly",
        ("service/batcher.py:_assemble", "service/batcher.py:_take",
         "service/batcher.py:_drained", "service/batcher.py:_taken", "service/batcher.py:_wait_for_rows"),
    ),
    ("response encoding and write",
     ("service/protocol.py:encode_infer_response", "service/routes/inference.py:response_headers",
      "service/transport.py:respond", "service/routes/inference.py:send_response")),
    ("tensor build", ("service/protocol.py:_from_json", "service/protocol.py:_from_binary",
                      "service/protocol.py:_check_shape", "service/protocol.py:check_infer_document",
                      "service/protocol.py:_requested_outputs")),
    ("JSON parse", ("service/protocol.py:_json", "service/protocol.py:_split_body",
                    "service/protocol.py:parse_infer_request")),
    (
        "body read",
        (*(f"service/routes/inference.py:{f}" for f in (
            "add", "body", "declare", "read_request_body", "request_body_reader", "inflated", "_check_content_type",
            "check_json_header", "body_limit", "_decompress", "from_raw", "receive_body")), "service/bodies.py:"),
    ),
    (
        "admission and queueing",
        (*(f"service/batcher.py:{f}" for f in (
            "admit", "refusal", "enqueue", "submit", "expected_latency_s", "_expire", "_expire_due", "_arm_expiry",
            "_dequeued")),
         "service/intake.py:", "service/routes/inference.py:admission", "service/transport.py:_admission"),
    ),
    ("access check", ("service/access.py:",)),
    (
        "inference endpoint",
        ("service/routes/inference.py:", "service/app.py:", *(f"service/transport.py:{f}" for f in _ANSWERED_HERE)),
    ),
    ("HTTP and the transport guard", ("uvicorn/", "httptools", "service/transport.py:")),
    # a batcher yielding to the loop while it waits for more requests to join its batch, and the loop itself
    ("event loop's own work", ("service/batcher.py:_settle", "service/batcher.py:_work", "asyncio/", "uvloop")),
]
# fmt: on
OTHER = "the rest"

# The C file Cython wrote for each compiled module: "inference.c" -> "service/routes/inference.py". (service's
# metrics.c and prometheus_client's share a name, and a stage: the later one names both.)
_COMPILED_SOURCES = {m.rpartition(".")[2] + ".c": m.replace(".", "/") + ".py" for m in MODULES}
_FRAME = re.compile(r"(?P<function>\S+) \((?P<file>[^:()]+)(?::\d+)?\)")


def _frame(frame: str) -> str:
    """A frame of normserve's own, Python or compiled, as "service/module.py:function", the function's class
    left out; any other frame, and Cython's own helpers, as py-spy wrote it.

    py-spy reads a compiled function's name from its C symbol, which it does not always strip to the
    function: "_assemble", "batcher__assemble" (with its module), "RequestHeaders_from_raw" (with its class)."""
    match = _FRAME.fullmatch(frame)
    if match is None:
        return frame
    function, file = match["function"], match["file"]
    if file in _COMPILED_SOURCES:
        if function.startswith(("__Pyx", "__pyx")):
            return frame
        module = file.removesuffix(".c")
        function, separator = function.removeprefix(f"{module}_"), "_"
        file = _COMPILED_SOURCES[file]
    elif file.startswith("service/"):
        separator = "."
    else:
        return frame
    head, _, rest = function.partition(separator)
    if rest and head[:1].isupper():  # a method: its class's name first
        function = rest
    return f"{file}:{function}"


def _own(frame: str) -> bool:
    """A frame the "own" table names: Python's, or a compiled function's (not Cython's helpers, libc's or the
    interpreter's, whose time is their caller's)."""
    match = _FRAME.fullmatch(frame)
    if match is None:
        return False
    if match["file"] in _COMPILED_SOURCES:
        return not match["function"].startswith(("__Pyx", "__pyx"))
    return match["file"].endswith(".py")


def _matches(key: str, rule: str) -> bool:
    if not rule.startswith("service/") or rule.endswith(":"):
        return rule in key
    return key == rule or key.startswith(rule + ".")


# Where a thread waits, asleep: py-spy --native samples such a thread as if it ran (without --native it leaves
# idle threads out), so a sample whose innermost frames are one of these waits is left out: the event loop in
# epoll with nothing to do, an executor's worker waiting for work.
_WAITS = ("epoll_wait", "epoll_pwait", "PyThread_acquire_lock_timed", "pthread_cond_wait", "pthread_cond_timedwait",
          "sem_wait", "sem_timedwait", "sem_clockwait")  # fmt: skip
_WAIT_DEPTH = 4  # innermost frames looked at: the wait's own, and libc's beneath it


def _waiting(frames: list[str]) -> bool:
    return any(wait in frame for frame in frames[-_WAIT_DEPTH:] for wait in _WAITS)


def _stage(frames: list[str]) -> str:
    for frame in reversed(frames):
        key = _frame(frame)
        for stage, rules in STAGES:
            if any(_matches(key, rule) for rule in rules):
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
        if not frames or _waiting(frames):
            continue
        total += count
        stages[_stage(frames)] += count
        innermost = next((f for f in reversed(frames) if _own(f)), frames[-1])
        own[re.sub(r":\d+\)$", ")", innermost)] += count
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
