"""The suite's judgement of per-request overhead (T9): the one-core limit from the same run's bare ASGI app
and in-process onnxruntime, and normserve held against it; and of gRPC against HTTP (T8) where perf_analyzer
left a figure out."""

from __future__ import annotations

from typing import Any

import pytest

from bench.suite.judging import apart_limit_rows, limit_rows, limit_targets, perf_targets


def _level(conns: int, throughput: float, p50_ms: float) -> dict[str, Any]:
    return {"level": conns, "throughput": throughput, "latency_ms": {"p50": p50_ms}}


def _results(normserve_64: float) -> dict[str, Any]:
    levels = (1, 16, 64)
    bare = [_level(c, t, 0.1) for c, t in zip(levels, (10_000, 40_000, 40_000), strict=True)]  # 25 µs a request
    ours = [_level(c, t, 0.2) for c, t in zip(levels, (2_500, 12_000, normserve_64), strict=True)]
    return {
        "bare": bare,
        "bare_binary": bare,
        "tiny_json": {"closed": ours},
        "tiny_binary": {"closed": ours},
        # 50 µs a row at the largest batch (64), 0.06 ms at batch 1
        "inprocess": {
            "tiny": {"batches": {"1": {"batch_ms": 0.06, "row_us": 60.0}, "64": {"batch_ms": 3.2, "row_us": 50.0}}},
            "large": {"best": {"batch": 8, "rows_per_s": 50.0}},
        },
        "large_binary_batching": [_level(32, 48.0, 100.0)],
    }


def test_the_limit_is_bare_asgi_plus_onnxruntime_per_row_at_the_largest_batch() -> None:
    rows = limit_rows(_results(normserve_64=11_000))
    top = next(r for r in rows if r["encoding"] == "json" and r["conns"] == 64)
    assert top["batch"] == 64 and top["limit"] == pytest.approx(1 / (25e-6 + 50e-6))  # 13,333 req/s
    assert top["share"] == pytest.approx(11_000 / 13_333.3, rel=1e-4)
    assert next(r for r in rows if r["conns"] == 1)["p50_bound_ms"] == pytest.approx(1.2 * (0.1 + 0.06))


def test_the_one_connection_run_with_an_idle_spin_is_judged_apart_against_the_same_bound() -> None:
    results = _results(normserve_64=11_500)
    results["tiny_spin"] = {"idle_spin_us": 200, "json": [_level(1, 3_000, 0.18)], "binary": [_level(1, 2_900, 0.25)]}
    judged = {t["goal"].split(":")[0]: t for t in limit_targets(results)}
    assert judged["tiny, json, 1 conn"]["met"] is False  # without the spin: 0.2 ms against 0.192 ms
    spun = judged["tiny, json, 1 conn, NORMSERVE_IDLE_SPIN_US=200"]
    assert spun["met"] is True and spun["measured"] == "p50 0.180 ms"
    assert "0.192 ms" in spun["goal"]  # the bound is the run's own, the same for both
    assert judged["tiny, binary, 1 conn, NORMSERVE_IDLE_SPIN_US=200"]["met"] is False  # 0.25 ms
    assert not any("IDLE_SPIN" in t["goal"] for t in limit_targets(_results(normserve_64=11_500)))  # not run: none


def test_t9_is_met_only_at_85_percent_of_the_limit_at_16_and_64_connections() -> None:
    met = {t["goal"].split(":")[0]: t["met"] for t in limit_targets(_results(normserve_64=11_500))}
    assert met["tiny, json, 16 and 64 conns"] is True  # 12,000 and 11,500 of 13,333: 90 % and 86 %
    assert met["tiny, json, 1 conn"] is False  # 0.2 ms against 0.192 ms
    assert met["large, binary, 32 conns"] is True  # 48 of 50 rows/s: 96 %
    missed = {t["goal"].split(":")[0]: t for t in limit_targets(_results(normserve_64=11_000))}
    assert missed["tiny, binary, 16 and 64 conns"]["met"] is False  # 11,000 is 82.5 %
    assert "82% at 64 (11,000 of 13,333 req/s)" in missed["tiny, binary, 16 and 64 conns"]["measured"]


def _round(speed: float, ours_64: float) -> dict[str, Any]:
    """One side-by-side round on a machine running at ``speed`` (1: as in ``_results``)."""
    levels = {
        "1": {"bare": _level(1, 10_000 * speed, 0.1 / speed), "normserve": _level(1, 2_500 * speed, 0.2 / speed)},
        "16": {"bare": _level(16, 40_000 * speed, 0.4), "normserve": _level(16, 12_000 * speed, 1.3)},
        "64": {"bare": _level(64, 40_000 * speed, 1.6), "normserve": _level(64, ours_64 * speed, 5.5)},
    }
    return {
        "batch": 64,
        "row_us": 50.0 / speed,
        "batch1_ms": 0.06 / speed,
        "levels": {"json": levels, "binary": levels},
    }


def test_a_level_is_judged_against_onnxruntime_measured_around_it_where_the_round_did_so() -> None:
    # The machine slows by a fifth between the round's start and its 64-connection level: normserve's
    # throughput there is judged against onnxruntime's time around that level, not the round's first.
    slowed = _round(1.0, 11_500 * 0.8)
    # binary's levels keep the round's figures (normserve slowed, bare and onnxruntime not): truly slower there
    slowed["levels"]["json"] = dict(slowed["levels"]["json"])
    slowed["levels"]["json"]["64"] = {
        "bare": _level(64, 40_000 * 0.8, 1.6),
        "normserve": _level(64, 11_500 * 0.8, 5.5),
        "row_us": 50.0 / 0.8,
        "batch1_ms": 0.06 / 0.8,
    }
    rows = {
        (r["encoding"], r["conns"]): r
        for r in limit_rows(_results(normserve_64=11_000) | {"limit": {"rounds": [slowed]}})
    }
    assert rows[("json", 64)]["share"] == pytest.approx(11_500 / (1 / (25e-6 + 50e-6)))  # 86 %, as unslowed
    assert rows[("json", 64)]["row_us"] == pytest.approx(62.5)
    assert rows[("binary", 64)]["share"] == pytest.approx(11_500 * 0.8 / (1 / (25e-6 + 50e-6)))
    assert rows[("json", 1)]["p50_bound_ms"] == pytest.approx(1.2 * (0.1 + 0.06))  # the round's, as measured


def test_side_by_side_rounds_judge_each_share_within_its_round_and_take_the_median() -> None:
    # The machine slows down by a third in the second round: each round's share is the same, and so is the
    # median, where figures taken minutes apart would mix a fast round's limit with a slow round's throughput.
    results = _results(normserve_64=11_000) | {"limit": {"rounds": [_round(1.0, 11_500), _round(0.67, 11_500)]}}
    results["limit"]["rounds"].append(_round(1.0, 10_000))  # a third round, below the goal
    rows = {(r["encoding"], r["conns"]): r for r in limit_rows(results)}
    top = rows[("json", 64)]
    assert [round(s, 3) for s in top["shares"]] == [0.863, 0.863, 0.75]
    assert top["share"] == pytest.approx(11_500 / (1 / (25e-6 + 50e-6)))  # the median round's
    assert top["throughput"] == pytest.approx(10_000)  # each figure's own median: of 11,500, 7,705 and 10,000
    judged = {t["goal"].split(":")[0]: t for t in limit_targets(results)}
    loaded = judged["tiny, json, 16 and 64 conns"]
    assert loaded["met"] is True and "the median of 3 side-by-side rounds" in loaded["goal"]
    one = rows[("json", 1)]
    assert one["p50_ms"] == pytest.approx(0.2) and one["p50_bound_ms"] == pytest.approx(1.2 * (0.1 + 0.06))
    # the same figures measured apart (the suite's own levels) are still there to compare, but not judged
    assert {r["conns"] for r in apart_limit_rows(results)} == {1, 16, 64}


def test_the_one_connection_p50_is_judged_against_the_bound_of_its_own_round() -> None:
    # Two rounds in a steady stretch, normserve 4 % and 3 % over its bound; a third where the machine was busy
    # while the bare app ran (its bound 0.42 ms) and quiet while normserve did. The medians of the p50s and of
    # the bounds, taken from different rounds, would meet the goal (0.25 against 0.252 ms); round by round it
    # is missed in the median round.
    results = _results(normserve_64=11_000) | {"limit": {"rounds": [_round(1.0, 11_500) for _ in range(3)]}}
    for measured, bare_p50, ours_p50 in zip(
        results["limit"]["rounds"], (0.15, 0.16, 0.30), (0.25, 0.26, 0.10), strict=True
    ):
        measured["batch1_ms"] = 0.05
        measured["levels"] = {
            encoding: levels | {"1": {"bare": _level(1, 10_000, bare_p50), "normserve": _level(1, 2_500, ours_p50)}}
            for encoding, levels in measured["levels"].items()
        }
    one = next(r for r in limit_rows(results) if r["encoding"] == "json" and r["conns"] == 1)
    assert [round(r, 3) for r in one["p50_ratios"]] == [1.042, 1.032, 0.238]
    assert one["p50_ms"] == pytest.approx(0.25) and one["p50_bound_ms"] == pytest.approx(0.252)
    judged = {t["goal"].split(":")[0]: t for t in limit_targets(results)}["tiny, json, 1 conn"]
    assert judged["met"] is False
    assert "each round's against its own bound 1.04x, 1.03x, 0.24x: 1.03x in the median round" in judged["measured"]
    # a round 10 % under its bound in place of the second: the median round is under its own
    results["limit"]["rounds"][1]["levels"]["json"]["1"]["normserve"] = _level(1, 2_500, 0.9 * 0.252)
    assert {t["goal"].split(":")[0]: t for t in limit_targets(results)}["tiny, json, 1 conn"]["met"] is True


def _perf_row(protocol: str, conns: int, throughput: float, p50_us: float, streaming: bool = False) -> dict[str, Any]:
    return {
        "model": "cnn-bn",
        "protocol": protocol,
        "json": False,
        "streaming": streaming,
        "Concurrency": float(conns),
        "Inferences/Second": throughput,
        "p50 latency": p50_us,
    }


def test_t8_says_so_where_perf_analyzer_printed_no_latency_for_a_level() -> None:
    # perf_analyzer's windows never agreed at HTTP binary's first level, and its last window's output held a
    # throughput but no latency (0): the report is still written, and the p50 at that level is not judged met.
    rows = [
        _perf_row("http", 1, 3_300.0, 0.0),
        _perf_row("grpc", 1, 1_200.0, 734.0),
        _perf_row("grpc", 1, 1_900.0, 468.0, streaming=True),
        _perf_row("http", 16, 9_000.0, 1_700.0),
        _perf_row("grpc", 16, 9_500.0, 1_600.0),
    ]
    (t8,) = perf_targets({"perf_analyzer": {"rows": rows}})
    assert "p50 at 1: not measured" in t8["measured"] and not t8["met"]
    assert "0.36x at 1" in t8["measured"] and "1.06x at 16" in t8["measured"]
    # with its latency there, the same level is judged: gRPC's p50 within 10 % of HTTP's
    rows[0]["p50 latency"] = 700.0
    (t8,) = perf_targets({"perf_analyzer": {"rows": rows}})
    assert "p50 at 1: 1.05x" in t8["measured"] and "p50 at 1: 0.67x" in t8["measured"]  # calls, then streams
