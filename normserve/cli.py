"""
Serve your own model: fold its BatchNorms, prove the folded graph answers as the original, write it into
the model repository, and serve the repository.

    normserve export MODULE:CALLABLE --name NAME --input NAME:DATATYPE:DIMS [--input ...] [--samples FILE.npz]
                     [--output NAME ...] [--max-batch-size N] [--labels FILE] [--description TEXT]
                     [--repository DIR] [--version N] [--force]
    normserve import FILE.onnx --name NAME [--samples FILE.npz] [--max-batch-size N] [--labels FILE]
                     [--description TEXT] [--repository DIR] [--version N] [--force]
    normserve serve            # what `python -m service` does, with the same NORMSERVE_* settings

MODULE is a .py file or a dotted module importable from the current folder; CALLABLE() returns an
nn.Module with its weights loaded. DIMS are one sample's dimensions without the batch axis
(input:FP32:3,224,224; token_ids:INT64:128), one --input per argument of forward, in its order.
--samples is an .npz with one array per input name, batch axis first (and optionally `labels`, one
class index per row, to check accuracy on); without it the samples are synthetic and the report says
so. --labels is a file of class names, one per line, for the classification extension.
--repository defaults to $NORMSERVE_REPOSITORY, else model_repository; --version to the next free one.
A model already in the repository needs --force (to add a version, or to replace --version N).

A mistake in what was given, or a model that fails a check, is one line on stderr and exit status 2;
nothing is written. `import` and `serve` need neither torch nor onnxscript.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

DEFAULT_REPOSITORY = "model_repository"  # service.config.Settings.repository's default
USAGE_ERROR = 2


def _repository() -> Path:
    return Path(os.environ.get("NORMSERVE_REPOSITORY") or DEFAULT_REPOSITORY)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="the model's name in the repository and in URLs")
    parser.add_argument("--samples", type=Path, help=".npz of real inputs (batch axis first) to verify on")
    parser.add_argument("--max-batch-size", type=int, default=64, help="most rows in one batch (default 64)")
    parser.add_argument("--labels", type=Path, help="class names of the first output, one per line")
    parser.add_argument("--description", default="", help="shown in the model's metadata")
    parser.add_argument("--repository", type=Path, help="default: $NORMSERVE_REPOSITORY, else model_repository")
    parser.add_argument("--version", type=int, help="version to write (default: the next free one)")
    parser.add_argument("--force", action="store_true", help="write into a model the repository already has")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,import,serve}")
    export = commands.add_parser("export", help="fold, export, verify and write a PyTorch module")
    export.add_argument("target", metavar="MODULE:CALLABLE")
    export.add_argument(
        "--input", action="append", required=True, metavar="NAME:DATATYPE:DIMS", help="one per argument of forward"
    )
    export.add_argument("--output", action="append", metavar="NAME", help="the outputs' names, in order")
    _common(export)
    onnx_import = commands.add_parser("import", help="fold, verify and write an ONNX file")
    onnx_import.add_argument("file", type=Path, metavar="FILE.onnx")
    _common(onnx_import)
    commands.add_parser("serve", help="serve the repository (python -m service)")
    return parser


def _step(total: int) -> Any:
    count = 0

    def progress(message: str) -> None:
        nonlocal count
        count += 1
        print(f"[{count}/{total}] {message}", file=sys.stderr, flush=True)

    return progress


def _summary(report: dict[str, Any], repository: Path) -> str:
    folds = report["folds"]
    forward = sum(1 for f in folds if f.get("forward"))
    lines = [
        f"{report['model']} version {report['version']} written to {repository / report['model'] / report['version']}",
        f"  BatchNorms: {len(folds) - forward} folded, {forward} folded forward, {len(report['unfoldable'])} as affine"
        f" (fold at the {'ONNX' if report['fold_path'] == 'onnx' else 'torch.fx'} level)",
        f"  verified on {report['verified_on']}:",
        *(f"    {name}: {check['detail']}" for name, check in report["checks"].items()),
    ]
    for u in report["unfoldable"]:
        lines.append(f"  kept as affine: {u['norm']}: {u['reason']}")
    if (report.get("batch_stats") or {}).get("unavailable"):
        lines.append(f"  no batch-statistics graph: {report['batch_stats']['unavailable']}")
    lines.append(
        "  serve it: normserve serve (or, on a server with NORMSERVE_MODEL_CONTROL=explicit, "
        f"POST /v2/repository/models/{report['model']}/load)"
    )
    return "\n".join(lines)


def _export(args: argparse.Namespace, repository: Path) -> dict[str, Any]:
    from export.from_pytorch import export_pytorch

    return export_pytorch(
        args.target,
        args.name,
        args.input,
        repository,
        samples_file=args.samples,
        output_names=args.output,
        max_batch_size=args.max_batch_size,
        labels_file=args.labels,
        description=args.description,
        version=args.version,
        force=args.force,
        progress=_step(6),
    )


def _import(args: argparse.Namespace, repository: Path) -> dict[str, Any]:
    from export.from_onnx import import_onnx

    _, report = import_onnx(
        args.file,
        args.name,
        repository,
        samples_file=args.samples,
        max_batch_size=args.max_batch_size,
        labels_file=args.labels,
        description=args.description,
        version=args.version,
        force=args.force,
        progress=_step(5),
    )
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from service.__main__ import main as serve

        serve()
        return 0
    from export.intake import UserModelError
    from export.onnx_graph import OnnxImportError
    from export.verify import VerificationError
    from repository import RepositoryError

    refused: tuple[type[Exception], ...] = (UserModelError, OnnxImportError, VerificationError, RepositoryError)
    if args.command == "export":
        from export.fold import FoldError

        refused = (*refused, FoldError)
    repository = args.repository or _repository()
    try:
        report = _export(args, repository) if args.command == "export" else _import(args, repository)
    except refused as e:
        one_line = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # onnxruntime's span lines
        print(f"normserve {args.command}: {one_line}", file=sys.stderr)
        return USAGE_ERROR
    print(_summary(report, repository))
    return 0


if __name__ == "__main__":
    sys.exit(main())
