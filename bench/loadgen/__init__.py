"""A load generator for Open Inference Protocol servers: open and closed loop, windows, tail-true percentiles.

``python -m bench.loadgen --help`` for the command line; ``run_levels`` to drive it from Python.
"""

from bench.loadgen.driver import Load, Target, encode_request
from bench.loadgen.run import LevelResult, RunConfig, run_level, run_levels
from bench.loadgen.samples import ModelSignature, build_requests, fetch_signature, read_signature
from bench.loadgen.stats import Window, is_stable, summarize

__all__ = [
    "Load",
    "Target",
    "encode_request",
    "LevelResult",
    "RunConfig",
    "run_level",
    "run_levels",
    "ModelSignature",
    "build_requests",
    "fetch_signature",
    "read_signature",
    "Window",
    "is_stable",
    "summarize",
]
