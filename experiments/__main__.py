"""
Measure every claim about normalization on normserve's own models, and write docs/batchnorm.md.

    make experiments                          # train what is missing (cached), measure, plot, write the page
    python -m experiments --jobs 1            # one training at a time
    python -m experiments --redraw            # the page and plots again from the last results, measuring nothing
    python -m experiments --smoke --out /tmp/bn/batchnorm.md --plots /tmp/bn/plots --cache /tmp/bn/cache

The runs (every trained default model at three seeds, cnn-bn and cnn-gn at six training batch
sizes, cnn-bn at three momenta) are trained two at a time into --cache and reused by a rerun;
the default models themselves are taken from --artifacts and --repository where ``make models``
built them. Then every section is measured (the exported graphs run in onnxruntime), its figures
go to <cache>/results.json, the plots to --plots (the demo page serves them from there) and the
page to --out. ``--smoke`` runs every section on tiny models for a few steps: a check of the code,
not of the claims.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from experiments.measure import measure
from experiments.plan import FULL, SMOKE, Plan
from experiments.report import write_report
from experiments.runs import ensure
from export.build import EXPORT_ERRORS
from models.zoo import DEFAULT_MODELS

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "batchnorm.md", help="the page to write")
    parser.add_argument("--plots", type=Path, default=ROOT / "service" / "static" / "demo" / "plots")
    parser.add_argument("--cache", type=Path, default=Path("artifacts") / "experiments", help="trained runs")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="the default models' checkpoints")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time (each on one thread)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps: seconds, not evidence")
    parser.add_argument("--redraw", action="store_true", help="write the page and plots from <cache>/results.json")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.redraw:
        saved = args.cache / "results.json"
        if not saved.exists():
            parser.error(f"--redraw needs {saved}, which a full run writes; run without --redraw first")
        write_report(json.loads(saved.read_text()), args.out, args.plots)
        print(f"{args.out} written from {saved}, plots in {args.plots}")
        return 0
    start = time.perf_counter()
    plan = Plan(SMOKE if args.smoke else FULL)
    try:
        located = ensure(
            plan.all_runs(),
            args.cache,
            defaults=None if args.smoke else DEFAULT_MODELS,
            artifacts=args.artifacts,
            repository=args.repository,
            jobs=args.jobs,
        )
    except EXPORT_ERRORS as e:  # a run below its model's accuracy floor, say: nothing is measured from it
        print(f"error: {e}", file=sys.stderr)
        return 1
    trained = time.perf_counter() - start
    results = measure(plan, located, jobs=args.jobs)
    results["seconds"] = {"train_and_export": round(trained, 1), "total": round(time.perf_counter() - start, 1)}
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.cache / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, args.out, args.plots)
    print(f"{args.out} written, plots in {args.plots} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
