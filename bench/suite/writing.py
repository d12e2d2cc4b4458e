"""The suite's results as markdown tables and plots, written into docs/benchmarks.md.

Only the text between the two markers is rewritten, so what people wrote around it (the design
notes, the analysis of a missed target) stays.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from bench.loadgen.report import ms, plot
from bench.perf_analyzer import MAX_TRIALS, tensors_label
from bench.suite.judging import (
    apart_limit_rows,
    limit_rows,
    overload_targets,
    p50_rounds,
    perf_targets,
    rate,
    targets,
)

__all__ = ["BEGIN", "END", "git_commit", "markdown", "overload_markdown", "perf_markdown", "write_report"]

BEGIN = "<!-- bench:begin: written by `make bench`; edit outside these markers -->"
END = "<!-- bench:end -->"


def _overload_rows(o: dict[str, Any]) -> list[list[Any]]:
    rows = [
        [
            f"closed loop, capacity ({when})",
            f"{closed['level']:g} conns",
            f"{closed['throughput']:,.0f}",
            f"{100 * closed['throughput'] / o['capacity']:.0f}%" if o["capacity"] else "-",
            f"{closed.get('server_throughput', 0):,.0f}",
            f"{100 * closed.get('server_throughput', 0) / o['server_capacity']:.0f}%" if o["server_capacity"] else "-",
            f"{100 * closed.get('generator_cpu', 0):.0f}%",
            "-",
            "-",
            "-",
            ms(closed["latency_ms"]["p50"]),
            ms(closed["latency_ms"]["p99"]),
            "-",
            "-",
            _errors(closed),
            "-",
            f"{closed.get('server_rss_mb', 0):.0f}",
        ]
        for closed, when in zip(o["closed"], ("before", "after"), strict=False)
    ]
    for row in o["open"]:
        refused = row.get("refused")
        in_time = row.get("server_in_deadline")
        rows.append(
            [
                f"{row['multiple']:g}x",
                f"{row['level']:,.0f}/s",
                f"{row['throughput']:,.0f}",
                f"{100 * row['goodput_ratio']:.0f}%",
                f"{row.get('server_throughput', 0):,.0f}",
                f"{100 * row.get('server_goodput_ratio', 0):.0f}%",
                f"{100 * row.get('generator_cpu', 0):.0f}%",
                f"{refused['count'] / row['seconds']:,.0f}" if refused else "0",
                ms(refused["p50_ms"]) if refused else "-",
                f"{100 * refused['with_retry_after']:.0f}%" if refused else "-",
                ms(row["latency_ms"]["p50"]),
                ms(row["latency_ms"]["p99"]),
                ms(row.get("from_send_ms", {}).get("p99")),
                "-" if in_time is None else f"{100 * in_time:.2f}%",
                _errors(row),
                f"{row.get('unsent', 0):,}",
                f"{row.get('server_rss_mb', 0):.0f}",
            ]
        )
    return rows


OVERLOAD_HEADER = [
    "load",
    "offered",
    "goodput req/s (client)",
    "of capacity",
    "200s/s (server)",
    "of capacity",
    "generator CPU",
    "503/s",
    "503 p50 ms",
    "Retry-After",
    "200 p50 ms (from due)",
    "200 p99 ms (from due)",
    "200 p99 ms (from send)",
    "200s within deadline (server)",
    "errors",
    "never sent",
    "server RSS MB",
]


def _overload_section(r: dict[str, Any], image: str) -> list[str]:
    sizes = r.get("overload")
    if not sizes:
        return []
    first = sizes[0]
    out = [
        "### Overload: goodput past capacity",
        "",
        f"{first['model']}, `NORMSERVE_REQUEST_TIMEOUT_MS={first['deadline_ms']}`, at two request sizes. Capacity "
        "is closed loop, measured before the open-loop levels and again after them (a shared machine's speed "
        "drifts over a minute: the mean of the two is the capacity the levels are judged against); then open "
        "loop at multiples of it over "
        f"{first['connections']:,} connections. Goodput is 200s per second, counted twice: by the generator (the "
        "answers that arrived in its measured windows) and by the server (`normserve_request_success_total`, over "
        "the whole level, warm-up and drain included). T7 is judged on the server's count. The generator is one "
        "Python process on one core (its CPU column). A due request goes out on a free connection or waits in the "
        "generator for one: 200s are timed from the due time (that wait included) and from the send (the time in "
        "the kernel's and the server's hands); \"200s within deadline\" is the server's own count, from each "
        "request's headers (`normserve_request_duration_seconds`). Requests still waiting for a connection when a "
        "level ends are never sent (their count is given). 503s are timed from the send. Past a model's fill of "
        "requests in flight normserve reads the keep-alive connections it answers no further until it answers more "
        "(`service/intake.py`): the excess waits unparsed instead of being refused, so 503s come only "
        "from new connections past the queue limit, and the wait shows in the time from the send.",
        "",
    ]
    for o in sizes:
        out += [
            f"**{o['rows']} row(s) a request, {o['encoding']}** (capacity closed loop at "
            f"{o['closed'][0]['level']:g} connections: {o['capacity']:,.0f} req/s, the mean of before and after):",
            "",
            _table(OVERLOAD_HEADER, _overload_rows(o)),
            "",
        ]
    out += [f"![overload: goodput and latency against offered load, both request sizes]({image})", ""]
    return out


def overload_markdown(r: dict[str, Any]) -> str:
    """The overload tables and their T7 rows alone (``python -m bench.suite --only overload``)."""
    rows = [[t["target"], t["goal"], t["measured"], "yes" if t["met"] else "**no**"] for t in overload_targets(r)]
    lines = _overload_section(r, "")[:-2]
    return "\n".join([*lines, _table(["target", "goal", "measured", "met"], rows), ""])


def plot_overload(path: Path, sizes: list[dict[str, Any]]) -> None:
    """One panel per request size: goodput against the offered rate (capacity as a line), and on the
    right axis the server's share of 200s answered within the deadline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.5), dpi=120, squeeze=False)
    for ax, o in zip(axes[0], sizes, strict=True):
        capacity = o["capacity"]
        offered = [capacity, *(row["level"] for row in o["open"])]
        client = [capacity, *(row["throughput"] for row in o["open"])]
        ax.plot(offered, client, "o-", color="C0", label="goodput, client's count")
        if all("server_throughput" in row for row in o["open"]):
            server = [o.get("server_capacity") or capacity, *(row["server_throughput"] for row in o["open"])]
            ax.plot(offered, server, "^-", color="C2", label="goodput, server's count (200s/s)")
        ax.axhline(capacity, color="C0", ls=":", label=f"closed-loop capacity ({capacity:,.0f}/s)")
        ax.axhline(0.9 * capacity, color="C0", ls="--", alpha=0.5, label="90% of capacity")
        ax.axhline(0.8 * capacity, color="C0", ls="-.", alpha=0.4, label="80% of capacity")
        ax.set_xscale("log")
        ax.set_xlabel("offered load (requests/s, open loop)")
        ax.set_ylabel("goodput (requests/s)")
        ax.set_ylim(0, 1.25 * capacity)
        right = ax.twinx()
        p99 = [row.get("from_send_ms", {}).get("p99") or 0 for row in o["open"]]
        right.plot(offered[1:], p99, "s--", color="C3", label="p99 of 200s from the send")
        right.axhline(o["deadline_ms"], color="C3", ls=":", alpha=0.6, label=f"deadline ({o['deadline_ms']} ms)")
        right.set_ylabel("latency (ms)")
        right.set_ylim(0, 1.25 * max(o["deadline_ms"], *p99))
        lines, more = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower left")
        ax.set_title(f"{o['model']}, {o['rows']} row(s) {o['encoding']}, {o['connections']:,} connections", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("overload: goodput and latency past capacity")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- tables ---------------------------------------------------------------------------------------


PERF_HEADER = [
    "model",
    "protocol, tensors",
    "conc",
    "infer/s",
    "p50 ms",
    "p99 ms",
    "server queue µs",
    "compute input µs",
    "compute infer µs",
    "compute output µs",
    "server overhead µs",
    "stable",
    "bench.loadgen, same point: req/s, p50 ms",
]


def _loadgen_point(r: dict[str, Any], row: dict[str, Any]) -> str:
    """The project's own load generator's figures at perf_analyzer's point (model, HTTP encoding, connections)."""
    if row["protocol"] != "http" or "models" not in r:  # gRPC, or perf_analyzer run alone
        return "-"
    tiny = row["model"] == r["models"]["tiny"]
    if tiny:
        runs = r["tiny_json"]["closed"] if row["json"] else r["tiny_binary"]["closed"]
    else:
        runs = r["large_json"] if row["json"] else r["large_binary_batching"]
    same = [run for run in runs if int(run["level"]) == int(row["Concurrency"])]
    if not same:
        return "-"
    return f"{same[0]['throughput']:,.0f}, {same[0]['latency_ms']['p50']}"


def _perf_section(r: dict[str, Any]) -> list[str]:
    part = r.get("perf_analyzer") or {}
    if part.get("missing"):
        return ["### perf_analyzer: HTTP and gRPC", "", f"Not run: {part['missing']}.", ""]
    rows = (part.get("rows") or []) + (part.get("grpc_floor") or [])
    if not rows:
        return []
    table = [
        [
            row["model"],
            f"{row['protocol']}, {tensors_label(row)}",
            int(row["Concurrency"]),
            *(["no stable window: nothing to report"] + ["-"] * 7),
            "no",
            _loadgen_point(r, row),
        ]
        if not row["Inferences/Second"]
        else [
            row["model"],
            f"{row['protocol']}, {tensors_label(row)}",
            int(row["Concurrency"]),
            f"{row['Inferences/Second']:,.0f}",
            f"{row['p50 latency'] / 1000:.3f}" if row["p50 latency"] else "-",  # 0: perf_analyzer printed none
            f"{row['p99 latency'] / 1000:.3f}" if row["p99 latency"] else "-",
            int(row["Server Queue"]),
            int(row["Server Compute Input"]),
            int(row["Server Compute Infer"]),
            int(row["Server Compute Output"]),
            int(row.get("Server Overhead", 0)),
            "yes" if row["stable"] else "no",
            _loadgen_point(r, row),
        ]
        for row in rows
    ]
    return [
        "### perf_analyzer: HTTP and gRPC",
        "",
        "Triton's own load tester (`perf_analyzer` from tritonclient 2.41.0, `make perf-analyzer`), on the "
        "generator's core, against one normserve serving HTTP and gRPC, closed loop at each concurrency: zeros "
        "of the model's shapes (its random bytes would hold NaN, which the server refuses), as JSON (the tiny "
        "model only: the large one's input is 3 MB of JSON, past NORMSERVE_MAX_JSON_BYTES) or binary over HTTP, "
        "raw over gRPC, a call each (ModelInfer) or on one stream per client (ModelStreamInfer, `--streaming`). "
        "T8 is judged on the calls. The server-side columns are its reading of the statistics extension (per request, "
        "microseconds). Each level runs windows of "
        f"{r['plan']['perf_interval_ms'] / 1000:g} s until three agree within 10 % "
        f"(at most {MAX_TRIALS}: 'stable'). Command, for each row: `{rows[0]['command']}` with its model, `-i` and "
        "`--concurrency-range`. The last column is this suite's own load generator at the same point, where it "
        "ran one. The rows 'answered at once' are the same gRPC calls to normserve with ModelInfer answering "
        "zeros without checks, batcher or model (`python -m bench.grpc_floor`, perf_analyzer with `-x 1`): what "
        "grpcio's asyncio server costs a call before any inference.",
        "",
        _table(PERF_HEADER, table),
        "",
    ]


def perf_markdown(r: dict[str, Any]) -> str:
    """The perf_analyzer table and its T8 rows alone (``python -m bench.suite --only perf``)."""
    rows = [[t["target"], t["goal"], t["measured"], "yes" if t["met"] else "**no**"] for t in perf_targets(r)]
    lines = _perf_section(r)
    return "\n".join([*lines, _table(["target", "goal", "measured", "met"], rows), ""])


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _errors(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) or "0"


def _cpu(row: dict[str, Any]) -> list[str]:
    cpu = row.get("cpu_per_request_ms")
    if cpu is None:
        total = row.get("server_cpu_ms_per_request")
        return [ms(total), "-", "-"]
    return [ms(cpu["total"]), ms(cpu["onnxruntime"]), ms(cpu["outside_onnxruntime"])]


def _closed_rows(label: str, rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [label, int(row["level"]), f"{rate(row):,.0f}"]
        + [ms(row["latency_ms"][k]) for k in ("p50", "p90", "p99", "p99.9", "max")]
        + _cpu(row)
        + [_errors(row), "yes" if row["stable"] else "no"]
        for row in rows
    ]


CLOSED_HEADER = ["server", "conns", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"]
CLOSED_HEADER += ["CPU ms/req", "in onnxruntime", "outside", "errors", "stable"]


def _open_rows(label: str, rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [label, f"{row['level']:,.0f}", f"{rate(row):,.0f}"]
        + [ms(row["latency_ms"][k]) for k in ("p50", "p99", "p99.9", "max")]
        + [row.get("max_backlog", 0), _errors(row)]
        for row in rows
    ]


def _inprocess_rows(timing: dict[str, Any]) -> list[list[Any]]:
    best = str(timing["best"]["batch"])
    return [
        [f"**{b}**" if b == best else b, f"{t['batch_ms']:.3f} ms", f"{t['row_us']:.1f} µs", f"{t['rows_per_s']:,.0f}"]
        for b, t in timing["batches"].items()
    ]


def _graph_rows(graphs: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for role, variant in graphs.items():
        if "skipped" in variant:
            rows.append([variant["model"], "not measured: " + variant["skipped"], "", ""])
            continue
        for name, timing in variant.items():
            if not isinstance(timing, dict):
                continue
            for batch, t in timing.items():
                rows.append([f"{variant['model']} ({role})", name, batch, f"{t['row_us']:,.1f} µs"])
    return rows


def git_commit() -> str:
    """The commit checked out, and whether the code (outside docs/) differs from it."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        code_only = ["--", ".", ":!docs"]  # the document itself is expected to differ
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", *code_only], capture_output=True, text=True
        )
        return done.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(r: dict[str, Any], images: dict[str, str], smoke: bool = False) -> str:
    m = r["machine"]
    met = targets(r)
    tiny, large = r["models"]["tiny"], r["models"]["large"]
    bn_nodes = {
        v["model"]: v["batchnorm_nodes_unfolded"] for v in r["graphs"].values() if "batchnorm_nodes_unfolded" in v
    }
    pinning = (
        f"servers on core {','.join(map(str, m['server_cores']))}, load generator on core "
        f"{','.join(map(str, m['generator_cores']))} (`taskset`), onnxruntime intra-op threads = server cores"
        if m["server_cores"]
        else "not pinned (fewer than two cores, or no `taskset`)"
    )
    out = [
        f"## The suite: `make bench` ({m['date'][:10]})",
        "",
        "**This was a smoke run: windows of a fraction of a second. Its figures mean nothing.**\n" if smoke else "",
        f"- **Machine:** {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['platform']}.",
        f"- **Commit:** {r.get('commit') or git_commit()}. **Command:** `{r['command']}`, "
        f"{r['suite_seconds']:.0f} s in all.",
        f"- **Pinning:** {pinning}. Provider: {r['provider']}.",
        f"- **normserve's request path:** {r.get('compiled', 'not recorded')}.",
        "- **Load generator:** `python -m bench.loadgen` (closed loop: latency from the send; open loop: from the "
        "due time). Each closed-loop level warms up, then runs windows until the last 3 agree within 10 % "
        "(`stable`); open-loop levels run 3 windows.",
        "",
        "### Targets",
        "",
        _table(
            ["target", "goal", "measured (this run)", "met"],
            [[t["target"], t["goal"], t["measured"], "yes" if t["met"] else "**no**"] for t in met],
        ),
        "",
        f"### Tiny model ({tiny}): closed loop",
        "",
        "Every server answers the same request: one held-out digit. CPU is the server process's user + system "
        "time per request; for normserve, the part inside onnxruntime is its compute-duration metric.",
        "",
        _table(
            CLOSED_HEADER,
            _closed_rows("normserve, JSON", r["tiny_json"]["closed"])
            + _closed_rows("normserve, binary", r["tiny_binary"]["closed"])
            + _closed_rows("naive FastAPI, JSON", r["naive"])
            + _closed_rows("bare ASGI (HTTP ceiling)", r["bare"])
            + _closed_rows("bare ASGI, binary request", r.get("bare_binary", [])),
        ),
        "",
        "### Tiny model: open loop at fixed rates",
        "",
        "Rates are fractions of the closed-loop throughput at the highest concurrency. Past saturation the "
        "latency is the queue's: requests are charged from the moment they were due.",
        "",
        _table(
            [
                "normserve",
                "offered req/s",
                "achieved",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "max ms",
                "max backlog",
                "errors",
            ],
            _open_rows("JSON", r["tiny_json"]["open"]) + _open_rows("binary", r["tiny_binary"]["open"]),
        ),
        "",
        f"![tiny model: latency against throughput]({images['tiny']})",
        "",
        f"### Large model ({large})",
        "",
        _table(
            CLOSED_HEADER,
            _closed_rows("batching on, binary", r["large_binary_batching"])
            + _closed_rows("batching off, binary", r["large_binary_no_batching"])
            + _closed_rows("batching on, JSON", r["large_json"]),
        ),
        "",
        f"![large model: latency against throughput]({images['large']})",
        "",
        "### Ceilings: onnxruntime in-process, same core and threads",
        "",
        f"{tiny} (best batch in bold):",
        "",
        _table(["batch", "per batch", "per row", "rows/s"], _inprocess_rows(r["inprocess"]["tiny"])),
        "",
        f"{large}:",
        "",
        _table(["batch", "per batch", "per row", "rows/s"], _inprocess_rows(r["inprocess"]["large"])),
        "",
        "### Folded vs unfolded graphs, onnxruntime's graph optimizations off and on",
        "",
        "The unfolded graph is the checkpoint exported as trained, every BatchNorm a BatchNormalization node ("
        + ", ".join(f"{model}: {count}" for model, count in bn_nodes.items())
        + "); the folded graph is the served model.onnx, with none.",
        "",
        _table(["model", "graph", "batch", "per row"], _graph_rows(r["graphs"])),
        "",
        "### Memory and start-up",
        "",
        f"- RSS once ready with every default model loaded: {r['memory']['rss_ready_mb']:.0f} MB; after "
        f"{r['memory']['requests']:,} requests: {r['memory']['rss_after_mb']:.0f} MB.",
        "- Process start to `/v2/health/ready` answering 200: " + ", ".join(f"{s:.2f} s" for s in r["startup_s"]) + ".",
        "",
    ]
    out += _overload_section(r, images.get("overload", ""))
    out += _perf_section(r)
    out += _workers_section(r.get("workers") or {})
    out += _fleet_section(r.get("fleet") or {})
    out += _limit_section(r)
    out += _profile_section(r.get("profile", {}), int(r["tiny_json"]["closed"][-1]["level"]))
    out += _wrk_section(r.get("wrk", {}), r)
    return "\n".join(out).replace("\n\n\n", "\n\n")


def _workers_section(part: dict[str, Any]) -> list[str]:
    rows = part.get("rows") or []
    if not rows:
        return []
    one = {row["encoding"]: rate(row) for row in rows if row["workers"] == "1"}
    table = [
        [
            row["workers"],
            row["encoding"],
            f"{rate(row):,.0f}",
            f"{rate(row) / one[row['encoding']]:.2f}x" if one.get(row["encoding"]) else "-",
            ms(row["latency_ms"]["p50"]),
            ms(row["latency_ms"]["p99"]),
            _cpu(row)[0],
            _errors(row),
            f"{sum(row['rss_mb']):,.0f}",
            " + ".join(f"{m:,.0f}" for m in row["rss_mb"]),
        ]
        for row in rows
    ]
    return [
        "### Worker processes (`NORMSERVE_WORKERS`)",
        "",
        f"The tiny model at the highest concurrency, JSON and binary, against normserve with each worker count "
        f"on every core of the machine ({part['cores']}; the load generator shares them, so more workers compete "
        "with it). CPU per request is every process's together (the supervisor's and its workers'): its rise "
        "with the worker count is the design's overhead. Memory: every process's resident set (with more than "
        "one worker, the supervisor's first, then each worker's), each worker holding its own sessions.",
        "",
        _table(
            [
                "workers",
                "tensors",
                "req/s",
                "vs 1 worker",
                "p50 ms",
                "p99 ms",
                "CPU ms/req",
                "errors",
                "RSS MB, all",
                "RSS MB, each process",
            ],
            table,
        ),
        "",
    ]


def _fleet_section(part: dict[str, Any]) -> list[str]:
    out = ["### A fleet behind HAProxy: rolling restart under load", ""]
    if part.get("missing"):
        return out + [f"Not run: {part['missing']}.", ""]
    if not part:
        return []
    before, during = part["before"], part["during"]
    errors = ", ".join(f"{n:,} {reason}" for reason, n in sorted(part["errors"].items())) or "none"
    out += [
        f"{part['replicas']} replicas (`python -m service`, one worker each) behind Debian's HAProxy with "
        f"`docker/haproxy/haproxy.cfg`, on loopback; an open-loop load of {part['rate']:g} requests a second "
        f"({part['model']}, JSON) through it while `bench.fleet` replaces every replica in turn (SIGTERM, its "
        "drain, its exit, a new one started, ready, back in HAProxy), as `docker/rolling-restart.sh` does with "
        f"compose. The restart took {part['restart_s']:.1f} s.",
        "",
        _table(
            ["sent", "answered", "failed", "p99 before the restart", "p99 during it", "max during it"],
            [
                [
                    f"{part['sent']:,}",
                    f"{part['answered']:,}",
                    errors,
                    ms(before.get("latency_ms", {}).get("p99")),
                    ms(during.get("latency_ms", {}).get("p99")),
                    ms(during.get("latency_ms", {}).get("max")),
                ]
            ],
        ),
        "",
        "Each replica, in seconds from the restart's start: SIGTERM, HAProxy's own status turning DOWN "
        "(from its stats socket), the process exiting, the new one ready, HAProxy's status UP again.",
        "",
        _table(
            ["replica", "SIGTERM", "out of HAProxy", "stopped", "ready", "back in HAProxy"],
            [
                [name, *(f"{e[k]:.2f}" if e.get(k) is not None else "never" for k in KEYS)]
                for name, e in sorted(part["replica_events"].items())
            ],
        ),
        "",
    ]
    return out


KEYS = ("sigterm", "out", "stopped", "ready", "back")


def _profile_section(profiles: dict[str, Any], conns: int) -> list[str]:
    out = [f"### Where normserve's core goes (py-spy, tiny model, {conns} connections)", ""]
    done = {e: p for e, p in profiles.items() if "skipped" not in p and p.get("samples")}
    if not done:
        said = next((p["skipped"] for p in profiles.values() if "skipped" in p), "no samples")
        return out + [f"Not profiled: {said}.", ""]
    out += [
        "py-spy's samples of the server under the closed-loop load, by stage of a request's way through it: "
        "each sample goes to the innermost stage its stack touched. A stage's share of the samples times the "
        "server's CPU per request over the same load is its cost per request.",
        "",
    ]
    stages = list(dict.fromkeys(stage for p in done.values() for stage in p["stages"]))
    header, rows = ["stage"], [[stage] for stage in stages]
    for encoding, p in done.items():
        header += [f"{encoding} share", f"{encoding} µs/request"]
        cpu = p.get("cpu_us_per_request")
        for stage, row in zip(stages, rows, strict=True):
            share = p["stages"].get(stage, 0.0)
            row += [f"{share}%", f"{share * cpu / 100:.1f}" if cpu else "-"]
    total = ["all"]
    for p in done.values():
        cpu = p.get("cpu_us_per_request")
        total += ["100%", f"{cpu:.1f}" if cpu else "-"]
    out += [_table(header, [*rows, total]), ""]
    encoding, first = next(iter(done.items()))
    out += [
        f"Functions with the most samples of their own ({encoding}):",
        "",
        _table(["function", "share"], [[f"`{f}`", f"{s}%"] for f, s in first["own"]]),
        "",
    ]
    return out


def _limit_section(r: dict[str, Any]) -> list[str]:
    rows = limit_rows(r)
    if not rows:
        return []
    out = [
        "### The one-core limit",
        "",
        "What a server that added nothing would answer on the server's core: the bare ASGI app's cost per "
        "request at the same connections and encoding (1 / its throughput) plus onnxruntime's cost per row "
        "at the model's largest batch measured in-process (the ceilings above). T9 judges normserve against "
        "it at 16 and 64 connections, and its p50 at one connection against 1.2x the bare app's p50 plus "
        "onnxruntime's batch-1 time.",
        "",
    ]
    if "shares" in rows[0]:
        out += [
            f"Measured side by side: {len(rows[0]['shares'])} rounds, each at each level and encoding the bare "
            "app and normserve in turn, a few seconds each (bare first in odd rounds, normserve first in even "
            "ones), with onnxruntime alone measured before each level and after it (the level's figure is the "
            "mean of the two), so that the machine's drift between minutes falls on both sides of each ratio; "
            "each figure is the median over the rounds, each round's share in brackets. The p50 at one "
            "connection is judged as the shares are: each round's p50 against that round's bound, the median of "
            "those ratios (each round's after the figures).",
            "",
            _limit_table(rows),
            "",
        ]
        if apart := apart_limit_rows(r):
            out += [
                "The same limit from the parts as the tables above measured them, minutes apart (not judged):",
                "",
                _limit_table(apart),
                "",
            ]
        return out
    return [*out, _limit_table(rows), ""]


def _limit_table(rows: list[dict[str, Any]]) -> str:
    def share(row: dict[str, Any]) -> str:  # with each round's, where measured side by side
        each = " (" + ", ".join(f"{s:.0%}" for s in row["shares"]) + ")" if "shares" in row else ""
        return f"{row['share']:.0%}{each}"

    def p50(row: dict[str, Any]) -> str:  # with each round's p50 against its own bound, where side by side
        figures = f"{row['p50_ms']:.3f} ({row['p50_bound_ms']:.3f})"
        if "p50_ratios" not in row:
            return figures
        return f"{figures}; {row['p50_ratio']:.2f}x ({p50_rounds(row)})"

    return _table(
        [
            "encoding",
            "conns",
            "bare ASGI µs/request",
            "onnxruntime µs/row",
            "limit req/s",
            "normserve req/s",
            "share of the limit",
            "p50 ms (bound)",
        ],
        [
            [
                row["encoding"],
                row["conns"],
                f"{row['bare_us']:.1f}",
                f"{row['row_us']:.1f} (batch {row['batch']})",
                f"{row['limit']:,.0f}",
                f"{row['throughput']:,.0f}",
                share(row) if row["conns"] != 1 else "",
                p50(row) if row["conns"] == 1 else "",
            ]
            for row in rows
        ],
    )


def _wrk_section(wrk: dict[str, Any], r: dict[str, Any]) -> list[str]:
    if not wrk or not wrk.get("bare"):
        return ["### Cross-check with wrk", "", "Not run: `wrk` is not installed (`apt-get install wrk`).", ""]
    rows = []
    for name, key in (("normserve, JSON", "normserve"), ("bare ASGI", "bare")):
        w = wrk.get(key)
        ours = (r["tiny_json"]["closed"] if key == "normserve" else r["bare"])[-1]
        if w:
            rows.append([name, w["connections"], f"{w['throughput']:,.0f}", f"{rate(ours):,.0f}", ms(w.get("p99_ms"))])
    return [
        "### Cross-check with wrk",
        "",
        "The same request from wrk (C) on the generator's core. Where the bare app's figures differ, the Python "
        "load generator is the limit, not the app.",
        "",
        _table(["server", "conns", "wrk req/s", "bench.loadgen req/s", "wrk p99 ms"], rows),
        "",
    ]


def write_report(r: dict[str, Any], doc: Path, smoke: bool = False) -> None:
    """Write the results, the plots and the document's generated section."""
    assets = doc.parent / "bench"
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "suite.json").write_text(json.dumps(r, indent=1) + "\n")
    plot(
        assets / "tiny.png",
        {
            "JSON, open loop": r["tiny_json"]["open"],
            "binary, open loop": r["tiny_binary"]["open"],
            "JSON, closed loop": r["tiny_json"]["closed"],
            "naive, closed loop": r["naive"],
        },
        f"tiny model ({r['models']['tiny']}): latency against throughput",
    )
    plot(
        assets / "large.png",
        {"batching on": r["large_binary_batching"], "batching off": r["large_binary_no_batching"]},
        f"large model ({r['models']['large']}), binary: latency against throughput",
    )
    images = {"tiny": "bench/tiny.png", "large": "bench/large.png"}
    if r.get("overload"):
        plot_overload(assets / "overload.png", r["overload"])
        images["overload"] = "bench/overload.png"
    section = markdown(r, images, smoke)
    text = doc.read_text() if doc.exists() else "# normserve benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\n" + section + "\n" + END + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + BEGIN + "\n" + section + "\n" + END + "\n"
    doc.write_text(text)
