"""The table of docs/your-model.md: each example architecture through ``normserve export`` (and one ONNX
file through ``normserve import``), with its fold, its parity, and the latency of the folded graph
against the unfolded one in onnxruntime on one core.

    taskset -c 0 python -m bench.your_models                # print the table
    taskset -c 0 python -m bench.your_models --write        # and put it into docs/your-model.md

Each model is exported into a scratch repository exactly as the command does it (synthetic samples,
batch-statistics graph included). The unfolded graph is the same module exported with the exporter's
optimizer off (every BatchNormalization node kept) and its constants folded (as the report counts its
ops), or the ONNX file as given. Both are timed with the
service's session options and one intra-op thread, at batch 1 and 32, with onnxruntime's graph
optimizations on (what a user gets from each file: onnxruntime fuses Conv+BatchNorm itself, not
Gemm+BatchNorm or a BatchNorm after a ReLU) and, for the unfolded graph, off as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from bench.inprocess import time_batches
from export.intake import InputSpec, synthetic_samples

__all__ = ["EXAMPLES", "Example", "main", "measure"]

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "your-model.md"
BEGIN, END = "<!-- your-models table: begin -->", "<!-- your-models table: end -->"
BATCHES = [1, 32]


@dataclass(frozen=True)
class Example:
    name: str
    family: str
    target: str  # MODULE:CALLABLE, or an ONNX file written by examples/onnx_convnet.py
    inputs: tuple[str, ...]


EXAMPLES = [
    Example("resnet-bottleneck", "ResNet bottleneck", "examples/resnet.py:build", ("input:FP32:3,32,32",)),
    Example("mobilenet-v2", "MobileNetV2 inverted residuals", "examples/mobilenet.py:build", ("input:FP32:3,32,32",)),
    Example("efficientnet-se", "EfficientNet MBConv + SE", "examples/efficientnet.py:build", ("input:FP32:3,32,32",)),
    Example("densenet", "DenseNet-BC", "examples/densenet.py:build", ("input:FP32:3,32,32",)),
    Example("conv1d-fcn", "1-D conv net (FCN)", "examples/conv1d.py:build", ("signal:FP32:2,128",)),
    Example("tabular-mlp", "tabular MLP, BatchNorm1d", "examples/tabular.py:build", ("features:FP32:20",)),
    Example(
        "text-bn-encoder",
        "text transformer, BatchNorm",
        "examples/text.py:build",
        ("token_ids:INT64:32", "attention_mask:BOOL:32"),
    ),
    Example("untraceable-vgg", "VGG, not fx-traceable", "examples/untraceable.py:build", ("input:FP32:3,16,16",)),
    Example("convnet-bn-onnx", "ONNX file (onnx.helper)", "onnx", ()),
]


def _export(example: Example, repository: Path, scratch: Path) -> tuple[dict[str, Any], Path, list[InputSpec]]:
    """Export (or import) one example; its report, its unfolded graph, and its input specs."""
    if example.target == "onnx":
        from examples.onnx_convnet import build_graph
        from export.from_onnx import import_onnx

        original = scratch / f"{example.name}.onnx"
        onnx.save(build_graph(), original)
        _, report = import_onnx(original, example.name, repository)
        return report, original, [InputSpec.parse(text) for text in report["inputs"]]
    import torch

    from export.from_pytorch import export_pytorch, load_callable
    from export.onnx_export import export_onnx, fold_constants

    report = export_pytorch(example.target, example.name, list(example.inputs), repository)
    specs = [InputSpec.parse(text) for text in example.inputs]
    feeds = synthetic_samples(specs, 2)
    unfolded = fold_constants(
        export_onnx(
            load_callable(example.target),
            tuple(torch.tensor(feeds[s.name]) for s in specs),
            optimize=False,
            input_names=[s.name for s in specs],
            output_names=[],
        )
    )
    path = scratch / f"{example.name}.unfolded.onnx"
    onnx.save(unfolded, path)
    return report, path, specs


def measure(example: Example, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        report, unfolded, specs = _export(example, scratch / "repository", scratch)
        served = scratch / "repository" / example.name / report["version"] / "model.onnx"
        inputs = {s.name: s for s in specs}

        def feeds_for(batch: int) -> dict[str, Any]:
            return synthetic_samples(list(inputs.values()), batch, seed=1)

        timings = {
            "folded": time_batches(served, BATCHES, 1, True, seconds, feeds_for)["batches"],
            "unfolded": time_batches(unfolded, BATCHES, 1, True, seconds, feeds_for)["batches"],
            "unfolded, optimizations off": time_batches(unfolded, BATCHES, 1, False, seconds, feeds_for)["batches"],
        }
    folds = report["folds"]
    parity = report["checks"]["parity"]["figures"]
    return {
        "name": example.name,
        "family": example.family,
        "inputs": report["inputs"],
        "fold_path": report["fold_path"],
        "folded": sum(1 for f in folds if not f.get("forward")),
        "folded_forward": sum(1 for f in folds if f.get("forward")),
        "affine": len(report["unfoldable"]),
        "parity_max_abs_diff": parity["max_abs_diff"],
        "parity_of_tolerance": parity["worst_diff_over_tolerance"],
        "ops_served": sum(report["ops"]["served"].values()),
        "ops_unfolded": sum(report["ops"]["unfolded"].values()),
        "batchnorm_nodes_unfolded": report["ops"]["unfolded"].get("BatchNormalization", 0),
        "batch_stats": "yes" if (report.get("batch_stats") or {}).get("file") else "no",
        "ms": {variant: {str(b): t[b]["batch_ms"] for b in BATCHES} for variant, t in timings.items()},
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | family | inputs | BN folded / forward / affine | fold at | parity: max abs diff (of tolerance) "
        "| ops served / unfolded | batch 1: folded / unfolded (off) ms | batch 32: folded / unfolded (off) ms |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        ms = r["ms"]
        per_batch = [
            f"{ms['folded'][b]:.3f} / {ms['unfolded'][b]:.3f} ({ms['unfolded, optimizations off'][b]:.3f})"
            for b in map(str, BATCHES)
        ]
        lines.append(
            f"| {r['name']} | {r['family']} | {'<br>'.join(f'`{i}`' for i in r['inputs'])} "
            f"| {r['folded']} / {r['folded_forward']} / {r['affine']} | {r['fold_path']} "
            f"| {r['parity_max_abs_diff']:.2g} ({r['parity_of_tolerance']:.2g}) "
            f"| {r['ops_served']} / {r['ops_unfolded']} | {per_batch[0]} | {per_batch[1]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.your_models", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per batch size and graph")
    parser.add_argument("--only", nargs="*", help="some of the examples, by name")
    parser.add_argument("--write", action="store_true", help="replace the table in docs/your-model.md")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    chosen = [e for e in EXAMPLES if not args.only or e.name in args.only]
    rows = []
    here = Path.cwd()
    os.chdir(ROOT)  # the examples are loaded as examples/<file>.py, from the repository's root
    try:
        for example in chosen:
            start = time.perf_counter()
            rows.append(measure(example, args.seconds))
            print(f"{example.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    finally:
        os.chdir(here)
    text = table(rows)
    cores = sorted(os.sched_getaffinity(0))
    stamp = f"Measured {time.strftime('%Y-%m-%d')} on cores {cores} of this machine ({os.cpu_count()} in all)."
    print(f"{text}\n\n{stamp}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.write:
        doc = DOC.read_text()
        before, _, rest = doc.partition(BEGIN)
        _, _, after = rest.partition(END)
        DOC.write_text(f"{before}{BEGIN}\n{text}\n\n{stamp}\n{END}{after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
