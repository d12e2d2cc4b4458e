"""Every scenario of the suite, each measured with the load generator against a server of ``servers``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.fleet import Fleet, haproxy
from bench.fleet import measure as fleet_measure
from bench.loadgen.driver import Target, encode_request
from bench.loadgen.report import machine
from bench.loadgen.run import LevelResult, RunConfig, cpu_seconds, run_levels
from bench.loadgen.samples import ModelSignature, build_requests, read_signature
from bench.perf_analyzer import binary as perf_binary
from bench.perf_analyzer import run as perf_run
from bench.perf_analyzer import tensors_label
from bench.suite.plan import ROOT, Plan
from bench.suite.servers import Server, free_port, http_get, metric_samples, running
from service import compiled

__all__ = ["OVERLOAD_SIZES", "Suite", "overload", "perf_analyzer_part", "run_suite"]


@dataclass
class Suite:
    plan: Plan
    repository: Path
    tiny: str
    large: str
    artifacts: Path
    server_cores: list[int]
    generator_cores: list[int]
    results: dict[str, Any]

    @property
    def taskset(self) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, self.server_cores))] if self.server_cores else []

    @property
    def threads(self) -> int:
        return len(self.server_cores) or os.cpu_count() or 1

    def normserve(self, module: str = "service", pinned: bool = True, **env: str) -> Server:
        """normserve on the server cores (``pinned``; else on every core, the generator's too)."""
        port = free_port()
        settings = {
            "NORMSERVE_REPOSITORY": str(self.repository),
            "NORMSERVE_PORT": str(port),
            "NORMSERVE_INTRA_OP_THREADS": str(self.threads),
            "NORMSERVE_LOG_LEVEL": "warning",
            "NORMSERVE_GRPC_PORT": "0",  # HTTP is measured here; 8001 may be another server's
        }
        every = sorted(set(self.server_cores) | set(self.generator_cores))  # this process runs on the generator's
        taskset = self.taskset if pinned else (["taskset", "-c", ",".join(map(str, every))] if every else [])
        return Server("normserve", [*taskset, sys.executable, "-m", module], settings | env, port, "/v2/health/ready")

    def uvicorn(self, name: str, app: str, **env: str) -> Server:
        port = free_port()
        argv = [*self.taskset, sys.executable, "-m", "uvicorn", app, "--port", str(port), "--log-level", "warning"]
        argv += ["--no-access-log", "--loop", "uvloop", "--http", "httptools"]
        return Server(name, argv, env, port, "/openapi.json" if "naive" in app else "/")

    def signature(self, model: str) -> ModelSignature:
        return read_signature(self.repository / model / "config.json")

    def config(self, window_s: float | None = None, **overrides: Any) -> RunConfig:
        plan = self.plan
        base = RunConfig(
            warmup_s=plan.warmup_s, window_s=window_s or plan.window_s, max_windows=plan.max_windows, progress=False
        )
        return replace(base, **overrides)

    def measure(
        self,
        server: Server,
        model: str,
        encoding: str,
        levels: list[tuple[str, float]],
        path: str | None = None,
        config: RunConfig | None = None,
        batch: int = 1,
    ) -> list[dict[str, Any]]:
        """Each level in turn, with the server's CPU per request and, for normserve, the part of it
        spent inside onnxruntime (its compute-duration metric) and outside."""
        target = Target.parse(server.url, path or f"/v2/models/{model}/infer")
        bodies = build_requests(self.signature(model), encoding, batch)
        requests = [encode_request(target, b, h) for b, h in bodies]
        rows = []
        for mode, level in levels:
            run_config = replace(config or self.config(), server_pid=server.pid)
            before = _server_counters(server)
            started, generator = time.monotonic(), time.process_time()
            (result,) = run_levels(target, requests, [(mode, level)], run_config)
            wall = time.monotonic() - started
            after = _server_counters(server)
            after["generator_cpu_s"], after["wall_s"] = time.process_time() - generator, wall
            rows.append(_level_row(result, before, after))
            _progress(f"{server.name} {model} {encoding} {mode} {level:g}", rows[-1])
        return rows


def _server_counters(server: Server) -> dict[str, float]:
    counters = {"cpu_s": cpu_seconds(server.pid)}
    if server.name != "normserve":
        return counters
    for sample in metric_samples(server.url):
        if sample.name == "normserve_compute_duration_seconds_sum":
            counters["compute_s"] = counters.get("compute_s", 0.0) + sample.value
        elif sample.name == "normserve_request_success_total":
            counters["requests"] = counters.get("requests", 0.0) + sample.value
    return counters


def _level_row(result: LevelResult, before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The level's summary, with the server's CPU per request and, where known, the 200s the server itself
    counted per second over the whole level (warm-up and drain included: the generator's own count lags
    when it is the bottleneck) and the share of a core the generator used."""
    row = result.summary()
    row["windows_detail"] = [w.row() for w in result.windows]
    requests = after.get("requests", 0.0) - before.get("requests", 0.0)
    if wall := after.get("wall_s"):
        row["generator_cpu"] = round(after["generator_cpu_s"] / wall, 3)
        if "requests" in after:
            row["server_throughput"] = round(requests / wall, 1)
    if requests > 0 and "compute_s" in after:
        cpu = (after["cpu_s"] - before["cpu_s"]) * 1000 / requests
        compute = (after["compute_s"] - before["compute_s"]) * 1000 / requests
        row["cpu_per_request_ms"] = {"total": round(cpu, 4), "onnxruntime": round(compute, 4)}
        row["cpu_per_request_ms"]["outside_onnxruntime"] = round(cpu - compute, 4)
    return row


def _progress(what: str, row: dict[str, Any]) -> None:
    latency = row["latency_ms"]
    errors = sum(row["errors"].values())
    print(
        f"  {what}: {row['throughput']:,.1f} req/s, p50 {latency['p50']} ms, p99 {latency['p99']} ms, errors {errors}",
        file=sys.stderr,
        flush=True,
    )


def _closed(levels: tuple[int, ...]) -> list[tuple[str, float]]:
    return [("concurrency", float(c)) for c in levels]


IDLE_SPIN_US = 0  # NORMSERVE_IDLE_SPIN_US of the one-connection run beside the default (200): the spin off


def run_suite(suite: Suite) -> dict[str, Any]:
    plan, results = suite.plan, suite.results
    results["machine"] = machine() | {"server_cores": suite.server_cores, "generator_cores": suite.generator_cores}
    # normserve's servers run from this tree, with this environment: what this process finds, they find
    results["compiled"] = compiled.describe()
    results["plan"] = asdict(plan)
    results["models"] = {"tiny": suite.tiny, "large": suite.large}
    tiny_levels = _closed(plan.tiny_concurrency)

    print("start-up and memory", file=sys.stderr)
    startups, server = [], suite.normserve()
    for _ in range(plan.startups - 1):
        startups.append(round(server.start(), 3))
        server.stop()
    with running(server):
        startups.append(round(server.startup_s, 3))
        rss_ready = server.rss_mb()
        memory_run = suite.measure(
            server,
            suite.tiny,
            "json",
            [("concurrency", float(max(plan.tiny_concurrency)))],
            config=suite.config(requests=plan.memory_requests, warmup_s=0.0),
        )
        results["memory"] = {
            "rss_ready_mb": rss_ready,
            "rss_after_mb": server.rss_mb(),
            "requests": memory_run[0]["ok"] + sum(memory_run[0]["errors"].values()),
        }
        results["startup_s"] = startups
        results["provider"] = json.loads(http_get(f"{server.url}/v2/models/{suite.tiny}")[1]).get("provider")

        print("tiny model", file=sys.stderr)
        for encoding in ("json", "binary"):
            closed = suite.measure(server, suite.tiny, encoding, tiny_levels)
            saturated = closed[-1]["throughput"]
            rates = [("rate", round(saturated * f, 1)) for f in plan.rate_fractions if saturated * f > 0]
            duration = plan.window_s * 3
            open_ = suite.measure(server, suite.tiny, encoding, rates, config=suite.config(duration_s=duration))
            results[f"tiny_{encoding}"] = {"closed": closed, "open": open_}

        print("large model, batching on", file=sys.stderr)
        large_config = suite.config(window_s=plan.large_window_s)
        large_levels = _closed(plan.large_concurrency)
        results["large_binary_batching"] = suite.measure(
            server, suite.large, "binary", large_levels, config=large_config
        )
        middle = [("concurrency", float(plan.large_concurrency[len(plan.large_concurrency) // 2]))]
        results["large_json"] = suite.measure(server, suite.large, "json", middle, config=large_config)

        results["profile"] = {
            encoding: profile(suite, server, plan.profile_s, encoding) for encoding in ("json", "binary")
        }
        results["wrk"] = {"normserve": wrk(suite, server, suite.tiny)}

    print("large model, batching off", file=sys.stderr)
    no_batching = json.dumps({suite.large: {"max_batch_size": 1}})
    with running(suite.normserve(NORMSERVE_MODELS=no_batching)) as server:
        results["large_binary_no_batching"] = suite.measure(
            server, suite.large, "binary", large_levels, config=large_config
        )

    print("one connection, the idle spin off", file=sys.stderr)
    with running(suite.normserve(NORMSERVE_IDLE_SPIN_US=str(IDLE_SPIN_US))) as server:
        results["tiny_spin"] = {
            "idle_spin_us": IDLE_SPIN_US,
            **{encoding: suite.measure(server, suite.tiny, encoding, _closed((1,))) for encoding in ("json", "binary")},
        }

    print("baselines", file=sys.stderr)
    model_file = suite.repository / suite.tiny / "1" / "model.onnx"
    naive = suite.uvicorn("naive", "bench.naive_app:app", NAIVE_MODEL=str(model_file), NAIVE_THREADS=str(suite.threads))
    with running(naive):
        results["naive"] = suite.measure(naive, suite.tiny, "json", tiny_levels)
    with running(suite.uvicorn("bare", "bench.bare_asgi:app")) as bare:
        results["bare"] = suite.measure(bare, suite.tiny, "json", tiny_levels, path="/")
        # the same app read the binary request's smaller body: the HTTP floor of the binary encoding
        results["bare_binary"] = suite.measure(bare, suite.tiny, "binary", tiny_levels, path="/")
        results["wrk"]["bare"] = wrk(suite, bare, suite.tiny, path="/")

    print("the one-core limit, its parts side by side", file=sys.stderr)
    results["limit"] = limit_part(suite)

    print("overload", file=sys.stderr)
    results["overload"] = [overload(suite, *size) for size in OVERLOAD_SIZES]

    print("perf_analyzer, HTTP and gRPC", file=sys.stderr)
    results["perf_analyzer"] = perf_analyzer_part(suite)

    print("worker processes", file=sys.stderr)
    results["workers"] = workers_part(suite)

    print("a fleet behind HAProxy, rolling restart", file=sys.stderr)
    results["fleet"] = fleet_part(suite)

    print("in-process onnxruntime and graph variants", file=sys.stderr)
    results["inprocess"] = {
        "tiny": inprocess(suite, model_file, plan.tiny_batches),
        "large": inprocess(suite, suite.repository / suite.large / "1" / "model.onnx", plan.large_batches),
    }
    results["graphs"] = graph_variants(suite)
    return results


# -- the one-core limit, side by side -------------------------------------------------------------

LIMIT_CONNECTIONS = (1, 16, 64)  # T9's levels: the p50 at one connection, the share of the limit at the others


def limit_part(suite: Suite) -> dict[str, Any]:
    """T9's three parts measured side by side: in each of ``plan.limit_rounds`` rounds, at each level and
    encoding, the bare ASGI app and normserve in turn, a few seconds each, with onnxruntime alone (the tiny
    model at batch 1 and at its largest batch, on the server's core) measured before the level and again after
    it. A shared machine's speed drifts over minutes, and the rest of the suite measures the three parts many
    minutes apart; within a level the drift falls on both sides of each ratio alike: its onnxruntime figures
    are the mean of the two taken around it, and the pair's order alternates from round to round, so that
    neither side is always measured first. T9 judges the medians over the rounds."""
    plan = suite.plan
    config = suite.config(duration_s=plan.limit_s)
    model_file = suite.repository / suite.tiny / "1" / "model.onnx"
    largest = plan.tiny_batches[-1]
    rounds = []
    with running(suite.normserve()) as ours, running(suite.uvicorn("bare", "bench.bare_asgi:app")) as bare:
        alone = inprocess(suite, model_file, (1, largest))["batches"]
        for index in range(plan.limit_rounds):
            levels: dict[str, dict[str, Any]] = {}
            for encoding in ("json", "binary"):
                for conns in LIMIT_CONNECTIONS:
                    level = [("concurrency", float(conns))]
                    order = ("bare", "normserve") if index % 2 == 0 else ("normserve", "bare")
                    measured: dict[str, Any] = {}
                    for name in order:
                        server, path = (bare, "/") if name == "bare" else (ours, None)
                        (measured[name],) = suite.measure(server, suite.tiny, encoding, level, path, config)
                    after = inprocess(suite, model_file, (1, largest))["batches"]
                    levels.setdefault(encoding, {})[str(conns)] = measured | {
                        "row_us": (alone[str(largest)]["row_us"] + after[str(largest)]["row_us"]) / 2,
                        "batch1_ms": (alone["1"]["batch_ms"] + after["1"]["batch_ms"]) / 2,
                    }
                    alone = after
            rounds.append({"batch": largest, "levels": levels})
    return {"rounds": rounds}


# -- overload -------------------------------------------------------------------------------------

# Overload is measured at two request sizes of the tiny model: one row as JSON, where HTTP is most of a
# request's cost, and 64 rows (its largest batch, or fewer where it allows fewer) as binary, where
# onnxruntime is. Capacity is measured closed loop, with enough connections to keep the queue full.
OVERLOAD_SIZES = (("json", 1, 64), ("binary", 64, 8))  # encoding, rows a request, closed-loop connections
OVERLOAD_DEADLINE_MS = 500  # NORMSERVE_REQUEST_TIMEOUT_MS: what a request may wait, queue included


def overload(suite: Suite, encoding: str, rows: int, closed_connections: int) -> dict[str, Any]:
    """Capacity closed loop (before the open-loop levels and again after them: the mean of the two is the
    capacity), then open loop at multiples of it over many connections: goodput (200s per second), how fast
    refusals come and whether they say when to retry, how long the server took over the requests it
    answered (from its own histogram), server RSS."""
    plan = suite.plan
    config_json = json.loads((suite.repository / suite.tiny / "config.json").read_text())
    rows = min(rows, int(config_json["max_batch_size"]))
    server = suite.normserve(NORMSERVE_REQUEST_TIMEOUT_MS=str(OVERLOAD_DEADLINE_MS))
    closed_level = [("concurrency", float(closed_connections))]
    with running(server):
        rss_ready = server.rss_mb()
        closed = suite.measure(server, suite.tiny, encoding, closed_level, batch=rows)
        rates = [("rate", round(closed[0]["throughput"] * m, 1)) for m in plan.overload_multiples]
        config = suite.config(duration_s=plan.overload_s, connections=plan.overload_connections, drop_backlog=True)
        open_ = []
        for level in rates:
            before = _served_in_time(server, suite.tiny, OVERLOAD_DEADLINE_MS)
            (row,) = suite.measure(server, suite.tiny, encoding, [level], config=config, batch=rows)
            after = _served_in_time(server, suite.tiny, OVERLOAD_DEADLINE_MS)
            served = after[1] - before[1]
            row["server_in_deadline"] = round((after[0] - before[0]) / served, 5) if served else None
            open_.append(row)
        # Again after the open-loop levels: a shared machine's speed drifts over a minute, and the levels are
        # judged against the mean of the two.
        closed += suite.measure(server, suite.tiny, encoding, closed_level, batch=rows)
    capacity = sum(row["throughput"] for row in closed) / len(closed)
    server_capacity = sum(row.get("server_throughput", 0.0) for row in closed) / len(closed)
    for row, multiple in zip(open_, plan.overload_multiples, strict=True):
        row["multiple"] = multiple
        row["goodput_ratio"] = round(row["throughput"] / capacity, 4) if capacity else 0.0
        if server_capacity and "server_throughput" in row:
            row["server_goodput_ratio"] = round(row["server_throughput"] / server_capacity, 4)
    return {
        "model": suite.tiny,
        "encoding": encoding,
        "rows": rows,
        "capacity": capacity,
        "server_capacity": server_capacity,
        "deadline_ms": OVERLOAD_DEADLINE_MS,
        "connections": plan.overload_connections,
        "rss_ready_mb": rss_ready,
        "closed": closed,
        "open": open_,
    }


def _served_in_time(server: Server, model: str, deadline_ms: int) -> tuple[float, float]:
    """The server's count of ``model``'s 200s answered within ``deadline_ms`` of their headers (its
    request-duration histogram has a bucket there), and of all its 200s."""
    bound, within, total = deadline_ms / 1000, 0.0, 0.0
    for sample in metric_samples(server.url):
        if sample.labels.get("model") != model:
            continue
        if sample.name == "normserve_request_duration_seconds_bucket" and float(sample.labels["le"]) == bound:
            within += sample.value
        elif sample.name == "normserve_request_duration_seconds_count":
            total += sample.value
    return within, total


# -- perf_analyzer --------------------------------------------------------------------------------

# What perf_analyzer sends: (protocol, JSON tensors, gRPC stream): JSON and binary over HTTP, raw over gRPC,
# a call each (ModelInfer) and on streams (ModelStreamInfer).
PERF_ENCODINGS = (("http", True, False), ("http", False, False), ("grpc", False, False), ("grpc", False, True))


def perf_analyzer_part(suite: Suite) -> dict[str, Any]:
    """Triton's perf_analyzer against normserve over HTTP and gRPC, both models, each concurrency of the plan:
    its throughput, latency percentiles and server-side breakdown (from the statistics extension)."""
    if perf_binary() is None:
        return {"rows": [], "missing": "no perf_analyzer: `make perf-analyzer` installs it"}
    grpc_port = free_port()
    server = suite.normserve(NORMSERVE_GRPC_PORT=str(grpc_port))
    rows = []
    levels = list(suite.plan.perf_concurrency)
    with running(server):
        for model in (suite.tiny, suite.large):
            # Not the large model's JSON: perf_analyzer's body for it is 3 MB of JSON, past the JSON limit
            # (NORMSERVE_MAX_JSON_BYTES, 2 MiB), which the server answers 413, as it should.
            for protocol, json_data, streaming in PERF_ENCODINGS if model == suite.tiny else PERF_ENCODINGS[1:]:
                url = f"127.0.0.1:{server.port if protocol == 'http' else grpc_port}"
                interval = suite.plan.perf_interval_ms
                for row in perf_run(url, protocol, model, levels, json_data, interval_ms=interval, streaming=streaming):
                    rows.append(row)
                    _progress_perf(row)
    return {"rows": rows, "grpc_floor": grpc_floor(suite, levels)}


def grpc_floor(suite: Suite, levels: list[int]) -> list[dict[str, Any]]:
    """perf_analyzer's gRPC calls to the tiny model, at each level, against normserve with ModelInfer answered at
    once (``bench.grpc_floor``): what a call costs before any inference, which T8's judgement reports."""
    grpc_port = free_port()
    rows = []
    with running(suite.normserve("bench.grpc_floor", NORMSERVE_GRPC_PORT=str(grpc_port))):
        url = f"127.0.0.1:{grpc_port}"
        for row in perf_run(url, "grpc", suite.tiny, levels, interval_ms=suite.plan.perf_interval_ms, version="1"):
            rows.append(row | {"floor": True})
            print(
                f"  gRPC floor, concurrency {row['Concurrency']:g}: {row['Inferences/Second']:,.1f} calls/s",
                file=sys.stderr,
                flush=True,
            )
    return rows


def _progress_perf(row: dict[str, Any]) -> None:
    tensors = tensors_label(row)
    what = f"{row['model']} {row['protocol']} {tensors} concurrency {row['Concurrency']:g}"
    print(
        f"  perf_analyzer {what}: {row['Inferences/Second']:,.1f} infer/s, p50 {row['p50 latency'] / 1000:.3f} ms, "
        f"p99 {row['p99 latency'] / 1000:.3f} ms",
        file=sys.stderr,
        flush=True,
    )


# -- worker processes and the fleet ---------------------------------------------------------------


def workers_part(suite: Suite) -> dict[str, Any]:
    """normserve with each NORMSERVE_WORKERS of the plan, on every core (on a small machine the generator
    shares them): the tiny model at the highest concurrency, JSON and binary, with the CPU per request of
    every process together (the design's overhead is its rise with workers) and each process's memory."""
    rows = []
    level = [("concurrency", float(max(suite.plan.tiny_concurrency)))]
    for workers in suite.plan.worker_counts:
        # onnxruntime's threads: each worker's share of the cores (workers x threads = the cores)
        server = suite.normserve(pinned=False, NORMSERVE_WORKERS=workers, NORMSERVE_INTRA_OP_THREADS="0")
        with running(server):
            memory = server.tree_rss_mb()
            for encoding in ("json", "binary"):
                (row,) = suite.measure(server, suite.tiny, encoding, level)
                # one process with one worker; a supervisor and its workers with more
                rows.append(row | {"workers": workers, "encoding": encoding, "rss_mb": memory})
    return {"rows": rows, "cores": len(set(suite.server_cores) | set(suite.generator_cores)) or os.cpu_count()}


def fleet_part(suite: Suite) -> dict[str, Any]:
    """Three replicas behind Debian's HAProxy on loopback, the project's configuration, an open-loop load of
    the tiny model through a rolling restart of every replica (``bench.fleet``)."""
    if haproxy() is None:
        return {"missing": "no haproxy: `make debian-tools` installs Debian's"}
    with Fleet(suite.repository, drain_s=suite.plan.fleet_drain_s) as fleet:
        return fleet_measure(fleet, suite.tiny, suite.plan.fleet_rate)


# -- in-process onnxruntime and graph variants ----------------------------------------------------


def inprocess(suite: Suite, model: Path, batches: tuple[int, ...], optimize: bool = True) -> dict[str, Any]:
    argv = [*suite.taskset, sys.executable, "-m", "bench.inprocess", str(model), "--json"]
    argv += ["--threads", str(suite.threads), "--seconds", str(suite.plan.inprocess_seconds), "--batches"]
    argv += [str(b) for b in batches]
    if not optimize:
        argv.append("--no-optimize")
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900, check=True)
    return dict(json.loads(done.stdout))


def graph_variants(suite: Suite) -> dict[str, Any]:
    """Batch-1 and largest-batch time of the served (folded) graph and of the model exported as it
    was trained (every BatchNorm a node), each with onnxruntime's graph optimizations off and on."""
    variants: dict[str, Any] = {}
    for role, model, batches in (
        ("tiny", suite.tiny, (1, suite.plan.tiny_batches[-1])),
        ("large", suite.large, (1,)),
    ):
        checkpoint = suite.artifacts / model / "checkpoint.pt"
        if not checkpoint.exists():
            variants[role] = {"model": model, "skipped": f"no checkpoint at {checkpoint} to export the unfolded graph"}
            continue
        with tempfile.TemporaryDirectory() as scratch:
            unfolded = Path(scratch) / "unfolded.onnx"
            bn_nodes = export_unfolded(checkpoint, unfolded)
            folded = suite.repository / model / "1" / "model.onnx"
            variants[role] = {"model": model, "batchnorm_nodes_unfolded": bn_nodes}
            for name, path in (("folded", folded), ("unfolded", unfolded)):
                for optimize in (False, True):
                    timing = inprocess(suite, path, batches, optimize)
                    variants[role][f"{name}, optimizations {'on' if optimize else 'off'}"] = timing["batches"]
    return variants


def export_unfolded(checkpoint: Path, out: Path) -> int:
    """Export the checkpoint's model as trained, BatchNorms and all; returns the BatchNormalization count."""
    import onnx
    import torch

    from export.build import verification_inputs
    from export.onnx_export import export_onnx, op_histogram
    from models.train import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    x, _, _ = verification_inputs(meta)
    proto = export_onnx(model, torch.tensor(x[:2]), optimize=False)
    onnx.save(proto, out)
    return op_histogram(proto).get("BatchNormalization", 0)


# -- profile and cross-check ----------------------------------------------------------------------


def profile(suite: Suite, server: Server, seconds: float, encoding: str = "json") -> dict[str, Any]:
    """Where normserve's core goes at the tiny model's highest concurrency: py-spy's samples by stage of a
    request's way through the server, with the server's CPU per request over the same load (each stage's
    share of it is its cost per request), and the functions with the most samples of their own."""
    from bench.profile import summarize_raw

    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        return {"skipped": "py-spy is not installed"}
    level = [("concurrency", float(max(suite.plan.tiny_concurrency)))]
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "profile.txt"
        argv = [py_spy, "record", "--pid", str(server.pid), "--duration", str(max(1, round(seconds)))]
        # --native: the compiled request path's frames are C functions (bench/profile.py reads them); it
        # stops the server for each sample (not --nonblocking), which costs it no CPU time of its own.
        argv += ["--rate", "250", "--format", "raw", "--output", str(raw), "--native"]
        spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        (row,) = suite.measure(
            server, suite.tiny, encoding, level, config=suite.config(duration_s=seconds, warmup_s=0.0)
        )
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0 or not raw.exists():
            return {"skipped": f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}"}
        cpu = row.get("cpu_per_request_ms", {}).get("total")
        return summarize_raw(raw.read_text()) | {"cpu_us_per_request": cpu * 1000 if cpu else None, "row": row}


def wrk(suite: Suite, server: Server, model: str, path: str | None = None) -> dict[str, Any] | None:
    """The same JSON request at the highest concurrency from wrk (C), when it is installed: shows how
    close the Python load generator comes to the HTTP ceiling."""
    if shutil.which("wrk") is None:
        return None
    connections = max(suite.plan.tiny_concurrency)
    body, headers = build_requests(suite.signature(model), "json", distinct=1)[0]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        argv = ["taskset", "-c", ",".join(map(str, suite.generator_cores))] if suite.generator_cores else []
        argv += ["wrk", "-t1", f"-c{connections}", f"-d{suite.plan.wrk_s}s", "--latency"]
        argv += ["-s", str(ROOT / "bench" / "wrk" / "post.lua"), server.url + (path or f"/v2/models/{model}/infer")]
        env = os.environ | {"BODY_FILE": f.name, "CONTENT_TYPE": headers["Content-Type"]}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=suite.plan.wrk_s + 60)
    from bench.profile import parse_wrk

    return {"connections": connections, **parse_wrk(done.stdout)}
