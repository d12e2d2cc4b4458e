"""The suite's results held against the targets: each met or missed, with the figure that decides it."""

from __future__ import annotations

import statistics
from typing import Any

__all__ = [
    "apart_limit_rows",
    "limit_rows",
    "side_by_side_limit_rows",
    "limit_targets",
    "overload_targets",
    "p50_rounds",
    "perf_targets",
    "rate",
    "targets",
]


def rate(row: dict[str, Any]) -> float:
    return float(row["throughput"])


def _p(row: dict[str, Any], name: str) -> float:
    return float(row["latency_ms"][name] or float("nan"))


def _outside(row: dict[str, Any]) -> float:
    return float(row.get("cpu_per_request_ms", {}).get("outside_onnxruntime", float("nan")))


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """T1–T6 of the latency issue, each with the figures it is judged on (all from this run)."""
    tiny, naive, bare = r["tiny_json"]["closed"], r["naive"], r["bare"]
    top, one = tiny[-1], tiny[0]
    conns = int(top["level"])
    batch1_ms = float(r["inprocess"]["tiny"]["batches"]["1"]["batch_ms"])
    large_top = r["large_binary_batching"][-1]
    ceiling = r["inprocess"]["large"]["best"]
    middle = r["large_json"][0]
    binary_middle = next(row for row in r["large_binary_batching"] if row["level"] == middle["level"])
    memory = r["memory"]
    growth = (memory["rss_after_mb"] - memory["rss_ready_mb"]) / memory["rss_ready_mb"]
    t2_bound = _p(bare[0], "p50") + batch1_ms + 0.3
    t4_ratio = _outside(middle) / _outside(binary_middle)
    return [
        {
            "target": "T1",
            "goal": f"tiny, JSON, {conns} conns: ≥ 5x naive, ≥ 40% of bare ASGI, p99 ≤ 20 ms",
            "measured": f"{rate(top) / rate(naive[-1]):.1f}x naive, {100 * rate(top) / rate(bare[-1]):.0f}% of bare, "
            f"p99 {_p(top, 'p99'):.1f} ms",
            "met": rate(top) >= 5 * rate(naive[-1]) and rate(top) >= 0.4 * rate(bare[-1]) and _p(top, "p99") <= 20,
        },
        {
            "target": "T2",
            "goal": f"tiny, JSON, 1 conn: median ≤ bare median + batch-1 onnxruntime + 0.3 ms = {t2_bound:.3f} ms",
            "measured": f"median {_p(one, 'p50'):.3f} ms "
            f"(bare {_p(bare[0], 'p50'):.3f} ms, batch 1 {batch1_ms:.3f} ms)",
            "met": _p(one, "p50") <= t2_bound,
        },
        {
            "target": "T3",
            "goal": f"large, binary, {int(large_top['level'])} conns: "
            "≥ 85% of in-process onnxruntime at its best batch",
            "measured": f"{rate(large_top):.1f} req/s = {100 * rate(large_top) / ceiling['rows_per_s']:.0f}% of "
            f"{ceiling['rows_per_s']:.1f} rows/s (batch {ceiling['batch']})",
            "met": rate(large_top) >= 0.85 * ceiling["rows_per_s"],
        },
        {
            "target": "T4",
            "goal": "large: server CPU per request outside onnxruntime ≥ 5x lower with binary than JSON",
            "measured": f"{t4_ratio:.1f}x ({_outside(middle):.2f} ms JSON, {_outside(binary_middle):.3f} ms binary, "
            f"{int(middle['level'])} conns)",
            "met": t4_ratio >= 5,
        },
        {
            "target": "T5",
            "goal": "RSS with the default models ≤ 600 MB; growth after 100,000 requests ≤ 5%",
            "measured": f"{memory['rss_ready_mb']:.0f} MB ready, {memory['rss_after_mb']:.0f} MB after "
            f"{memory['requests']:,} requests ({100 * growth:+.1f}%)",
            "met": memory["rss_ready_mb"] <= 600 and growth <= 0.05 and memory["requests"] >= 100_000,
        },
        *overload_targets(r),
        *perf_targets(r),
        *limit_targets(r),
        {
            "target": "T6",
            "goal": "ready ≤ 10 s after the process starts, default models built",
            "measured": "slowest of "
            + ", ".join(f"{s:.1f}" for s in r["startup_s"])
            + f": {max(r['startup_s']):.1f} s",
            "met": max(r["startup_s"]) <= 10,
        },
    ]


def overload_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """T7, for each request size: goodput holds past capacity (≥ 90 % of it at 3x, ≥ 80 % at 10x, the
    server's count), every request is answered or refused with 503 and Retry-After (or never read: held
    back by the kernel), the server answers what it accepted within the deadline, and memory stays bounded."""
    out = []
    for o in r.get("overload") or []:
        rows = [row for row in o["open"] if row["multiple"] >= 3]
        parts, met = [], bool(rows)
        for row in rows:
            refused = row.get("refused", {"p50_ms": 0.0, "with_retry_after": 1.0})
            rss = row.get("server_rss_mb", 0.0)
            goodput = row.get("server_goodput_ratio", row["goodput_ratio"])
            in_time = row.get("server_in_deadline")
            floor = 0.9 if row["multiple"] < 10 else 0.8
            parts.append(
                f"{row['multiple']:g}x: goodput {100 * goodput:.0f}% "
                f"(client's count {100 * row['goodput_ratio']:.0f}%), "
                f"{_percent(in_time)} of 200s within the deadline, {_errors(row)}, RSS {rss:.0f} MB"
            )
            met = met and (
                goodput >= floor
                and set(row["errors"]) <= {"503"}
                and refused["with_retry_after"] == 1.0
                and in_time is not None
                and in_time >= 0.999
                and rss <= 1.1 * o["rss_ready_mb"]
            )
        out.append(
            {
                "target": "T7",
                "goal": f"overload, {o['rows']} row(s) {o['encoding']}, open loop over {o['connections']:,} conns "
                f"at 3x and 10x of the closed-loop capacity ({o['capacity']:,.0f} req/s): goodput (200s the server "
                "counted) ≥ 90% at 3x, ≥ 80% at 10x; no error but 503 with Retry-After; ≥ 99.9% of 200s within the "
                f"{o['deadline_ms']} ms deadline from their headers (server's histogram); RSS ≤ 1.1x ready "
                f"({o['rss_ready_mb']:.0f} MB)",
                "measured": "; ".join(parts),
                "met": met,
            }
        )
    return out


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.2f}%"


def _errors(row: dict[str, Any]) -> str:
    errors = row["errors"]
    return ", ".join(f"{n:,} {reason}" for reason, n in sorted(errors.items())) if errors else "no error"


def perf_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """T8, for each model perf_analyzer measured: gRPC's throughput at least HTTP binary's at every
    concurrency, and its p50 at the lowest concurrency within 10 % of HTTP binary's."""
    rows = (r.get("perf_analyzer") or {}).get("rows") or []
    out = []
    for model in sorted({row["model"] for row in rows}):
        by = {
            (row["protocol"], row["json"], int(row["Concurrency"])): row
            for row in rows
            if row["model"] == model and not row.get("streaming")
        }
        streams = {int(row["Concurrency"]): row for row in rows if row["model"] == model and row.get("streaming")}
        levels = sorted(c for protocol, _, c in by if protocol == "grpc")
        pairs = [(c, by[("grpc", False, c)], by.get(("http", False, c))) for c in levels]
        # a level perf_analyzer got no stable figure for on either protocol is left out, and said so
        unmeasured = [c for c, g, h in pairs if h is None or not g["Inferences/Second"] or not h["Inferences/Second"]]
        pairs = [(c, g, h) for c, g, h in pairs if c not in unmeasured]
        if not pairs:
            continue
        ratios = [(c, g["Inferences/Second"] / h["Inferences/Second"]) for c, g, h in pairs]
        _, first_grpc, first_http = pairs[0]
        # None where perf_analyzer printed no latency for either (its windows never agreed: ``_last_window``)
        p50 = _ratio(first_grpc["p50 latency"], first_http["p50 latency"])
        out.append(
            {
                "target": "T8",
                "goal": f"{model}: gRPC throughput ≥ HTTP binary's at every concurrency (perf_analyzer, same server "
                f"and core), p50 at concurrency {pairs[0][0]} within 10 % of it",
                "measured": "gRPC ÷ HTTP binary throughput: "
                + ", ".join(f"{ratio:.2f}x at {c}" for c, ratio in ratios)
                + f"; p50 at {pairs[0][0]}: "
                + (f"{p50:.2f}x" if p50 is not None else "not measured (perf_analyzer printed no latency)")
                + (f"; not measured at {', '.join(map(str, unmeasured))}" if unmeasured else "")
                + _streamed(streams, pairs)
                + _floor(r, model, pairs),
                "met": all(ratio >= 1 for _, ratio in ratios) and p50 is not None and p50 <= 1.1,
            }
        )
    return out


def _floor(r: dict[str, Any], model: str, pairs: list[tuple[int, Any, Any]]) -> str:
    """For information beside T8: grpc.aio's own floor (``bench.grpc_floor``, ModelInfer answered at once,
    no inference) against the real server's HTTP binary, at the same levels."""
    floor = {
        int(row["Concurrency"]): row
        for row in (r.get("perf_analyzer") or {}).get("grpc_floor") or []
        if row["model"] == model and row["Inferences/Second"]
    }
    calls = {c: floor[c]["Inferences/Second"] for c, _, _ in pairs if c in floor}
    ratios = [
        f"{calls[c]:,.0f} calls/s at {c} ({calls[c] / h['Inferences/Second']:.2f}x)" for c, _, h in pairs if c in calls
    ]
    if not ratios:
        return ""
    return "; grpc.aio's floor, each call answered at once without the model: " + ", ".join(ratios)


def _streamed(streams: dict[int, dict[str, Any]], pairs: list[tuple[int, Any, Any]]) -> str:
    """For information beside T8 (judged on calls): the same ratios on gRPC streams (ModelStreamInfer)."""
    ratios = [
        f"{streams[c]['Inferences/Second'] / h['Inferences/Second']:.2f}x at {c}"
        for c, _, h in pairs
        if c in streams and streams[c]["Inferences/Second"]
    ]
    if not ratios:
        return ""
    first = pairs[0]
    ratio = _ratio(streams[first[0]]["p50 latency"], first[2]["p50 latency"]) if first[0] in streams else None
    p50 = f"; p50 at {first[0]}: {ratio:.2f}x" if ratio is not None else ""
    return " (on gRPC streams instead: " + ", ".join(ratios) + p50 + ")"


def _ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, None where either is no figure (perf_analyzer's 0 for a latency it did not
    print)."""
    return numerator / denominator if numerator and denominator else None


LIMIT_SHARE = 0.85  # of the one-core limit, at 16 and 64 connections
LIMIT_LEVELS = (16, 64)
LIMIT_P50 = 1.2  # at one connection: p50 within this of bare ASGI's p50 and onnxruntime's batch-1 time
LARGE_SHARE = 0.95  # the large model, binary: of onnxruntime alone


def _largest_batch(timing: dict[str, Any]) -> tuple[int, float]:
    """The largest batch measured in-process, and its seconds per row."""
    batch = max(timing["batches"], key=int)
    return int(batch), float(timing["batches"][batch]["row_us"]) / 1e6


def limit_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The tiny model's one-core limit at each closed-loop level and encoding: a server that added nothing to
    the bare ASGI app's cost per request (1 / its throughput at the same connections and encoding) and to
    onnxruntime's cost per row at the model's largest batch would answer 1 / (the two) requests a second.
    From the rounds that measure the three side by side where the run has them (``scenarios.limit_part``),
    else from the parts the suite measures apart."""
    if (limit := r.get("limit")) and limit.get("rounds"):
        return side_by_side_limit_rows(limit["rounds"])
    return apart_limit_rows(r)


def side_by_side_limit_rows(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``limit_rows`` from side-by-side rounds: each level's limit from its own onnxruntime and bare ASGI
    figures (onnxruntime's from the round where a round measured it once), normserve's share of it and its p50
    against the p50 bound in the same round; the median of each figure over the rounds (``shares`` and
    ``p50_ratios``: each round's, in order)."""
    out = []
    for encoding, levels in rounds[0]["levels"].items():
        for conns in sorted(levels, key=int):
            each = []
            for measured in rounds:
                level = measured["levels"][encoding][conns]
                floor, ours = level["bare"], level["normserve"]
                alone = level if "row_us" in level else measured  # around the level, or once in the round
                row_us, batch1_ms = float(alone["row_us"]), float(alone["batch1_ms"])
                limit = 1 / (1 / rate(floor) + row_us / 1e6)
                p50, bound = _p(ours, "p50"), LIMIT_P50 * (_p(floor, "p50") + batch1_ms)
                each.append(
                    {
                        "bare_us": 1e6 / rate(floor),
                        "row_us": row_us,
                        "limit": limit,
                        "throughput": rate(ours),
                        "share": rate(ours) / limit,
                        "p50_ms": p50,
                        "p50_bound_ms": bound,
                        "p50_ratio": p50 / bound,
                    }
                )
            row: dict[str, Any] = {"encoding": encoding, "conns": int(conns), "batch": rounds[0]["batch"]}
            row |= {name: statistics.median([e[name] for e in each]) for name in each[0]}
            out.append(row | {"shares": [e["share"] for e in each], "p50_ratios": [e["p50_ratio"] for e in each]})
    return out


def apart_limit_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """``limit_rows`` from the suite's own tiny-model levels, its bare ASGI baseline and its in-process
    onnxruntime figures: the three measured minutes apart."""
    if "bare_binary" not in r:
        return []
    batch, row_s = _largest_batch(r["inprocess"]["tiny"])
    out = []
    for encoding, bare in (("json", r["bare"]), ("binary", r["bare_binary"])):
        for ours, floor in zip(r[f"tiny_{encoding}"]["closed"], bare, strict=True):
            limit = 1 / (1 / rate(floor) + row_s)
            out.append(
                {
                    "encoding": encoding,
                    "conns": int(ours["level"]),
                    "bare_us": 1e6 / rate(floor),
                    "batch": batch,
                    "row_us": row_s * 1e6,
                    "limit": limit,
                    "throughput": rate(ours),
                    "share": rate(ours) / limit,
                    "p50_ms": _p(ours, "p50"),
                    "p50_bound_ms": LIMIT_P50
                    * (_p(floor, "p50") + float(r["inprocess"]["tiny"]["batches"]["1"]["batch_ms"])),
                }
            )
    return out


def p50_rounds(row: dict[str, Any]) -> str:
    """Each side-by-side round's p50 against its own bound, in order (``side_by_side_limit_rows``)."""
    return ", ".join(f"{ratio:.2f}x" for ratio in row["p50_ratios"])


def _rounds(row: dict[str, Any]) -> str:
    return f", the median of {len(row['shares'])} side-by-side rounds" if "shares" in row else ""


def limit_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """T9, per-request overhead: the tiny model at 16 and 64 connections against its one-core limit, its
    p50 at one connection, and the large model's binary throughput against onnxruntime alone."""
    rows = limit_rows(r)
    if not rows:
        return []
    out = []
    for encoding in ("json", "binary"):
        loaded = [row for row in rows if row["encoding"] == encoding and row["conns"] in LIMIT_LEVELS]
        one = [row for row in rows if row["encoding"] == encoding and row["conns"] == 1]
        if loaded:
            out.append(
                {
                    "target": "T9",
                    "goal": f"tiny, {encoding}, {' and '.join(str(c) for c in LIMIT_LEVELS)} conns: ≥ "
                    f"{LIMIT_SHARE:.0%} of the one-core limit (bare ASGI + onnxruntime per row at batch "
                    f"{loaded[0]['batch']}{_rounds(loaded[0])})",
                    "measured": ", ".join(
                        f"{row['share']:.0%} at {row['conns']} ({row['throughput']:,.0f} of {row['limit']:,.0f} req/s)"
                        for row in loaded
                    ),
                    "met": all(row["share"] >= LIMIT_SHARE for row in loaded),
                }
            )
        if one:
            (row,) = one
            bound = (
                f"p50 ≤ {LIMIT_P50}x (bare ASGI p50 + batch-1 onnxruntime{_rounds(row)}) = {row['p50_bound_ms']:.3f} ms"
            )
            if "p50_ratios" in row:  # judged as the shares are: each round's p50 against its own bound
                judged = {
                    "goal": f"tiny, {encoding}, 1 conn: p50 ≤ {LIMIT_P50}x (bare ASGI p50 + batch-1 onnxruntime), "
                    f"each round's p50 against its own bound{_rounds(row)} (median bound {row['p50_bound_ms']:.3f} "
                    "ms)",
                    "measured": f"p50 {row['p50_ms']:.3f} ms (the median); each round's against its own bound "
                    f"{p50_rounds(row)}: {row['p50_ratio']:.2f}x in the median round",
                    "met": row["p50_ratio"] <= 1,
                }
            else:
                judged = {
                    "goal": f"tiny, {encoding}, 1 conn: {bound}",
                    "measured": f"p50 {row['p50_ms']:.3f} ms",
                    "met": row["p50_ms"] <= row["p50_bound_ms"],
                }
            out.append({"target": "T9", **judged})
            if spin := r.get("tiny_spin"):  # the same bound, with the idle spin set otherwise (off)
                p50 = _p(spin[encoding][0], "p50")
                out.append(
                    {
                        "target": "T9",
                        "goal": f"tiny, {encoding}, 1 conn, NORMSERVE_IDLE_SPIN_US={spin['idle_spin_us']}: {bound}",
                        "measured": f"p50 {p50:.3f} ms",
                        "met": p50 <= row["p50_bound_ms"],
                    }
                )
    large_top, ceiling = r["large_binary_batching"][-1], r["inprocess"]["large"]["best"]
    out.append(
        {
            "target": "T9",
            "goal": f"large, binary, {int(large_top['level'])} conns: ≥ {LARGE_SHARE:.0%} of onnxruntime alone "
            "at its best batch",
            "measured": f"{rate(large_top):.1f} req/s = {rate(large_top) / ceiling['rows_per_s']:.0%} of "
            f"{ceiling['rows_per_s']:.1f} rows/s (batch {ceiling['batch']})",
            "met": rate(large_top) >= LARGE_SHARE * ceiling["rows_per_s"],
        }
    )
    return out
