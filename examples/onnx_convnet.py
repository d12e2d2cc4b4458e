"""Write an ONNX file with BatchNormalization nodes, as another exporter would, for ``normserve import``.

    python examples/onnx_convnet.py convnet-bn.onnx                   # one self-contained file
    python examples/onnx_convnet.py convnet-bn.onnx --external-data   # weights in convnet-bn.onnx.data
    normserve import convnet-bn.onnx --name convnet-bn

The graph is built with ``onnx.helper`` alone (no torch), the way graphs from other frameworks arrive:
a symbolic batch axis ``N`` on the input and the output, weights as initializers, and five
``BatchNormalization`` nodes with their running statistics:

    input (N, 3, 16, 16)
      -> Conv 3x3 (no bias) -> BatchNormalization -> Relu            folds into the Conv
      -> Conv 3x3 stride 2  -> BatchNormalization -> Relu            folds into the Conv
      -> BatchNormalization (after the Relu)                          no layer before it: Mul + Add
      -> ConvTranspose 2x2 stride 2 -> BatchNormalization -> Relu    folds into the ConvTranspose
      -> GlobalAveragePool -> Flatten -> Gemm (transB) -> BatchNormalization    folds into the Gemm
      -> logits (N, 10)

Weights are seeded random and the running statistics are chosen per channel away from 0 and 1, so
that folding them changes the weights visibly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_graph", "main"]

OPSET = 17


def _bn(rng: np.random.Generator, prefix: str, channels: int) -> list[onnx.TensorProto]:
    """scale, B, running mean and running variance of one BatchNorm, as initializers."""
    values = {
        "scale": rng.uniform(0.5, 1.5, channels),
        "B": rng.normal(0.0, 0.1, channels),
        "mean": rng.normal(0.0, 0.5, channels),
        "var": rng.uniform(0.5, 2.0, channels),
    }
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}.{k}") for k, v in values.items()]


def _weight(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    fan_in = int(np.prod(shape[1:]))
    return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)


def build_graph(seed: int = 0) -> onnx.ModelProto:
    """The convnet above, checked by onnx's checker."""
    rng = np.random.default_rng(seed)

    def bn_node(prefix: str, x: str, y: str) -> onnx.NodeProto:
        inputs = [x, *(f"{prefix}.{k}" for k in ("scale", "B", "mean", "var"))]
        return helper.make_node("BatchNormalization", inputs, [y], name=prefix, epsilon=1e-5, momentum=0.9)

    nodes = [
        helper.make_node("Conv", ["input", "conv1.W"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("bn1", "c1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.W", "conv2.b"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        bn_node("bn2", "c2", "b2"),
        helper.make_node("Relu", ["b2"], ["r2"]),
        bn_node("bn_after_relu", "r2", "b3"),
        helper.make_node("ConvTranspose", ["b3", "up.W", "up.b"], ["u"], name="up", strides=[2, 2]),
        bn_node("bn_up", "u", "b4"),
        helper.make_node("Relu", ["b4"], ["r4"]),
        helper.make_node("GlobalAveragePool", ["r4"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "fc.W", "fc.b"], ["fc_out"], name="fc", transB=1),
        bn_node("bn_fc", "fc_out", "logits"),
    ]
    initializers = [
        _weight(rng, "conv1.W", 8, 3, 3, 3),
        *_bn(rng, "bn1", 8),
        _weight(rng, "conv2.W", 16, 8, 3, 3),
        numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "conv2.b"),
        *_bn(rng, "bn2", 16),
        *_bn(rng, "bn_after_relu", 16),
        _weight(rng, "up.W", 16, 8, 2, 2),  # ConvTranspose: (C_in, C_out / group, kH, kW)
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "up.b"),
        *_bn(rng, "bn_up", 8),
        _weight(rng, "fc.W", 10, 8),
        numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "fc.b"),
        *_bn(rng, "bn_fc", 10),
    ]
    graph = helper.make_graph(
        nodes,
        "convnet-bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnx.helper")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    parser.add_argument("--external-data", action="store_true", help="weights in <out>.data beside the graph")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = build_graph(args.seed)
    if args.external_data:
        data = args.out.name + ".data"
        onnx.save(model, args.out, save_as_external_data=True, location=data, size_threshold=0)
        print(f"wrote {args.out} and its weights {args.out.parent / data}")
    else:
        onnx.save(model, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
