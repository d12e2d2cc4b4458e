"""Load-test an Open Inference Protocol server (normserve, Triton, KServe) and measure its latency.

Closed loop, 1, 16 and 64 clients, JSON requests of real held-out digits:

    python -m bench.loadgen --url http://127.0.0.1:8000 --model cnn-bn --concurrency 1 16 64

Open loop at fixed rates (latency charged from each request's due time), binary tensor data,
results written to results/cnn-bn.{json,csv,png}:

    python -m bench.loadgen --model cnn-bn --encoding binary --rate 1000 2000 4000 --out results/cnn-bn

Each level warms up, then measures windows until the last 3 agree within 10 % (or --duration /
--requests bound it instead). A server that serves no model metadata (a bare ASGI app, say) takes
its request shape from a repository's config.json: --model-config and --path. With --server-pid,
the server's CPU time per request is measured too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.loadgen.driver import Target, encode_request
from bench.loadgen.report import plot, table, write_csv, write_json
from bench.loadgen.run import RunConfig, run_levels
from bench.loadgen.samples import ENCODINGS, build_requests, fetch_signature, read_signature

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    p.add_argument("--model", default="cnn-bn", help="model name (default %(default)s)")
    p.add_argument("--encoding", choices=ENCODINGS, default="json", help="request body (default %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="rows per request (default %(default)s)")
    p.add_argument("--path", help="request path (default /v2/models/MODEL/infer)")
    p.add_argument("--model-config", type=Path, help="take the input from this config.json, not from the server")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, nargs="+", metavar="N", help="closed loop: N clients (default 1)")
    load.add_argument("--rate", type=float, nargs="+", metavar="R", help="open loop: R requests/s on a schedule")
    p.add_argument("--connections", type=int, default=64, help="open loop: connections to send on (default 64)")
    p.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals instead of evenly spaced")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, metavar="S", help="measure each level S seconds")
    bound.add_argument("--requests", type=int, metavar="N", help="send each level exactly N requests")
    p.add_argument("--warmup", type=float, default=2.0, metavar="S", help="unmeasured seconds first (default 2)")
    p.add_argument("--window", type=float, default=2.0, metavar="S", help="window length (default 2)")
    p.add_argument("--max-windows", type=int, default=10, help="give up on stability after this many (default 10)")
    p.add_argument("--stability", type=float, default=0.10, help="stability tolerance (default 0.10)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per-request timeout (default 30)")
    p.add_argument("--server-pid", type=int, help="measure this process's CPU time per request")
    p.add_argument("--out", type=Path, help="write OUT.json, OUT.csv and OUT.png")
    p.add_argument("--label", help="the run's name in tables and plots (default MODEL ENCODING)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("batch", "connections", "max_windows"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')} is {getattr(args, name)}; expected 1 or more")
    levels = [("rate", r) for r in args.rate] if args.rate else [("concurrency", c) for c in args.concurrency or [1]]
    if any(level <= 0 for _, level in levels):
        parser().error("every --concurrency and --rate must be above 0")
    try:
        signature = read_signature(args.model_config) if args.model_config else fetch_signature(args.url, args.model)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read the model's inputs: {exc}", file=sys.stderr)
        return 2
    target = Target.parse(args.url, args.path or f"/v2/models/{args.model}/infer")
    bodies = build_requests(signature, args.encoding, args.batch)
    requests = [encode_request(target, body, headers) for body, headers in bodies]
    config = RunConfig(
        warmup_s=args.warmup,
        window_s=args.window,
        max_windows=args.max_windows,
        stability=args.stability,
        duration_s=args.duration,
        requests=args.requests,
        timeout_s=args.timeout,
        connections=args.connections,
        poisson=args.poisson,
        server_pid=args.server_pid,
        progress=not args.quiet,
    )
    label = args.label or f"{args.model} {args.encoding}"
    try:
        results = run_levels(target, requests, levels, config)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = {label: results}
    print(table(runs))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "url": args.url, "model": args.model, "encoding": args.encoding}
        write_json(Path(f"{args.out}.json"), meta, runs)
        write_csv(Path(f"{args.out}.csv"), runs)
        summaries = {name: [r.summary() for r in levels] for name, levels in runs.items()}
        plot(Path(f"{args.out}.png"), summaries, f"{label}: latency against throughput")
        print(f"wrote {args.out}.json, .csv and .png", file=sys.stderr)
    failed = sum(sum(r.summary()["errors"].values()) for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
