"""export.onnx_graph: an ONNX file read whole or refused with the reason, its inputs and outputs, and no torch."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.onnx_graph import OnnxImportError, graph_specs, load_onnx, onnx_datatype
from repository import TensorSpec
from tests.export.onnx_graphs import (
    FLOAT,
    assert_close,
    conv_bn,
    init,
    make_model,
    randn,
    run,
    tensor,
)


def test_external_data_is_read_into_a_self_contained_proto(tmp_path: Path) -> None:
    rng = np.random.default_rng(20)
    model = conv_bn(rng, bias=True, group=1, c_out=8)
    onnx.save(
        copy.deepcopy(model),  # saving with external data rewrites the proto it is given
        tmp_path / "model.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.data",
        size_threshold=0,
    )
    loaded = load_onnx(tmp_path / "model.onnx")
    assert all(t.data_location == TensorProto.DEFAULT and not t.external_data for t in loaded.graph.initializer)
    (tmp_path / "w.data").unlink()  # the proto needs the side file no more
    x = {"x": randn(rng, 2, 4, 6, 6)}
    assert_close(run(loaded, x)[0], run(model, x)[0])


def test_missing_external_data_is_refused(tmp_path: Path) -> None:
    model = conv_bn(np.random.default_rng(21), bias=True, group=1, c_out=8)
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="w.data", size_threshold=0)
    (tmp_path / "w.data").unlink()
    with pytest.raises(OnnxImportError, match=r"cannot read the external data .*w\.data"):
        load_onnx(path)


def test_external_data_over_two_gigabytes_is_refused(tmp_path: Path) -> None:
    model = conv_bn(np.random.default_rng(22), bias=True, group=1, c_out=8)
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="w.data", size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    length = next(e for e in proto.graph.initializer[0].external_data if e.key == "length")
    length.value = str(3 * 2**30)
    onnx.save(proto, path)
    with pytest.raises(OnnxImportError, match=r"3\.00 GiB; a self-contained model must stay under protobuf's 2 GiB"):
        load_onnx(path)


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00\xffnot a model at all\x12\x34")
    with pytest.raises(OnnxImportError, match="is not an ONNX model"):
        load_onnx(path)
    with pytest.raises(OnnxImportError, match="cannot read"):
        load_onnx(tmp_path / "missing.onnx")


def test_a_graph_onnxruntime_refuses_is_refused_with_its_message(tmp_path: Path) -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 3])], [tensor("y", ["N", 3])], [])
    model.graph.node.append(helper.make_node("NoSuchOp", ["y"], ["z"]))
    model.graph.output.append(tensor("z", ["N", 3]))
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    with pytest.raises(OnnxImportError, match="onnxruntime cannot load .*NoSuchOp"):
        load_onnx(path)


def test_a_symbolic_first_axis_everywhere_is_the_batch_axis() -> None:
    rng = np.random.default_rng(30)
    model = conv_bn(rng, bias=True, group=1, c_out=8)
    model.graph.output[0].type.tensor_type.ClearField("shape")  # shape inference supplies it
    inputs, outputs, max_batch = graph_specs(model, max_batch_size=16)
    assert inputs == [TensorSpec(name="x", datatype="FP32", shape=[-1, 4, 6, 6])]
    assert outputs == [TensorSpec(name="y", datatype="FP32", shape=[-1, 8, 6, 6])]
    assert max_batch == 16


def test_a_fixed_first_axis_means_no_batch_axis() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 3])], [tensor("y", [1, 3])], [])
    assert graph_specs(model) == (
        [TensorSpec(name="x", datatype="FP32", shape=[1, 3])],
        [TensorSpec(name="y", datatype="FP32", shape=[1, 3])],
        0,
    )


def test_integer_and_boolean_inputs_map_to_their_datatypes() -> None:
    nodes = [
        helper.make_node("Cast", ["ids"], ["f"], to=FLOAT),
        helper.make_node("Where", ["mask", "f", "zero"], ["y"]),
    ]
    inputs = [tensor("ids", ["N", 5], TensorProto.INT64), tensor("mask", ["N", 5], TensorProto.BOOL)]
    inputs.append(tensor("zero", []))  # an initializer listed as an input too: not one to feed
    model = make_model(nodes, inputs, [tensor("y", ["N", 5])], [init("zero", np.float32(0))])
    specs, outputs, max_batch = graph_specs(model)
    assert [(s.name, s.datatype, s.shape) for s in specs] == [("ids", "INT64", [-1, 5]), ("mask", "BOOL", [-1, 5])]
    assert outputs == [TensorSpec(name="y", datatype="FP32", shape=[-1, 5])]
    assert max_batch == 64
    assert onnx_datatype(TensorProto.FLOAT16) == "FP16"


def test_an_unsupported_datatype_is_refused() -> None:
    model = make_model(
        [helper.make_node("Identity", ["s"], ["y"])],
        [tensor("s", ["N"], TensorProto.STRING)],
        [tensor("y", ["N"], TensorProto.STRING)],
        [],
    )
    with pytest.raises(OnnxImportError, match=r"input 's': ONNX element type STRING \(8\) has no Open Inference"):
        graph_specs(model)


def test_a_symbolic_axis_other_than_the_batch_axis_is_refused() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", "D"])], [tensor("y", ["N", "D"])], []
    )
    with pytest.raises(OnnxImportError, match=r"input 'x' axis 1 is symbolic \('D'\); .* expected a fixed size"):
        graph_specs(model)
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Shape", ["x"], ["s"])],
        [tensor("x", ["N", 3])],
        [tensor("y", ["N", 3]), tensor("s", [2], TensorProto.INT64)],
        [],
    )
    with pytest.raises(OnnxImportError, match=r"input 'x' axis 0 is symbolic \('N'\).*every input and output"):
        graph_specs(model)


def test_the_onnx_path_imports_neither_torch_nor_onnxscript() -> None:
    modules = "export.onnx_graph, export.onnx_fold, export.onnx_batch_stats, export.from_onnx"
    code = f"import sys, {modules}; print(sorted({{'torch', 'onnxscript'}} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
    )
    assert out.stdout.strip() == "[]"
