"""normserve's own CPU per inference request, in-process: its HTTP protocol, app and batcher fed requests
by stand-in connections, with no sockets, no kernel and no load generator sharing the machine.

    taskset -c 0 python -m bench.overhead --model cnn-bn --connections 64 --stub

Each round, every connection receives one request (real held-out digits, JSON or binary, as
``bench.loadgen`` sends them) and the round ends when every connection has its answer (each must be a
200). The CPU time of the rounds divided by the requests is the cost per request; onnxruntime's share is
timed around ``session.run``. With ``--stub`` onnxruntime is replaced by the answer it gave the first
time for each batch size, which takes its cost and its noise out: what is left is normserve's own work,
steady enough to compare two versions of the code a microsecond apart (run each in turn, a few times).
The figure leaves out what the kernel and uvloop's socket work add per request over a network: the
suite's bare ASGI app measures that part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime.capi.onnxruntime_inference_collection as ort_session
import uvicorn
import uvloop

from bench.loadgen.driver import Target, encode_request
from bench.loadgen.samples import build_requests, read_signature
from service.app import create_app
from service.config import Settings
from service.transport import server_config

__all__ = ["main", "measure"]

ROOT = Path(__file__).resolve().parent.parent


class _Connection:
    """A stand-in for the socket under one connection: what the server writes is kept, nothing is sent."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None: ...


class _Timed:
    """onnxruntime's ``Session.run``, timed; with ``stub``, run once per batch size and then answered from
    that first answer."""

    def __init__(self, stub: bool) -> None:
        self.seconds, self.stub = 0.0, stub
        self.run = ort_session.Session.run
        self.answers: dict[tuple[Any, ...], Any] = {}

    def __call__(self, session: Any, output_names: Any, feeds: dict[str, np.ndarray], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            if not self.stub:
                return self.run(session, output_names, feeds, *args)
            key = (id(session), *(a.shape for a in feeds.values()))
            if key not in self.answers:
                self.answers[key] = self.run(session, output_names, feeds, *args)
            return self.answers[key]
        finally:
            self.seconds += time.perf_counter() - started


async def measure(
    repository: Path, model: str, encoding: str, connections: int, rounds: int, stub: bool, warmup: int = 30
) -> dict[str, Any]:
    settings = Settings(
        repository=repository, provider="cpu", port=0, grpc_port=0, intra_op_threads=1, log_level="warning"
    )
    app = create_app(settings)
    config = server_config(app, settings)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[])
    while not app.state.normserve.started:
        await asyncio.sleep(0.05)
    target = Target("127.0.0.1", 8000, f"/v2/models/{model}/infer")
    signature = read_signature(repository / model / "config.json")
    requests = [encode_request(target, body, headers) for body, headers in build_requests(signature, encoding)]
    links = [_Connection() for _ in range(connections)]
    protocols = []
    for link in links:
        protocol = config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=server.server_state, app_state=server.lifespan.state
        )
        protocol.connection_made(link)
        protocols.append(protocol)

    async def one_round(k: int) -> None:
        for i, protocol in enumerate(protocols):
            protocol.data_received(requests[(k * connections + i) % len(requests)])
        while not all(link.written for link in links):
            await asyncio.sleep(0)
        for link in links:
            if not link.written[0].startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"the server did not answer 200: {link.written[0][:300]!r}")
            link.written.clear()

    for k in range(warmup):
        await one_round(k)
    timed = _Timed(stub)

    def run(session: Any, *args: Any) -> Any:  # a function, so that it binds as the method did
        return timed(session, *args)

    ort_session.Session.run = run  # type: ignore[method-assign]
    try:
        started = time.process_time()
        for k in range(rounds):
            await one_round(k)
        cpu = time.process_time() - started
    finally:
        ort_session.Session.run = timed.run  # type: ignore[method-assign]
    for protocol in protocols:  # the connections end, so that the shutdown has none to wait for
        protocol.connection_lost(None)
    await server.shutdown()
    n = rounds * connections
    return {
        "model": model,
        "encoding": encoding,
        "connections": connections,
        "requests": n,
        "onnxruntime": "stubbed" if stub else "run",
        "cpu_us_per_request": round(cpu / n * 1e6, 2),
        "onnxruntime_us_per_request": round(timed.seconds / n * 1e6, 2),
        "outside_onnxruntime_us_per_request": round((cpu - timed.seconds) / n * 1e6, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="cnn-bn")
    parser.add_argument("--encoding", choices=["json", "binary"], default="json")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=300, help="requests = rounds x connections")
    parser.add_argument("--stub", action="store_true", help="onnxruntime answered from its first answer per batch")
    args = parser.parse_args(argv)
    result = uvloop.run(measure(args.repository, args.model, args.encoding, args.connections, args.rounds, args.stub))
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
