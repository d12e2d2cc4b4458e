"""
Fold BatchNorm, export ONNX, verify and write the model repository.

    python -m export.build                     # the default set: train and export what is missing or stale
    python -m export.build cnn-bn vit-bn       # some of the default set
    python -m export.build --force             # export again even where the repository has the model
    python -m export.build --retrain           # train again too
    python -m export.build --checkpoint artifacts/cnn-bn/checkpoint.pt
    python -m export.build --precise-bn        # fold recomputed population statistics, not the EMA

Each export is verified (export/verify.py: no BatchNormalization node, parity with the unfolded
PyTorch model, batch invariance, held-out accuracy against the model's target) and refused, writing
nothing to the repository, if a check fails. A model with BatchNorm also gets its batch-statistics
graph (export/batch_stats.py: the model as train() mode normalizes, checked against PyTorch) and
its running statistics, written beside model.onnx as batch_stats.onnx and bn_stats.json.
For a trained model with BatchNorm the report gives the held-out accuracy with the running
statistics training left (the EMA) and with precise statistics (export/precise.py: recomputed over
the training split with the weights frozen), and says which of the two was folded: the EMA, unless
--precise-bn is given.
The full report goes to <artifacts>/<name>/export_report.json either way, and into the
repository beside model.onnx when the export is accepted. A summary table ends the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import onnxscript
import torch
from torch import nn
from tqdm import tqdm

from export.batch_stats import batchnorm_layers, export_batch_stats, running_statistics, verify_batch_stats
from export.fold import FoldError, fold_batchnorms
from export.graphs import batch_stats_artifacts
from export.onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, export_onnx, op_histogram
from export.precise import precise_statistics, with_precise_statistics
from export.verify import Verification, VerificationError, verify_export
from models.data import LABELS, load_splits
from models.norms import ChannelLayerNorm, SwitchableNorm2d
from models.train import checkpoint_matches, evaluate, init_untrained, load_checkpoint, train_model
from models.zoo import DEFAULT_MODELS
from repository import (
    ModelConfig,
    ModelVersion,
    RepositoryError,
    TensorSpec,
    load_version,
    sha256_file,
    write_version,
)

__all__ = [
    "BuildOptions",
    "build_defaults",
    "choose_bn_statistics",
    "up_to_date",
    "export_checkpoint",
    "export_model",
    "library_versions",
    "norm_layer_counts",
    "verification_inputs",
    "main",
]

EXPORT_ERRORS = (VerificationError, FoldError, RepositoryError, ValueError)
NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    ChannelLayerNorm,
    SwitchableNorm2d,
)
RANDOM_SAMPLES = 64
# Bumped when the exporter writes something new into a version: older exports are then rebuilt.
EXPORT_FORMAT = "normserve.export/3"  # 2: batch-statistics graph and BatchNorm statistics; 3: EMA vs precise
DIGITS_INPUT = "8x8 grayscale digit, pixel intensities in [0, 1] (scikit-learn load_digits images / 16)"


def norm_layer_counts(model: nn.Module) -> dict[str, int]:
    return dict(Counter(type(m).__name__ for m in model.modules() if isinstance(m, NORM_TYPES)))


def verification_inputs(meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The inputs a model is verified on: the digits' held-out test split for a trained model
    (normserve trains on the digits), seeded random images for an untrained one."""
    cfg = meta["config"]
    shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    if meta["trained"]:
        data = load_splits()
        if data.x_test.shape[1:] != shape:
            raise ValueError(
                f"{meta['name']}: trained on digits of shape {data.x_test.shape[1:]}, but its input is {shape}"
            )
        return np.array(data.x_test), np.array(data.y_test), "digits test split"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((RANDOM_SAMPLES, *shape))
    return x.astype(np.float32), None, f"{RANDOM_SAMPLES} seeded standard-normal images"


def library_versions() -> dict[str, str]:
    """The versions of the libraries an export depends on, for its report."""
    return {m.__name__: m.__version__ for m in (torch, onnx, onnxscript, onnxruntime)}


def export_model(
    model: nn.Module, meta: dict[str, Any], repository: Path, version: str = "1", *, precise_bn: bool = False
) -> tuple[ModelVersion, dict[str, Any]]:
    """Fold, export, verify and write one model; raise VerificationError (writing nothing) on failure.

    Args:
        model: the trained model, unfolded, as loaded from its checkpoint.
        meta: the checkpoint without its weights (name, arch, config, trained, metrics, ...).
        repository: the repository's root folder.
        version: the version folder to write.
        precise_bn: fold precise statistics (recomputed over the training split) instead of the EMA.

    Returns:
        The written version, read back, and the full report.
    """
    start = time.perf_counter()
    name = meta["name"]
    x, y, inputs_desc = verification_inputs(meta)
    example = torch.tensor(x[:2])
    model, bn_statistics = choose_bn_statistics(model.eval(), meta, x, y, precise_bn)
    folded = fold_batchnorms(model, example)
    served = export_onnx(folded.model, example)
    ops_unfolded = op_histogram(export_onnx(model, example, optimize=False))
    ops_folded = op_histogram(export_onnx(folded.model, example, optimize=False))
    verification = verify_export(served, model, x, y, meta.get("min_test_accuracy") or 0.0)
    files, batch_stats_report = _batch_stats_files(model, example, x, y, verification)
    checks = verification.as_dict()
    report: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "model": name,
        "version": version,
        "trained": meta["trained"],
        "description": meta["description"],
        "verified_on": inputs_desc,
        "checks": checks,
        "test_accuracy": checks["accuracy"]["figures"]["accuracy"] if "accuracy" in checks else None,
        "test_accuracy_pytorch": meta["metrics"].get("test_accuracy"),
        "folds": [vars(f) for f in folded.folds],
        "unfoldable": [vars(u) for u in folded.unfoldable],
        "opset": OPSET,
        "ops": {
            "unfolded": ops_unfolded,
            "folded": ops_folded,
            "served": op_histogram(served),
            "note": "unfolded and folded: exporter optimizer off, so its own BatchNorm folding hides nothing; "
            "served: the graph written as model.onnx (exporter optimizer on)",
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "served_weights": sum(int(np.prod(t.dims)) for t in served.graph.initializer),
        "norm_layers": norm_layer_counts(model),
        "bn_statistics": bn_statistics,
        "batch_stats": batch_stats_report,
        "versions": library_versions(),
        "checkpoint_sha256": meta.get("checkpoint_sha256"),
        "export_seconds": round(time.perf_counter() - start, 2),
    }
    if not verification.passed:
        raise VerificationError([c for c in verification.checks if not c.passed], report)
    config = ModelConfig(
        name=name,
        max_batch_size=meta["max_batch_size"],
        inputs=[TensorSpec(name=INPUT_NAME, datatype="FP32", shape=[-1, *x.shape[1:]])],
        outputs=[TensorSpec(name=OUTPUT_NAME, datatype="FP32", shape=[-1, verification.outputs.shape[1]])],
        labels=LABELS if meta["trained"] else [],
        norm_layers=report["norm_layers"],
        trained=meta["trained"],
        description=meta["description"],
        input_description=DIGITS_INPUT if y is not None else "image tensor (random weights: outputs carry no meaning)",
    )
    written = write_version(repository, config, version, served.SerializeToString(), report, files)
    return written, written.report.model_dump()


def choose_bn_statistics(
    model: nn.Module, meta: dict[str, Any], x: np.ndarray, y: np.ndarray | None, precise: bool
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model to fold (``model`` with its EMA statistics, or a copy with precise ones) and what the
    report says of both; None for a model without BatchNorm."""
    if not batchnorm_layers(model):
        return model, None
    if not meta["trained"] or y is None:
        return model, {
            "folded": "calibrated",
            "note": "untrained: its statistics are averages over seeded random images, and there is no "
            "training split to recompute them over",
        }
    batch_size = meta["train_config"]["batch_size"]
    x_train = load_splits().x_train
    precise_model = with_precise_statistics(model, precise_statistics(model, x_train, batch_size))
    accuracy = {"ema": evaluate(model, x, y)[1], "precise": evaluate(precise_model, x, y)[1]}
    report = {
        "folded": "precise" if precise else "ema",
        "test_accuracy": accuracy,
        "momentum": meta["train_config"].get("bn_momentum"),
        "precise_over": f"training split, {len(x_train)} samples in train() batches of {batch_size}",
    }
    return (precise_model if precise else model), report


def _batch_stats_files(
    model: nn.Module, example: torch.Tensor, x: np.ndarray, y: np.ndarray | None, verification: Verification
) -> tuple[dict[str, bytes], dict[str, Any] | None]:
    """For a model with BatchNorm: its batch-statistics graph and statistics, as files to write beside
    model.onnx, and what the report says of them. Their checks join ``verification``."""
    if not batchnorm_layers(model):
        return {}, None
    graph, layer_names = export_batch_stats(model, example)
    verification.checks.extend(verify_batch_stats(graph, model, layer_names, x, y))
    return batch_stats_artifacts(graph, OUTPUT_NAME, running_statistics(model, layer_names, example))


def export_checkpoint(
    checkpoint: Path, repository: Path, version: str = "1", *, precise_bn: bool = False
) -> dict[str, Any]:
    """Export one checkpoint; its report is also written beside it, as export_report.json."""
    model, meta = load_checkpoint(checkpoint)
    meta["checkpoint_sha256"] = sha256_file(checkpoint)
    report_file = checkpoint.parent / "export_report.json"
    try:
        _, report = export_model(model, meta, repository, version, precise_bn=precise_bn)
    except VerificationError as e:
        if e.report is not None:
            report_file.write_text(json.dumps(e.report, indent=2))
        raise
    report_file.write_text(json.dumps(report, indent=2))
    return report


def _summary_row(report: dict[str, Any]) -> str:
    checks = report["checks"]
    acc = report["test_accuracy"]
    return (
        f"| {report['model']} | {'yes' if report['trained'] else 'no'} | "
        f"{'-' if acc is None else f'{acc:.2%}'} | {checks['parity']['figures']['max_abs_diff']:.2e} | "
        f"{checks['batch_invariance']['figures']['max_abs_diff']:.2e} | {len(report['folds'])} | "
        f"{len(report['unfoldable'])} | {sum(report['ops']['served'].values())} | {report['parameters']:,} |"
    )


def summary_table(reports: list[dict[str, Any]]) -> str:
    head = (
        "| model | trained | test accuracy | parity max abs diff | batch invariance max abs diff | "
        "BN folded | BN as affine | served ops | parameters |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *(_summary_row(r) for r in reports)])


@dataclass(frozen=True)
class BuildOptions:
    artifacts: Path = Path("artifacts")  # checkpoints and logs
    repository: Path = Path("model_repository")
    version: str = "1"
    force: bool = False  # export even where the repository has the model
    retrain: bool = False  # train even where a checkpoint exists
    precise_bn: bool = False  # fold precise statistics instead of the EMA


def up_to_date(options: BuildOptions, name: str, checkpoint: Path) -> dict[str, Any] | None:
    """The report of the built version if this exporter made it from ``checkpoint`` as it is now, with
    the statistics asked for, else None."""
    try:
        report = load_version(options.repository / name, options.version).report.model_dump()
    except RepositoryError:
        return None
    current = report.get("format") == EXPORT_FORMAT and report.get("checkpoint_sha256") == sha256_file(checkpoint)
    folded = (report.get("bn_statistics") or {}).get("folded")
    wrong_statistics = folded in ("ema", "precise") and folded != ("precise" if options.precise_bn else "ema")
    return report if current and not wrong_statistics else None


def build_defaults(names: list[str], options: BuildOptions) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Train what is missing or stale, then export what the repository lacks or holds from another checkpoint.

    A model that fails does not stop the others. Returns the reports and, by model, the errors.
    """
    reports, errors = [], {}
    bar = tqdm(names, desc="models", unit="model")
    for name in bar:
        try:
            report = _build_one(name, options, bar)
        except EXPORT_ERRORS as e:
            bar.write(f"{name}: FAILED: {e}")
            errors[name] = str(e)
        else:
            reports.append(report)
    return reports, errors


def _build_one(name: str, options: BuildOptions, bar: tqdm) -> dict[str, Any]:
    spec = DEFAULT_MODELS[name]
    checkpoint = options.artifacts / name / "checkpoint.pt"
    stale = checkpoint.exists() and not checkpoint_matches(checkpoint, spec)
    if stale:
        bar.write(f"{name}: the checkpoint was made from an older spec; training again")
    if options.retrain or stale or not checkpoint.exists():
        bar.set_postfix_str(f"{name}: training")
        if spec.train is None:
            init_untrained(spec, options.artifacts / name)
        else:
            train_model(spec, options.artifacts / name)
    elif not options.force and (report := up_to_date(options, name, checkpoint)):
        bar.write(f"{name}: already in {options.repository}, skipped (use --force to export again)")
        return report
    bar.set_postfix_str(f"{name}: exporting")
    report = export_checkpoint(checkpoint, options.repository, options.version, precise_bn=options.precise_bn)
    bar.write(f"{name}: written; " + "; ".join(c["detail"] for c in report["checks"].values()))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "names", nargs="*", help=f"models of the default set (default: all of {', '.join(DEFAULT_MODELS)})"
    )
    parser.add_argument("--checkpoint", type=Path, help="export this checkpoint instead of the default set")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="checkpoints and logs")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--version", default="1", help="version folder to write (a positive integer)")
    parser.add_argument("--force", action="store_true", help="export even where the repository has the model")
    parser.add_argument("--retrain", action="store_true", help="train again even where a checkpoint exists")
    parser.add_argument(
        "--precise-bn", action="store_true", help="fold statistics recomputed over the training split, not the EMA"
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in DEFAULT_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; expected names from {list(DEFAULT_MODELS)}")
    if args.checkpoint and args.names:
        parser.error("give either --checkpoint or model names, not both")
    start = time.perf_counter()
    if args.checkpoint:
        try:
            report = export_checkpoint(args.checkpoint, args.repository, args.version, precise_bn=args.precise_bn)
            reports, errors = [report], {}
        except EXPORT_ERRORS as e:
            reports, errors = [], {str(args.checkpoint): str(e)}
    else:
        names = args.names or list(DEFAULT_MODELS)
        options = BuildOptions(args.artifacts, args.repository, args.version, args.force, args.retrain, args.precise_bn)
        reports, errors = build_defaults(names, options)
    if reports:
        table = summary_table(reports)
        print(f"\n{table}\n\nmodel repository: {args.repository.resolve()} ({time.perf_counter() - start:.0f} s)")
        args.artifacts.mkdir(parents=True, exist_ok=True)
        (args.artifacts / "summary.md").write_text(table + "\n")
    for name, error in errors.items():
        print(f"error: {name}: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
