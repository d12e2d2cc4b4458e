"""A user's own PyTorch module through the same fold, export, verification and report as the default models.

    normserve export examples/resnet.py:build --name resnet --input input:FP32:3,32,32
    normserve export mypkg.models:make_text_model --name text --input token_ids:INT64:128 \\
        --input attention_mask:BOOL:128 --samples samples.npz

``MODULE:CALLABLE``: ``MODULE`` is a ``.py`` file or a dotted module importable from the current folder;
``CALLABLE()`` returns an ``nn.Module`` with its weights loaded. The steps, each refusing with one line
that says what was wrong, and writing nothing, when it fails:

1. Load the module and run ``forward`` once on two rows of the declared inputs.
2. Fold every BatchNorm (``export.fold``, traced with torch.fx). A module fx cannot trace (data-dependent
   control flow) is exported unfolded and folded at the ONNX level instead (``export.onnx_fold``);
   the report says which path was taken and why.
3. Export ONNX with a dynamic batch axis on every input and output.
4. Verify (``export.verify``) against the unfolded module in eval mode, on the given samples or on
   synthetic ones (``export.intake``), and, for a module with BatchNorm, export and verify the
   batch-statistics graph against its ``train()`` output (``export.batch_stats``).
5. Write the version into the repository (``repository.write_version``), whole or not at all.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export.batch_stats import batchnorm_layers, export_batch_stats, running_statistics, verify_batch_stats
from export.build import EXPORT_FORMAT, library_versions, norm_layer_counts
from export.fold import FoldError, fold_batchnorms
from export.graphs import OPSET, batch_stats_artifacts, not_comparable, op_histogram
from export.intake import (
    InputSpec,
    UserModelError,
    check_labels,
    describe_specs,
    load_samples,
    read_labels,
    synthetic_samples,
    target_version,
)
from export.onnx_export import export_onnx, fold_constants
from export.onnx_fold import fold_onnx_batchnorms
from export.verify import Feeds, VerificationError, flatten_outputs, verify_export
from repository import ModelConfig, ModelVersion, TensorSpec
from repository import write_version as write_repository_version

__all__ = ["export_module", "load_callable", "export_pytorch"]


def _import(module: str) -> Any:
    """A ``.py`` file or a dotted module. The current folder and the file's own folder join ``sys.path``
    first, so that the module's own imports resolve as they would when run from here."""
    for folder in (Path.cwd(), *([Path(module).resolve().parent] if module.endswith(".py") else [])):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    path = Path(module)
    if not (module.endswith(".py") or path.is_file()):
        return importlib.import_module(module)
    if not path.is_file():
        raise UserModelError(f"{module}: no such file; expected a .py file or a dotted module name")
    spec = importlib.util.spec_from_file_location(f"normserve_user_{path.stem}_{uuid.uuid4().hex[:6]}", path)
    if spec is None or spec.loader is None:
        raise UserModelError(f"{module}: cannot be loaded as a Python module")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(loaded)
    return loaded


def load_callable(target: str) -> nn.Module:
    """``MODULE:CALLABLE`` -> the ``nn.Module`` that ``CALLABLE()`` returns.

    Raises:
        UserModelError: the target is malformed, the module does not import, the callable is missing,
            raises, or returns something that is not an ``nn.Module``.
    """
    module_name, sep, attribute = target.rpartition(":")
    if not sep or not module_name or not attribute:
        raise UserModelError(f"{target!r}: expected MODULE:CALLABLE, e.g. examples/resnet.py:build")
    try:
        module = _import(module_name)
    except UserModelError:
        raise
    except Exception as e:  # the user's module: any error it raises on import is theirs to read
        raise UserModelError(f"{module_name}: importing it raised {_first_line(e)}") from e
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UserModelError(f"{module_name} has no callable {attribute!r}; expected a function returning an nn.Module")
    try:
        model = factory()
    except Exception as e:
        raise UserModelError(f"{target}() raised {_first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise UserModelError(f"{target}() returned {type(model).__name__}; expected a torch.nn.Module")
    return model


def _tensors(feeds: Feeds, specs: list[InputSpec], rows: slice) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(feeds[s.name][rows]) for s in specs)


def check_forward(model: nn.Module, specs: list[InputSpec], feeds: Feeds) -> list[torch.Tensor]:
    """Run ``forward`` on two rows of the declared inputs; its outputs, or why it does not take them."""
    parameters = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    takes_more = any(p.kind is p.VAR_POSITIONAL for p in parameters)
    if len(specs) < len(required) or (len(specs) > len(positional) and not takes_more):
        raise UserModelError(
            f"{type(model).__name__}.forward takes ({', '.join(p.name for p in positional)}), "
            f"{len(required)} required; --input gives {len(specs)}: {describe_specs(specs)}. "
            "Expected one --input per argument, in forward's order"
        )
    try:
        with torch.no_grad():
            outputs = flatten_outputs(model.eval()(*_tensors(feeds, specs, slice(0, 2))))
    except Exception as e:
        raise UserModelError(
            f"{type(model).__name__}.forward on two rows of {describe_specs(specs)} raised {_first_line(e)}; "
            "check --input's names, datatypes and dims"
        ) from e
    bad = [f"#{i} {tuple(t.shape)}" for i, t in enumerate(outputs) if t.ndim == 0 or t.shape[0] != 2]
    if bad:
        raise UserModelError(
            f"{type(model).__name__}.forward's outputs {', '.join(bad)} have no batch axis of 2 rows for 2 input "
            "rows; expected every output to keep the batch axis first"
        )
    return outputs


def _output_spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    datatypes = {
        torch.float32: "FP32",
        torch.float16: "FP16",
        torch.float64: "FP64",
        torch.int64: "INT64",
        torch.int32: "INT32",
        torch.int16: "INT16",
        torch.int8: "INT8",
        torch.uint8: "UINT8",
        torch.bool: "BOOL",
    }
    if tensor.dtype not in datatypes:
        raise UserModelError(f"output {name!r} is {tensor.dtype}; expected one of {', '.join(map(str, datatypes))}")
    return TensorSpec(name=name, datatype=datatypes[tensor.dtype], shape=[-1, *tensor.shape[1:]])  # type: ignore[arg-type]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _export(
    model: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str], optimize: bool
) -> onnx.ModelProto:
    """``export_onnx``, with the exporter's own failure (an operator it cannot convert, a shape it cannot keep
    dynamic) turned into one line for the user."""
    try:
        return export_onnx(model, example, optimize=optimize, input_names=input_names, output_names=output_names)
    except Exception as e:  # torch.export and torch.onnx raise many unrelated types
        raise UserModelError(
            f"torch.onnx.export (dynamo) cannot export {type(model).__name__} with a dynamic batch axis: "
            f"{_first_line(e)}"
        ) from e


def _fold_and_export(
    model: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str]
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The served graph and what the report says of the fold: through torch.fx where it traces, else
    at the ONNX level on the unfolded export."""
    unfolded = fold_constants(_export(model, example, input_names, output_names, optimize=False))
    try:
        folded = fold_batchnorms(model, example)
    except FoldError:
        raise
    except Exception as e:  # torch.fx's errors have no common base: TraceError, TypeError, NotImplementedError...
        reason = _first_line(e)
        at_onnx = fold_onnx_batchnorms(unfolded)
        return at_onnx.model, {
            "fold_path": "onnx",
            "fold_path_reason": f"torch.fx cannot trace the module ({reason}); folded at the ONNX level instead",
            "folds": [vars(f) for f in at_onnx.folds],
            "unfoldable": [vars(u) for u in at_onnx.unfoldable],
            "ops": {"unfolded": op_histogram(unfolded), "served": op_histogram(at_onnx.model)},
        }
    served = _export(folded.model, example, input_names, output_names, optimize=True)
    ops_folded = fold_constants(_export(folded.model, example, input_names, output_names, optimize=False))
    return served, {
        "fold_path": "torch.fx",
        "folds": [vars(f) for f in folded.folds],
        "unfoldable": [vars(u) for u in folded.unfoldable],
        "ops": {
            "unfolded": op_histogram(unfolded),
            "folded": op_histogram(ops_folded),
            "served": op_histogram(served),
            "note": "unfolded and folded: exporter optimizer off, so its own BatchNorm folding hides nothing, "
            "then constants folded; served: the graph written as model.onnx (exporter optimizer on)",
        },
    }


def _batch_stats(
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    first_output: TensorSpec,
    feeds: Feeds,
    labels: np.ndarray | None,
) -> tuple[dict[str, bytes], dict[str, Any] | None, list[Any]]:
    """For a module with BatchNorm: the batch-statistics graph and statistics files, what the report says
    of them, and their checks (which join the verification)."""
    if not batchnorm_layers(model):
        return {}, None, []
    if reason := not_comparable(first_output):
        return {}, {"unavailable": reason}, []
    graph, layer_names = export_batch_stats(model, example, input_names, first_output.name)
    checks = verify_batch_stats(graph, model, layer_names, feeds, labels)
    layers = running_statistics(model, layer_names, example)
    files, described = batch_stats_artifacts(graph, first_output.name, layers)
    return files, described, checks


def export_module(
    model: nn.Module,
    name: str,
    specs: list[InputSpec],
    repository: Path,
    *,
    samples: tuple[Feeds, np.ndarray | None] | None = None,
    output_names: list[str] | None = None,
    max_batch_size: int = 64,
    labels: list[str] | None = None,
    description: str = "",
    version: int | None = None,
    force: bool = False,
    source: str = "",
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[ModelVersion, dict[str, Any]]:
    """Fold, export, verify and write one user module; raise (writing nothing) on any failure.

    Args:
        model: the module with its weights, unfolded.
        name: the model's name in the repository.
        specs: one per argument of ``forward``, in order.
        repository: the repository's root folder.
        samples: real inputs (and optionally labels) to verify on; synthetic ones from ``specs`` without.
        output_names: the graph's outputs, in the order forward returns them (default: the exporter's names).
        max_batch_size: the most rows a batch may carry when served.
        labels: class names of the first output, for the classification extension.
        description: shown in the model's metadata.
        version: the version to write (default: the next free one).
        force: write into a model already in the repository.
        source: where the module came from (``MODULE:CALLABLE``), for the report.
        progress: told each step as it starts.

    Raises:
        UserModelError: a mistake in what was given. VerificationError: a check failed. FoldError: a
            BatchNorm without running statistics.
    """
    start = time.perf_counter()
    if max_batch_size < 1:
        raise UserModelError(f"--max-batch-size {max_batch_size}: expected at least 1 (the export has a batch axis)")
    target = target_version(repository, name, version, force)
    if not specs:
        raise UserModelError("no --input given; expected one NAME:DATATYPE:DIMS per argument of forward")
    if len({s.name for s in specs}) != len(specs):
        raise UserModelError(f"--input names repeat: {describe_specs(specs)}; expected each name once")
    model = model.eval()
    feeds, sample_labels = samples if samples is not None else (synthetic_samples(specs), None)
    verified_on = (
        f"{len(next(iter(feeds.values())))} given samples" + (" with labels" if sample_labels is not None else "")
        if samples is not None
        else f"{len(next(iter(feeds.values())))} synthetic samples drawn from the input specs (no --samples): "
        "parity on them proves the fold exact for such inputs, not the statistics right for real data"
    )
    progress("running forward on the declared inputs")
    outputs = check_forward(model, specs, feeds)
    if output_names is not None and len(output_names) != len(outputs):
        raise UserModelError(
            f"--output names {output_names}, but forward returns {len(outputs)} output(s); expected one name each"
        )
    example = _tensors(feeds, specs, slice(0, 2))
    input_names = [s.name for s in specs]
    progress("folding BatchNorm and exporting ONNX")
    served, fold_report = _fold_and_export(model, example, input_names, output_names or [])
    out_specs = [_output_spec(o.name, t) for o, t in zip(served.graph.output, outputs, strict=True)]
    check_labels(labels or [], out_specs[0])
    progress("verifying against the unfolded module")
    classify = sample_labels is not None or bool(labels)
    minimum = _pytorch_accuracy(model, feeds, specs, sample_labels) if sample_labels is not None else 0.0
    verification = verify_export(served, model, feeds, sample_labels, minimum, classify=classify)
    progress("exporting the batch-statistics graph")
    files, batch_stats_report, bs_checks = _batch_stats(model, example, input_names, out_specs[0], feeds, sample_labels)
    verification.checks.extend(bs_checks)
    checks = verification.as_dict()
    report: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "model": name,
        "version": target,
        "source": {"kind": "pytorch", "callable": source, "class": type(model).__name__},
        "trained": True,
        "description": description,
        "inputs": [str(s) for s in specs],
        "verified_on": verified_on,
        "checks": checks,
        **fold_report,
        "opset": OPSET,
        "parameters": sum(p.numel() for p in model.parameters()),
        "served_weights": sum(int(np.prod(t.dims)) for t in served.graph.initializer),
        "norm_layers": norm_layer_counts(model),
        "batch_stats": batch_stats_report,
        "versions": library_versions(),
        "export_seconds": round(time.perf_counter() - start, 2),
    }
    if not verification.passed:
        raise VerificationError([c for c in verification.checks if not c.passed], report)
    config = ModelConfig(
        name=name,
        max_batch_size=max_batch_size,
        inputs=[s.tensor_spec() for s in specs],
        outputs=out_specs,
        labels=labels or [],
        norm_layers=report["norm_layers"],
        description=description,
        input_description=describe_specs(specs),
    )
    progress(f"writing {name} version {target}")
    written = write_repository_version(repository, config, target, served.SerializeToString(), report, files)
    return written, written.report.model_dump()


@torch.no_grad()
def _pytorch_accuracy(model: nn.Module, feeds: Feeds, specs: list[InputSpec], labels: np.ndarray) -> float:
    """The unfolded module's accuracy on the labelled samples: the served graph may not fall below it."""
    scores = flatten_outputs(model(*_tensors(feeds, specs, slice(None))))[0]
    return float((scores.argmax(1).numpy() == labels).mean())


def export_pytorch(
    target: str,
    name: str,
    inputs: list[str],
    repository: Path,
    *,
    samples_file: Path | None = None,
    labels_file: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
    **options: Any,
) -> dict[str, Any]:
    """``normserve export``: parse the specs, read ``--samples`` and ``--labels`` if given, load
    ``MODULE:CALLABLE`` and export it (``options`` as ``export_module`` takes them); returns the report."""
    specs = [InputSpec.parse(text) for text in inputs]
    samples = load_samples(samples_file, specs) if samples_file else None
    labels = read_labels(labels_file)
    progress(f"loading {target}")
    model = load_callable(target)
    _, report = export_module(
        model, name, specs, repository, samples=samples, labels=labels, source=target, progress=progress, **options
    )
    return report
