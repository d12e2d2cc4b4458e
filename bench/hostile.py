"""Hostile clients against a running server: how long it holds them, what it answers, what memory it keeps.

    python -m service &                      # any normserve (or other HTTP server) on a port
    python -m bench.hostile --url http://127.0.0.1:8000 --pid $!

Each attack runs alone, while a normal client asks for readiness every 20 ms on its own connection:
- headers:   8 connections, each sending one header line of up to 32 MB that never ends
- fields:    one request with 100,000 header fields
- slowloris: 500 connections sending a request head one byte every 3 s
- silent:    2,000 connections that never send a byte
- slow-body: 200 inference requests (to ``--model``) declaring a 1,000-byte body and sending 10 bytes of it

Printed: per attack, the answers the attackers got, how long the server held their connections (median,
max), the normal client's median and slowest answer, and with ``--pid`` the server's RSS before, at its
peak and after. Attackers still open after ``--hold`` seconds are counted as held and closed by the script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psutil

__all__ = ["Outcome", "main", "run_attacks"]

HEAD = b"GET /v2/health/ready HTTP/1.1\r\nHost: normserve\r\n"


@dataclass
class Outcome:
    attack: str
    connections: int
    answers: Counter[str] = field(default_factory=Counter)
    held_s: list[float] = field(default_factory=list)  # per connection, until the server closed it
    still_open: int = 0
    normal_s: list[float] = field(default_factory=list)
    normal_failures: int = 0  # the normal client's connections that failed or were closed on it
    rss_mb: tuple[float, float, float] | None = None  # before, peak, after


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def _status_line(received: bytes) -> str:
    return received.split(b"\r\n", 1)[0].decode("latin-1")


Attacker = Callable[[asyncio.StreamWriter], Awaitable[None]]


async def attacker(host: str, port: int, send: Attacker, hold_s: float, outcome: Outcome) -> None:
    """One connection: ``send`` runs while the answer is awaited; the time until the server closes is kept."""
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    sending = asyncio.ensure_future(send(writer))
    received = b""
    try:
        async with asyncio.timeout(hold_s):
            while chunk := await reader.read(65536):
                received += chunk
        outcome.held_s.append(time.monotonic() - started)
        outcome.answers[_status_line(received) or "closed, no answer"] += 1
    except TimeoutError:
        outcome.still_open += 1
    except ConnectionError:
        outcome.held_s.append(time.monotonic() - started)
        outcome.answers[_status_line(received) or "reset"] += 1
    finally:
        sending.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await sending
        writer.close()


async def normal_client(host: str, port: int, stop: asyncio.Event, outcome: Outcome) -> None:
    """Readiness, again and again, timed. A connection the server closed is opened again, as any HTTP
    client would: on a busy machine the client may itself be slow enough to be taken for a silent one."""
    while not stop.is_set():
        writer = None
        try:
            reader, writer = await asyncio.open_connection(host, port)
            while not stop.is_set():
                started = time.monotonic()
                writer.write(HEAD + b"\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
                await reader.readexactly(length)
                outcome.normal_s.append(time.monotonic() - started)
                await asyncio.sleep(0.02)
        except (OSError, asyncio.IncompleteReadError):
            outcome.normal_failures += 1
            await asyncio.sleep(0.02)
        finally:
            if writer is not None:
                writer.close()


def attacks(model: str = "cnn-bn") -> dict[str, tuple[int, Attacker]]:
    post = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: normserve\r\nContent-Type: application/json\r\n".encode()

    async def endless_header(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"X-Flood: ")
        chunk = b"a" * 2**16
        for _ in range(32 * 2**20 // len(chunk)):
            writer.write(chunk)
            await writer.drain()

    async def fields(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(100_000)) + b"\r\n")
        await writer.drain()

    async def slowloris(writer: asyncio.StreamWriter) -> None:
        for byte in HEAD:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(3)

    async def silent(writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    async def slow_body(writer: asyncio.StreamWriter) -> None:
        writer.write(post + b"Content-Length: 1000\r\n\r\n" + b'{"inputs":')
        await writer.drain()

    return {
        "headers": (8, endless_header),
        "fields": (1, fields),
        "slowloris": (500, slowloris),
        "silent": (2000, silent),
        "slow-body": (200, slow_body),
    }


async def run_attack(url: str, name: str, hold_s: float, pid: int | None, model: str) -> Outcome:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    connections, send = attacks(model)[name]
    outcome = Outcome(name, connections)
    stop = asyncio.Event()
    normal = asyncio.ensure_future(normal_client(host, port, stop, outcome))
    before = peak = rss_mb(pid) if pid else 0.0

    async def sample() -> None:
        nonlocal peak
        while pid:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    await asyncio.gather(*(attacker(host, port, send, hold_s, outcome) for _ in range(connections)))
    await asyncio.sleep(1)  # the normal client keeps going a moment after
    stop.set()
    sampler.cancel()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await normal
    if pid:
        outcome.rss_mb = (before, peak, rss_mb(pid))
    return outcome


def run_attacks(url: str, names: list[str], hold_s: float, pid: int | None, model: str = "cnn-bn") -> list[Outcome]:
    return [asyncio.run(run_attack(url, name, hold_s, pid, model)) for name in names]


def table(outcomes: list[Outcome]) -> str:
    columns = ["attack", "connections", "answers", "held median / max", "still open", "normal client median / max"]
    columns.append("RSS MB before / peak / after")
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for o in outcomes:
        answers = ", ".join(f"{n} × {a}" for a, n in o.answers.most_common())
        held = f"{statistics.median(o.held_s):.2f} / {max(o.held_s):.2f} s" if o.held_s else "-"
        normal = f"{statistics.median(o.normal_s) * 1000:.1f} / {max(o.normal_s) * 1000:.0f} ms" if o.normal_s else "-"
        if o.normal_failures:
            normal += f" ({o.normal_failures} connections lost)"
        rss = " / ".join(f"{v:.0f}" for v in o.rss_mb) if o.rss_mb else "-"
        cells = [o.attack, str(o.connections), answers or "-", held, str(o.still_open), normal, rss]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, help="the server's process id, to read its RSS")
    parser.add_argument("--hold", type=float, default=60.0, help="give up on an attacker after this many seconds")
    parser.add_argument("--attacks", nargs="+", default=list(attacks()), choices=list(attacks()))
    parser.add_argument("--model", default="cnn-bn", help="the served model the slow bodies are sent to")
    args = parser.parse_args()
    print(table(run_attacks(args.url, args.attacks, args.hold, args.pid, args.model)))


if __name__ == "__main__":
    main()
