"""A smoke run of the benchmark suite: every scenario for a fraction of a second, on the test models.

It checks that ``make bench`` runs end to end and writes a complete document; its figures mean
nothing and no timing is asserted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fleet import haproxy
from bench.perf_analyzer import binary as perf_binary

pytestmark = pytest.mark.slow  # the suite's smoke run: make test runs it, make test-fast leaves it out

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke(built_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    repository, artifacts = built_models
    doc = tmp_path_factory.mktemp("docs") / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nWritten by hand, kept.\n")
    command = [sys.executable, "-m", "bench.suite", "--smoke", "--repository", str(repository)]
    command += ["--tiny", "tiny-cnn-bn", "--large", "tiny-cnn-bn", "--artifacts", str(artifacts), "--doc", str(doc)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return doc, done.stderr


def test_the_suite_writes_every_section_and_keeps_the_text_around_it(smoke: tuple[Path, str]) -> None:
    doc, _ = smoke
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nWritten by hand, kept.\n")
    assert "smoke run" in text
    for heading in [
        "### Targets",
        "### Tiny model (tiny-cnn-bn): closed loop",
        "### Tiny model: open loop at fixed rates",
        "### Large model (tiny-cnn-bn)",
        "### Ceilings: onnxruntime in-process",
        "### Folded vs unfolded graphs",
        "### Memory and start-up",
        "### Where normserve's core goes",
        "### The one-core limit",
        "### Cross-check with wrk",
        "### Overload: goodput past capacity",
    ]:
        assert heading in text, heading
    for target in ["T1", "T2", "T3", "T4", "T5", "T6", "T7", "T9"]:
        assert f"| {target} |" in text
    assert "### Worker processes (`NORMSERVE_WORKERS`)" in text
    if haproxy() is not None:  # make test installs it (make debian-tools)
        assert "### A fleet behind HAProxy: rolling restart under load" in text and "back in HAProxy" in text
    if perf_binary() is not None:  # make test installs it: perf_analyzer's part, T8 and grpc.aio's floor beside it
        assert "### perf_analyzer: HTTP and gRPC" in text and "| T8 |" in text
        assert "answered at once without the model" in text and "grpc.aio's floor" in text
    assert "not measured" not in text  # the checkpoint is there, so the unfolded graph was exported
    for image in ["tiny.png", "large.png", "overload.png"]:
        assert (doc.parent / "bench" / image).read_bytes()[:4] == b"\x89PNG"


def test_every_scenario_ran_without_a_failed_request(smoke: tuple[Path, str]) -> None:
    doc, _ = smoke
    results = json.loads((doc.parent / "bench" / "suite.json").read_text())
    levels = [*results["tiny_json"]["closed"], *results["tiny_json"]["open"], *results["tiny_binary"]["closed"]]
    levels += [*results["tiny_binary"]["open"], *results["large_binary_batching"], *results["large_json"]]
    levels += [*results["large_binary_no_batching"], *results["naive"], *results["bare"], *results["bare_binary"]]
    assert len(levels) == 2 + 2 + 2 + 2 + 2 + 1 + 2 + 2 + 2 + 2
    for level in levels:
        assert level["ok"] > 0 and level["errors"] == {}, level
    workers = results["workers"]["rows"]
    assert [(w["workers"], w["encoding"]) for w in workers] == [(n, e) for n in ("1", "2") for e in ("json", "binary")]
    for row in workers:  # each worker count answered every request; two workers run as three processes
        assert row["ok"] > 0 and row["errors"] == {} and len(row["rss_mb"]) == (1 if row["workers"] == "1" else 3)
    if haproxy() is not None:  # through a rolling restart of every replica, nothing failed
        fleet = results["fleet"]
        assert fleet["errors"] == {} and fleet["answered"] == fleet["sent"] > 0
    sizes = results["overload"]
    assert [(o["encoding"], o["rows"]) for o in sizes] == [("json", 1), ("binary", 16)]  # tiny-cnn-bn takes 16 rows
    for overload in sizes:
        assert len(overload["closed"]) == 2  # capacity before the open-loop levels and after them
        for closed in overload["closed"]:
            assert closed["ok"] > 0 and closed["errors"] == {}
        for level in overload["open"]:  # past capacity: every answer a 200, or a 503 that says when to retry
            assert level["ok"] + level["carried"] > 0 and set(level["errors"]) <= {"503"}, level
            assert level.get("refused", {"with_retry_after": 1.0})["with_retry_after"] == 1.0
            assert level["server_rss_mb"] > 0
            # The server's own count of its 200s, beside the generator's, and how busy the generator was.
            assert level["server_throughput"] > 0 and level["server_goodput_ratio"] > 0
            assert 0 < level["generator_cpu"] <= 1.5
            # How many of them the server answered within the deadline, by its own histogram, and how many
            # due requests were never sent for want of a free connection.
            assert 0 < level["server_in_deadline"] <= 1 and level["unsent"] >= 0
    assert results["memory"]["requests"] == 300
    assert results["memory"]["rss_ready_mb"] > 0
    for row in results["tiny_json"]["closed"]:  # normserve's CPU is split into onnxruntime and the rest
        cpu = row["cpu_per_request_ms"]
        assert cpu["total"] == pytest.approx(cpu["onnxruntime"] + cpu["outside_onnxruntime"], abs=1e-3)
    graphs = results["graphs"]["tiny"]
    assert graphs["batchnorm_nodes_unfolded"] > 0
    assert set(graphs) >= {"folded, optimizations on", "unfolded, optimizations off"}
    for encoding in ("json", "binary"):  # where the core goes, by stage, with the CPU per request to price it
        profiled = results["profile"][encoding]
        assert (profiled["samples"] > 0 and profiled["cpu_us_per_request"] > 0) or shutil.which("py-spy") is None
