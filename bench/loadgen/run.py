"""One load level, measured in windows: warm up, then measure until stable, for a duration, or for a count.

Three ways to bound a level, as Triton's perf_analyzer has them:
- by default, windows until the last 3 agree within ``stability`` (10 %) on throughput and median
  latency, or ``max_windows`` pass; the result is the last 3 windows, marked stable or not;
- ``duration_s``: measure that long, and report every window;
- ``requests``: send exactly that many after the warm-up, and report every one of them.
"""

from __future__ import annotations

import asyncio
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.loadgen.driver import Load, Target, clock
from bench.loadgen.stats import Window, is_stable, summarize

__all__ = ["LevelResult", "RunConfig", "cpu_seconds", "run_level", "run_levels"]

STABLE_WINDOWS = 3


@dataclass(frozen=True)
class RunConfig:
    warmup_s: float = 2.0
    window_s: float = 2.0
    max_windows: int = 10
    stability: float = 0.10
    duration_s: float | None = None
    requests: int | None = None
    timeout_s: float = 30.0  # one request's deadline, and the most the end of a level waits for answers
    connections: int = 64  # open loop: the connection pool due requests go out on
    poisson: bool = False
    server_pid: int | None = None  # sample this process's CPU time in every window
    # Open loop: at the level's end, drop the due requests still waiting for a free connection instead of
    # sending them (past capacity over a fixed pool, the client's own queue outgrows what a drain can send).
    drop_backlog: bool = False
    progress: bool = True


@dataclass
class LevelResult:
    mode: str  # "concurrency" or "rate"
    level: float
    windows: list[Window]  # every window measured
    reported: list[Window]  # the windows the summary's throughput comes from
    drained: Window  # answers that arrived after the last window closed
    stable: bool
    max_backlog: int = 0
    server_rss_mb: float | None = None
    unsent: int = 0  # due requests dropped at the end, never sent (``RunConfig.drop_backlog``)

    def summary(self) -> dict[str, Any]:
        result = {"mode": self.mode, "level": self.level, "stable": self.stable}
        result |= summarize(self.reported, self.drained)
        if self.mode == "rate":
            result["max_backlog"] = self.max_backlog
            result["unsent"] = self.unsent
        if self.server_rss_mb is not None:
            result["server_rss_mb"] = self.server_rss_mb
        return result


def cpu_seconds(pid: int) -> float:
    """The CPU time a process and its children have used so far, user and system: the one reader of a
    server's CPU (with worker processes, the supervisor's and every worker's)."""
    import psutil

    process = psutil.Process(pid)
    total = 0.0
    for each in [process, *process.children(recursive=True)]:
        try:
            times = each.cpu_times()
        except psutil.NoSuchProcess:  # a worker that exited meanwhile
            continue
        total += times.user + times.system
    return total


def _server_cpu(pid: int | None) -> Callable[[], float | None]:
    if pid is None:
        return lambda: None
    return lambda: cpu_seconds(pid)


async def _sleep_until(moment: float, done: Callable[[], bool]) -> None:
    while (left := moment - clock()) > 0 and not done():
        await asyncio.sleep(min(left, 0.01))


async def run_level(target: Target, requests: list[bytes], mode: str, level: float, config: RunConfig) -> LevelResult:
    """Load ``target`` at one concurrency or rate and measure it (see the module docstring)."""
    from tqdm import tqdm

    if mode not in ("concurrency", "rate"):
        raise ValueError(f"mode is {mode!r}; expected 'concurrency' or 'rate'")
    load = Load(
        target,
        requests,
        concurrency=int(level) if mode == "concurrency" else 0,
        rate=level if mode == "rate" else 0.0,
        connections=config.connections,
        poisson=config.poisson,
        timeout_s=config.timeout_s,
    )
    cpu = _server_cpu(config.server_pid)
    if config.requests is not None:
        total, unit = config.requests, "req"
    elif config.duration_s is not None:
        total, unit = math.ceil(config.duration_s / config.window_s), "window"
    else:
        total, unit = config.max_windows, "window"
    bar = tqdm(total=total, unit=unit, desc=f"{mode} {level:g}", disable=not config.progress, leave=False)
    windows: list[Window] = []
    try:
        await load.connect()
        if config.warmup_s > 0:
            load.start()
            await asyncio.sleep(config.warmup_s)
            load.measure(config.requests)  # answers to the warm-up's requests are dropped
        else:
            load.measure(config.requests)
            load.start()
        start = load.measure_from
        cpu_before = cpu()
        while True:
            await _sleep_until(start + config.window_s * (len(windows) + 1), lambda: load.finished)
            window = load.swap()
            cpu_now = cpu()
            if cpu_now is not None and cpu_before is not None:
                window.server_cpu_s, cpu_before = cpu_now - cpu_before, cpu_now
            windows.append(window)
            bar.update(window.ok + sum(window.errors.values()) if unit == "req" else 1)
            row = window.row()
            bar.set_postfix_str(f"{row['throughput']:,.0f}/s p50 {row['p50_ms']} ms p99 {row['p99_ms']} ms")
            if config.requests is not None:
                if load.finished:
                    break
            elif config.duration_s is not None:
                if clock() - start >= config.duration_s - 1e-3:
                    break
            elif is_stable(windows, config.stability) or len(windows) >= config.max_windows:
                break
        load.stop()
        unsent = load.drop_backlog() if config.drop_backlog else 0
        if not await load.drain(config.timeout_s):
            left = load.outstanding
            load.window.fail("unanswered", f"no answer {config.timeout_s:g} s after the level ended", count=left)
        drained = load.swap()
    finally:
        bar.close()
        load.close()
        await asyncio.sleep(0)  # the loop's pass that closes their sockets, before a caller's loop may end
    bounded = config.requests is not None or config.duration_s is not None
    reported = windows if bounded else windows[-STABLE_WINDOWS:]
    rss = None
    if config.server_pid is not None:
        import psutil

        rss = round(psutil.Process(config.server_pid).memory_info().rss / 2**20, 1)
    return LevelResult(
        mode, level, windows, reported, drained, is_stable(windows, config.stability), load.max_backlog, rss, unsent
    )


def run_levels(
    target: Target, requests: list[bytes], levels: list[tuple[str, float]], config: RunConfig
) -> list[LevelResult]:
    """Measure each ``(mode, level)`` in turn, on uvloop when it is installed."""

    async def main() -> list[LevelResult]:
        return [await run_level(target, requests, mode, level, config) for mode, level in levels]

    # A full collection scanning everything imported so far (scikit-learn, numpy) stalls the
    # generator for milliseconds, and the stall would be charged to the server's tail.
    gc.collect()
    gc.freeze()

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())
