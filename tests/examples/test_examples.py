"""The example models of examples/: seeded, calibrated, batch-independent, and as their docstrings say.

Each example is built once per module (``built``) and once more by the seeding test; the exports
are of the two models whose docstrings make a claim about the exporter (``text``: two inputs and a
dynamic batch; ``untraceable``: fx fails where torch.export works).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from examples._calibrate import BATCHES

EXAMPLES = ("resnet", "mobilenet", "efficientnet", "densenet", "conv1d", "tabular", "text", "untraceable")
TRACEABLE = tuple(name for name in EXAMPLES if name != "untraceable")
DTYPES = {"FP32": torch.float32, "INT64": torch.int64, "BOOL": torch.bool}
README = Path(__file__).parents[2] / "examples" / "README.md"
# torch's own pytree code warns while the dynamo exporter runs; export/onnx_export.py ignores it the same way
PYTREE_WARNING = r"ignore:.*isinstance\(treespec, LeafSpec\):FutureWarning"
# two inputs share the one "batch" Dim, and the exporter says so; the graph's inputs are still named "batch"
SHARED_DIM_WARNING = r"ignore:.*will not be used, since it shares the same shape constraints:UserWarning"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread, as each xdist worker gets on a two-core machine (tests/conftest.py): these
    models are too small to gain from more, and on a busy machine threads that wait on each other
    make every build several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def example(name: str) -> ModuleType:
    return importlib.import_module(f"examples.{name}")


@functools.cache
def built(name: str) -> nn.Module:
    return example(name).build()


def parse_spec(spec: str) -> tuple[str, torch.dtype, tuple[int, ...]]:
    name, datatype, dims = spec.split(":")
    return name, DTYPES[datatype], tuple(int(d) for d in dims.split(","))


def inputs(name: str, batch: int) -> tuple[torch.Tensor, ...]:
    """``batch`` rows of each declared input: the example's own samples where it has them, else Gaussian."""
    module = example(name)
    if hasattr(module, "samples"):
        s = module.samples()
        return tuple(torch.from_numpy(s[parse_spec(spec)[0]][:batch]) for spec in module.INPUTS)
    g = torch.Generator().manual_seed(0)
    out = []
    for spec in module.INPUTS:
        _, dtype, dims = parse_spec(spec)
        if dtype != torch.float32:
            raise ValueError(f"{name}: a {dtype} input needs the example's samples(), got spec {spec!r}")
        out.append(torch.randn((batch, *dims), generator=g) * 2 + 1)
    return tuple(out)


@pytest.mark.parametrize("name", EXAMPLES)
def test_build_returns_a_module_in_eval_mode(name: str) -> None:
    model = built(name)
    assert isinstance(model, nn.Module)
    assert not any(m.training for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


@pytest.mark.parametrize("name", EXAMPLES)
def test_batchnorms_are_calibrated(name: str) -> None:
    norms = {n: m for n, m in built(name).named_modules() if isinstance(m, _BatchNorm)}
    assert norms
    for n, bn in norms.items():
        assert not torch.all(bn.running_mean == 0), n
        assert not torch.all(bn.running_var == 1), n
        assert not torch.all(bn.weight == 1), n
        assert int(bn.num_batches_tracked) == BATCHES, n  # every BatchNorm saw every calibration batch
        assert bn.momentum == 0.1, n  # put back after the cumulative average


@pytest.mark.parametrize("name", EXAMPLES)
def test_forward_on_the_declared_inputs_is_finite(name: str) -> None:
    with torch.no_grad():
        out = built(name)(*inputs(name, 3))
    assert out.shape[0] == 3
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", EXAMPLES)
def test_a_sample_alone_and_in_a_batch_give_the_same_output(name: str) -> None:
    model, args = built(name), inputs(name, 6)
    with torch.no_grad():
        batched = model(*args)
        alone = torch.cat([model(*(a[i : i + 1] for a in args)) for i in range(6)])
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", EXAMPLES)
def test_build_is_seeded_and_leaves_the_global_rng_alone(name: str) -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    again = example(name).build().state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    first = built(name).state_dict()
    assert again.keys() == first.keys()
    for key, value in first.items():
        assert torch.equal(again[key], value), key


@pytest.mark.parametrize("name", EXAMPLES)
def test_docs_give_the_input_specs_and_export_command(name: str) -> None:
    doc, readme = example(name).__doc__ or "", README.read_text()
    command = f"normserve export examples/{name}.py:build"
    assert command in doc
    assert command in readme
    for spec in example(name).INPUTS:
        assert f"--input {spec}" in doc
        assert spec in readme


@pytest.mark.parametrize("name", TRACEABLE)
def test_fx_traces_the_traceable_examples(name: str) -> None:
    fx.symbolic_trace(built(name))


def test_fx_cannot_trace_the_untraceable_example() -> None:
    with pytest.raises(fx.proxy.TraceError, match="control flow"):
        fx.symbolic_trace(built("untraceable"))


def test_text_samples_match_the_declared_inputs() -> None:
    from examples import text

    s = text.samples()
    assert set(s) == {"token_ids", "attention_mask"}
    for spec in text.INPUTS:
        name, dtype, dims = parse_spec(spec)
        assert s[name].shape == (16, *dims)
        assert s[name].dtype == torch.empty(0, dtype=dtype).numpy().dtype
    mask, ids = s["attention_mask"], s["token_ids"]
    assert (np.diff(mask.astype(np.int8), axis=1) <= 0).all()  # real tokens first, padding after
    assert (~mask).any(axis=1).sum() >= 8  # most rows are padded
    assert (ids[~mask] == text.TextConfig().pad_id).all()
    assert (ids[mask] != text.TextConfig().pad_id).all()


@pytest.mark.filterwarnings(PYTREE_WARNING, SHARED_DIM_WARNING)
@pytest.mark.parametrize("name", ["text", "untraceable"])
def test_dynamo_exports_with_a_dynamic_batch(name: str) -> None:
    model, args = built(name), inputs(name, 4)
    batch = torch.export.Dim("batch", min=1)
    names = [parse_spec(spec)[0] for spec in example(name).INPUTS]
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            model, args, dynamo=True, input_names=names, dynamic_shapes=tuple({0: batch} for _ in args)
        )
    assert program is not None
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    other = inputs(name, 7)  # a batch size the export did not see
    (got,) = session.run(None, {n: a.numpy() for n, a in zip(names, other, strict=True)})
    with torch.no_grad():
        want = model(*other).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
