"""A user's own ONNX file through the same fold, verification and report as the default models, without torch.

    normserve import model.onnx --name my-model [--samples samples.npz] [--max-batch-size 32]

1. Load the file with its external data (``export.onnx_graph.load_onnx``): the served ``model.onnx`` is
   self-contained. A file onnxruntime cannot load is refused with onnxruntime's own message.
2. Complete the config from the graph (``graph_specs``): names, datatypes, dims. A first axis that is
   symbolic or -1 on every input and output is the batch axis; otherwise the model has none and is
   served with ``max_batch_size: 0``, shapes as declared, each request alone.
3. Fold every ``BatchNormalization`` after a Conv, ConvTranspose, Gemm or MatMul into it; the others
   become a per-channel multiply and add, each with its reason (``fold_onnx_batchnorms``).
4. Verify the folded graph against the original in onnxruntime, with graph optimizations off for the
   original so that onnxruntime's own Conv+BatchNorm fusion does not stand in for the reference:
   parity, batch invariance (where there is a batch axis), no BatchNormalization node, no non-finite
   output; accuracy where labelled samples are given.
5. Build the batch-statistics graph from the BatchNormalization nodes' own statistics where it can,
   and check it (``check_batch_stats_graph``); where it cannot, the report and the batchnorm
   endpoint's 400 say why.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

from export.graphs import TRAIN_MODE_NOTE, batch_stats_artifacts, not_comparable, op_histogram
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
from export.onnx_batch_stats import batch_stats_graph, check_batch_stats_graph
from export.onnx_fold import fold_onnx_batchnorms
from export.onnx_graph import OnnxImportError, graph_specs, load_onnx
from export.verify import Check, Feeds, VerificationError, cpu_session, rows, take, verify_graph
from repository import (
    ModelConfig,
    ModelVersion,
    TensorSpec,
    sha256_file,
    write_version,
)

__all__ = ["IMPORT_FORMAT", "import_onnx"]

IMPORT_FORMAT = "normserve.import/1"
NORM_OPS = ("BatchNormalization", "GroupNormalization", "InstanceNormalization", "LayerNormalization")
UNBATCHED_SYNTHETIC = 8  # samples to verify a model without a batch axis on: each runs alone


def _reference(original: onnx.ModelProto) -> Callable[[Feeds], list[np.ndarray]]:
    session = cpu_session(original, optimize=False)
    return lambda feeds: session.run(None, feeds)  # type: ignore[no-any-return]


def _accuracy(reference: Callable[[Feeds], list[np.ndarray]], feeds: Feeds, labels: np.ndarray, batched: bool) -> float:
    scores = reference(feeds)[0] if batched else np.stack([reference(take(feeds, i))[0] for i in range(rows(feeds))])
    return float((scores.argmax(1) == labels).mean())


def _batch_stats_files(
    original: onnx.ModelProto, first_output: TensorSpec, feeds: Feeds, batched: bool
) -> tuple[dict[str, bytes], dict[str, Any] | None, list[Check]]:
    """The batch-statistics graph and statistics of an imported graph with BatchNormalization nodes, what
    the report says of them, and their check; or, where they cannot be built, the reason in the report."""
    if "BatchNormalization" not in op_histogram(original):
        return {}, None, []
    if reason := not_comparable(first_output):
        return {}, {"unavailable": reason}, []
    batch = take(feeds, slice(0, 64)) if batched else take(feeds, 0)
    try:
        graph, layers = batch_stats_graph(original, batch)
    except OnnxImportError as e:
        return {}, {"unavailable": str(e)}, []
    result = check_batch_stats_graph(original, graph, batch, batched)
    # The endpoint compares the first output only: the others are not returned.
    keep = {first_output.name, *(name for layer in layers for name in (layer["mean_output"], layer["var_output"]))}
    outputs = [o for o in graph.graph.output if o.name in keep]
    del graph.graph.output[:]
    graph.graph.output.extend(outputs)
    check = Check("batch_stats_graph", bool(result["passed"]), str(result["detail"]), result.get("figures", {}))
    note = f"built from the BatchNormalization nodes' own statistics: {TRAIN_MODE_NOTE}"
    files, described = batch_stats_artifacts(graph, first_output.name, layers, note)
    return files, described, [check]


def import_onnx(
    path: Path,
    name: str,
    repository: Path,
    *,
    samples_file: Path | None = None,
    max_batch_size: int = 64,
    labels_file: Path | None = None,
    description: str = "",
    version: int | None = None,
    force: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[ModelVersion, dict[str, Any]]:
    """Load, fold, verify and write one ONNX file; raise (writing nothing) on any failure.

    Raises:
        UserModelError: a mistake in what was given. OnnxImportError: a file we cannot serve, with why.
        VerificationError: a check failed.
    """
    start = time.perf_counter()
    if max_batch_size < 1:
        raise UserModelError(f"--max-batch-size {max_batch_size}: expected at least 1")
    target = target_version(repository, name, version, force)
    labels = read_labels(labels_file)
    progress(f"loading {path}")
    original = load_onnx(path)
    inputs, outputs, batch_size = graph_specs(original, max_batch_size)
    batched = batch_size > 0
    check_labels(labels, outputs[0])
    specs = [InputSpec(s.name, s.datatype, tuple(s.shape[1:] if batched else s.shape)) for s in inputs]
    if samples_file is not None:
        feeds, sample_labels = load_samples(samples_file, specs)
    else:
        feeds, sample_labels = synthetic_samples(specs, 64 if batched else UNBATCHED_SYNTHETIC), None
    progress("folding BatchNormalization nodes")
    folded = fold_onnx_batchnorms(original)
    progress("verifying against the original graph")
    reference = _reference(original)
    minimum = _accuracy(reference, feeds, sample_labels, batched) if sample_labels is not None else 0.0
    classify = sample_labels is not None or bool(labels)
    verification = verify_graph(
        folded.model, reference, feeds, sample_labels, minimum, classify=classify, batched=batched
    )
    progress("building the batch-statistics graph")
    files, batch_stats_report, bs_checks = _batch_stats_files(original, outputs[0], feeds, batched)
    verification.checks.extend(bs_checks)
    count = rows(feeds)
    report: dict[str, Any] = {
        "format": IMPORT_FORMAT,
        "model": name,
        "version": target,
        "source": {"kind": "onnx", "file": str(path), "sha256": sha256_file(path), "producer": _producer(original)},
        "trained": True,
        "description": description,
        "inputs": [str(s) for s in specs],
        "batch_axis": batched,
        "verified_on": f"{count} given samples" + (" with labels" if sample_labels is not None else "")
        if samples_file is not None
        else f"{count} synthetic samples drawn from the input specs (no --samples): parity on them proves the "
        "fold exact for such inputs, not the statistics right for real data",
        "checks": verification.as_dict(),
        "not_checked": {} if batched else {"batch_invariance": "the model has no batch axis: each request runs alone"},
        "fold_path": "onnx",
        "folds": [vars(f) for f in folded.folds],
        "unfoldable": [vars(u) for u in folded.unfoldable],
        "ops": {"unfolded": op_histogram(original), "served": op_histogram(folded.model)},
        "opset": next((o.version for o in original.opset_import if o.domain in ("", "ai.onnx")), None),
        "served_weights": sum(int(np.prod(t.dims)) for t in folded.model.graph.initializer),
        "norm_layers": _norm_layers(original),
        "batch_stats": batch_stats_report,
        "versions": {m.__name__: m.__version__ for m in (onnx, onnxruntime)},
        "export_seconds": round(time.perf_counter() - start, 2),
    }
    if not verification.passed:
        raise VerificationError([c for c in verification.checks if not c.passed], report)
    config = ModelConfig(
        name=name,
        max_batch_size=batch_size,
        inputs=inputs,
        outputs=outputs,
        labels=labels,
        norm_layers=report["norm_layers"],
        description=description,
        input_description=describe_specs(specs),
    )
    progress(f"writing {name} version {target}")
    written = write_version(repository, config, target, folded.model.SerializeToString(), report, files)
    return written, written.report.model_dump()


def _producer(model: onnx.ModelProto) -> str:
    return " ".join(p for p in (model.producer_name, model.producer_version) if p)


def _norm_layers(model: onnx.ModelProto) -> dict[str, int]:
    ops = Counter(op_histogram(model))
    return {op: ops[op] for op in NORM_OPS if ops[op]}
