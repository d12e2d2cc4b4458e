"""``python -m bench.suite``: the command line of the suite."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import bench.suite
from bench.suite.plan import FULL, ROOT, SMOKE
from bench.suite.scenarios import OVERLOAD_SIZES, Suite, overload, perf_analyzer_part, run_suite
from bench.suite.writing import git_commit, overload_markdown, perf_markdown, write_report

__all__ = ["main"]


def _cores(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c != ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.suite",
        description=bench.suite.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--artifacts", type=Path, default=ROOT / "artifacts", help="checkpoints, for the unfolded graphs")
    p.add_argument("--tiny", default="cnn-bn", help="the tiny model (default %(default)s)")
    p.add_argument("--large", default="resnet18-bn", help="the large model (default %(default)s)")
    p.add_argument("--server-cores", type=_cores, default=[0], help="cores for the servers (default 0)")
    p.add_argument("--generator-cores", type=_cores, default=[1], help="cores for the load generator (default 1)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md", help="the document to write")
    p.add_argument("--smoke", action="store_true", help="seconds-long windows: checks the suite runs, measures nothing")
    p.add_argument(
        "--only",
        choices=["overload", "perf"],
        help="run one part alone (overload: T7; perf: perf_analyzer over HTTP and gRPC, T8): print its tables, "
        "write its results to --json, leave --doc as it is",
    )
    p.add_argument("--json", type=Path, help="with --only: where to write the part's results")
    args = p.parse_args(argv)

    available = sorted(os.sched_getaffinity(0))
    wanted = set(args.server_cores) | set(args.generator_cores)
    if shutil.which("taskset") is None or not wanted <= set(available) or len(available) < 2:
        print(
            f"warning: cannot pin to cores {sorted(wanted)} (this process may use {available}); unpinned",
            file=sys.stderr,
        )
        args.server_cores, args.generator_cores = [], []
    if args.generator_cores:
        os.sched_setaffinity(0, args.generator_cores)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the overload part opens 1,024 connections
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    suite = Suite(
        SMOKE if args.smoke else FULL,
        args.repository.resolve(),
        args.tiny,
        args.large,
        args.artifacts.resolve(),
        args.server_cores,
        args.generator_cores,
        {
            "command": " ".join(["python -m bench.suite", *(argv if argv is not None else sys.argv[1:])]),
            "commit": git_commit(),  # what was measured, as it was when the run began
        },
    )
    started = time.perf_counter()
    if args.only == "overload":
        results = suite.results | {"overload": [overload(suite, *size) for size in OVERLOAD_SIZES]}
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(overload_markdown(results))
        return 0
    if args.only == "perf":
        results = suite.results | {"plan": asdict(suite.plan), "perf_analyzer": perf_analyzer_part(suite)}
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(perf_markdown(results))
        return 0
    results = run_suite(suite)
    results["suite_seconds"] = round(time.perf_counter() - started, 1)
    write_report(results, args.doc, smoke=args.smoke)
    print(f"wrote {args.doc} in {results['suite_seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
