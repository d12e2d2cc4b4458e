"""Users' own models, built by hand with onnx.helper (known weights, so answers can be held against numpy's and
onnxruntime's) and written with ``repository.write_version``, as the exporter writes them:

- ``text-cls``: two inputs, token_ids INT64 [-1, 8] and attention_mask BOOL [-1, 8]; outputs logits FP32 [-1, 3]
  (the masked sum of a token embedding) and tokens INT64 [-1] (the count of unmasked tokens). No labels, no
  descriptions.
- ``grid``: no batch dimension (max_batch_size 0): x FP32 [3, 4] -> y FP32 [3, 2] = x @ W.
- ``dtypes``: one input of each datatype but FP32 and INT64 (FP16, FP64, INT32, UINT8, INT8, INT16, BOOL), each
  answered by an output of its own datatype, and a BOOL output computed from FP64.
- ``regress-bn``: a BatchNorm regression head with two inputs, x FP32 [-1, 4] and shift INT64 [-1, 2] ->
  pred FP32 [-1, 2], with its batch-statistics graph and statistics (one BatchNorm1d of 3 channels);
  ``regress-bn-fixed`` is the same model without a batch dimension (x [5, 4], shift [5, 2] -> pred [5, 2]).
- ``bn-no-graph``: regress-bn's served graph alone, whose report says why it has no batch-statistics graph.
- ``wrong-dtype``: a config that passes the schema (x FP32 [-1, 4]) over a graph that takes x INT64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from repository import BATCH_STATS_FILE, BN_STATS_FILE, BatchNormStats, ModelConfig, TensorSpec, write_version

__all__ = [
    "BN_NO_GRAPH_REASON",
    "USER_MODELS",
    "bn_no_graph_config",
    "dtypes_expected",
    "dtypes_inputs",
    "grid_expected",
    "regress_expected",
    "regress_inputs",
    "text_expected",
    "text_inputs",
    "write_bn_models",
    "write_grid",
    "write_text",
    "write_user_models",
]

_ELEMENT = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
}
REPORT = {"trained": False, "description": "hand-built test model"}
USER_MODELS = ["text-cls", "grid", "dtypes", "regress-bn", "regress-bn-fixed", "bn-no-graph"]


def _value_info(spec: TensorSpec, datatype: str | None = None) -> onnx.ValueInfoProto:
    dims = ["N" if d == -1 else d for d in spec.shape]
    return helper.make_tensor_value_info(spec.name, _ELEMENT[datatype or spec.datatype], dims)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray],
) -> bytes:
    graph = helper.make_graph(
        nodes, "user", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in initializers.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _graph(config: ModelConfig, nodes: list[onnx.NodeProto], initializers: dict[str, np.ndarray]) -> bytes:
    return _model(
        nodes, [_value_info(s) for s in config.inputs], [_value_info(s) for s in config.outputs], initializers
    )


# -- text-cls --

EMBEDDING = (np.arange(30, dtype=np.float32).reshape(10, 3) - 12) / 4
TEXT_CONFIG = ModelConfig(
    name="text-cls",
    max_batch_size=8,
    inputs=[
        TensorSpec(name="token_ids", datatype="INT64", shape=[-1, 8]),
        TensorSpec(name="attention_mask", datatype="BOOL", shape=[-1, 8]),
    ],
    outputs=[
        TensorSpec(name="logits", datatype="FP32", shape=[-1, 3]),
        TensorSpec(name="tokens", datatype="INT64", shape=[-1]),
    ],
)


def text_onnx(scale: float = 1.0) -> bytes:
    """``scale`` multiplies the embedding: a new version that answers differently."""
    nodes = [
        helper.make_node("Gather", ["E", "token_ids"], ["embedded"]),  # (N, 8, 3)
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),  # (N, 8)
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask3"]),  # (N, 8, 1)
        helper.make_node("Mul", ["embedded", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["logits"], keepdims=0),  # (N, 3)
        helper.make_node("Cast", ["attention_mask"], ["mask_i"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["mask_i", "axis1"], ["tokens"], keepdims=0),  # (N,)
    ]
    axes = {"axis1": np.array([1], np.int64), "axis2": np.array([2], np.int64)}
    return _graph(TEXT_CONFIG, nodes, {"E": EMBEDDING * np.float32(scale), **axes})


def text_inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, 8)) < 0.6
    mask[:, 0] = True
    return {"token_ids": rng.integers(0, 10, size=(rows, 8), dtype=np.int64), "attention_mask": mask}


def text_expected(feeds: dict[str, np.ndarray], scale: float = 1.0) -> dict[str, np.ndarray]:
    mask = feeds["attention_mask"]
    embedding = EMBEDDING * np.float32(scale)
    logits = (embedding[feeds["token_ids"]] * mask[..., None].astype(np.float32)).sum(axis=1)
    return {"logits": logits.astype(np.float32), "tokens": mask.sum(axis=1).astype(np.int64)}


# -- grid: no batch dimension --

GRID_W = np.array([[1, -1], [0.5, 2], [-2, 0.25], [3, 1]], dtype=np.float32)
GRID_CONFIG = ModelConfig(
    name="grid",
    max_batch_size=0,
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[3, 4])],
    outputs=[TensorSpec(name="y", datatype="FP32", shape=[3, 2])],
    description="y = x @ W, on one fixed 3x4 grid: no batch dimension",
    input_description="a 3x4 grid of reals",
)


def grid_onnx(scale: float = 1.0) -> bytes:
    return _graph(GRID_CONFIG, [helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": GRID_W * np.float32(scale)})


def grid_expected(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return x.astype(np.float32) @ (GRID_W * np.float32(scale))


def write_grid(root: Path, version: str = "1", scale: float = 1.0) -> None:
    write_version(root, GRID_CONFIG, version, grid_onnx(scale), REPORT)


# -- dtypes: every datatype in and out --

_PAIRS = [("a", "FP16"), ("b", "FP64"), ("c", "INT32"), ("d", "UINT8"), ("e", "INT8"), ("f", "INT16"), ("g", "BOOL")]
DTYPES_CONFIG = ModelConfig(
    name="dtypes",
    max_batch_size=4,
    inputs=[TensorSpec(name=n, datatype=t, shape=[-1, 2]) for n, t in _PAIRS],  # type: ignore[arg-type]
    outputs=[
        *(TensorSpec(name=f"{n}2", datatype=t, shape=[-1, 2]) for n, t in _PAIRS),  # type: ignore[arg-type]
        TensorSpec(name="positive", datatype="BOOL", shape=[-1, 2]),
    ],
)


def dtypes_onnx() -> bytes:
    nodes = [
        helper.make_node("Mul", ["a", "two_h"], ["a2"]),
        helper.make_node("Add", ["b", "half_d"], ["b2"]),
        helper.make_node("Mul", ["c", "three_i"], ["c2"]),
        helper.make_node("Add", ["d", "one_u8"], ["d2"]),
        helper.make_node("Neg", ["e"], ["e2"]),
        helper.make_node("Mul", ["f", "two_i16"], ["f2"]),
        helper.make_node("Not", ["g"], ["g2"]),
        helper.make_node("Greater", ["b", "zero_d"], ["positive"]),
    ]
    constants = {
        "two_h": np.array(2, np.float16),
        "half_d": np.array(0.5, np.float64),
        "three_i": np.array(3, np.int32),
        "one_u8": np.array(1, np.uint8),
        "two_i16": np.array(2, np.int16),
        "zero_d": np.array(0, np.float64),
    }
    return _graph(DTYPES_CONFIG, nodes, constants)


def dtypes_inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a": rng.normal(size=(rows, 2)).astype(np.float16),
        "b": rng.normal(size=(rows, 2)) * 1e6,  # more digits than FP32 holds
        "c": rng.integers(-1000, 1000, size=(rows, 2), dtype=np.int32),
        "d": rng.integers(0, 255, size=(rows, 2), dtype=np.uint8),  # 255 + 1 would wrap
        "e": rng.integers(-127, 128, size=(rows, 2), dtype=np.int8),
        "f": rng.integers(-16000, 16000, size=(rows, 2), dtype=np.int16),
        "g": rng.random((rows, 2)) < 0.5,
    }


def dtypes_expected(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "a2": feeds["a"] * np.float16(2),
        "b2": feeds["b"] + 0.5,
        "c2": feeds["c"] * np.int32(3),
        "d2": feeds["d"] + np.uint8(1),
        "e2": -feeds["e"],
        "f2": feeds["f"] * np.int16(2),
        "g2": ~feeds["g"],
        "positive": feeds["b"] > 0,
    }


# -- regress-bn: a BatchNorm regression head with two inputs, and its batch-statistics graph --

W1 = np.array([[1, 0, -1], [0.5, 1, 0], [0, -0.5, 2], [1, 1, 1]], dtype=np.float32)
W2 = np.array([[1, -1], [2, 0.5], [-0.5, 1]], dtype=np.float32)
RUNNING_MEAN = np.array([0.5, -0.25, 1.0], dtype=np.float32)
RUNNING_VAR = np.array([2.0, 0.5, 4.0], dtype=np.float32)
GAMMA = np.array([1.5, 0.5, -1.0], dtype=np.float32)
BETA = np.array([0.1, -0.2, 0.3], dtype=np.float32)
EPS = 1e-5


def regress_config(name: str = "regress-bn", rows: int | None = None) -> ModelConfig:
    """Batched (max batch 16), or with ``rows`` fixed and no batch dimension."""
    n = -1 if rows is None else rows
    return ModelConfig(
        name=name,
        max_batch_size=16 if rows is None else 0,
        inputs=[
            TensorSpec(name="x", datatype="FP32", shape=[n, 4]),
            TensorSpec(name="shift", datatype="INT64", shape=[n, 2]),
        ],
        outputs=[TensorSpec(name="pred", datatype="FP32", shape=[n, 2])],
        norm_layers={"BatchNorm1d": 1},
        description="a two-output regression head with one BatchNorm1d",
    )


def _regress_nodes(normalized: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    return [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),  # (N, 3): the BatchNorm's input
        *normalized,  # h -> hn
        helper.make_node("MatMul", ["hn", "W2"], ["p"]),
        helper.make_node("Cast", ["shift"], ["shift_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["p", "shift_f"], ["pred"]),
    ]


def regress_onnx(config: ModelConfig) -> bytes:
    """The served graph: the BatchNorm with its running statistics, as one multiply and one add."""
    scale = GAMMA / np.sqrt(RUNNING_VAR + EPS)
    nodes = _regress_nodes(
        [helper.make_node("Mul", ["h", "scale"], ["hs"]), helper.make_node("Add", ["hs", "offset"], ["hn"])]
    )
    return _graph(config, nodes, {"W1": W1, "W2": W2, "scale": scale, "offset": BETA - RUNNING_MEAN * scale})


def regress_batch_stats_onnx(config: ModelConfig) -> bytes:
    """The batch-statistics graph: the BatchNorm with the mean and (biased) variance of its batch."""
    normalize = [
        helper.make_node("ReduceMean", ["h", "axis0"], ["bn_mean"], keepdims=0),  # (3,)
        helper.make_node("Sub", ["h", "bn_mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["squared"]),
        helper.make_node("ReduceMean", ["squared", "axis0"], ["bn_var"], keepdims=0),  # (3,)
        helper.make_node("Add", ["bn_var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["centred", "std"], ["unit"]),
        helper.make_node("Mul", ["unit", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["hn"]),
    ]
    initializers = {
        "W1": W1,
        "W2": W2,
        "gamma": GAMMA,
        "beta": BETA,
        "eps": np.array(EPS, np.float32),
        "axis0": np.array([0], np.int64),
    }
    outputs = [
        *(_value_info(s) for s in config.outputs),
        helper.make_tensor_value_info("bn_mean", TensorProto.FLOAT, [3]),
        helper.make_tensor_value_info("bn_var", TensorProto.FLOAT, [3]),
    ]
    return _model(_regress_nodes(normalize), [_value_info(s) for s in config.inputs], outputs, initializers)


def regress_stats() -> BatchNormStats:
    return BatchNormStats.model_validate(
        {
            "logits_output": "pred",
            "layers": [
                {
                    "name": "head.bn",
                    "type": "BatchNorm1d",
                    "channels": 3,
                    "channel_axis": 1,
                    "reduced_over": "N",
                    "positions": 1,
                    "eps": EPS,
                    "momentum": 0.1,
                    "running_mean": RUNNING_MEAN.tolist(),
                    "running_var": RUNNING_VAR.tolist(),
                    "mean_output": "bn_mean",
                    "var_output": "bn_var",
                }
            ],
        }
    )


def regress_inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(rows, 4)).astype(np.float32) * 2 + 1,
        "shift": rng.integers(-3, 4, size=(rows, 2), dtype=np.int64),
    }


def regress_expected(feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """In float64: the running-statistics and the batch-statistics answers, and the batch's statistics."""
    h = feeds["x"].astype(np.float64) @ W1
    shift = feeds["shift"].astype(np.float64)
    mean, var = h.mean(axis=0), h.var(axis=0)
    running = ((h - RUNNING_MEAN) / np.sqrt(RUNNING_VAR.astype(np.float64) + EPS) * GAMMA + BETA) @ W2 + shift
    batch = ((h - mean) / np.sqrt(var + EPS) * GAMMA + BETA) @ W2 + shift
    return {"running": running, "batch": batch, "mean": mean, "var": var}


BN_NO_GRAPH_REASON = "the BatchNormalization node 'bn' follows a Relu: its statistics could not be turned into a graph"


def bn_no_graph_config() -> ModelConfig:
    return regress_config("bn-no-graph").model_copy(update={"norm_layers": {"BatchNormalization": 1}})


def _write_regress(root: Path, config: ModelConfig) -> None:
    files = {
        BATCH_STATS_FILE: regress_batch_stats_onnx(config),
        BN_STATS_FILE: regress_stats().model_dump_json(indent=1).encode(),
    }
    write_version(root, config, "1", regress_onnx(config), {**REPORT, "batch_stats": {"file": BATCH_STATS_FILE}}, files)


# -- wrong-dtype: a config that passes the schema, over a graph that needs another input datatype --

WRONG_DTYPE_CONFIG = ModelConfig(
    name="wrong-dtype",
    max_batch_size=4,
    inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, 4])],
    outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, 2])],
)


def wrong_dtype_onnx() -> bytes:
    graph_x = TensorSpec(name="x", datatype="INT64", shape=[-1, 4])
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["xf", "W"], ["y"]),
    ]
    return _model(nodes, [_value_info(graph_x)], [_value_info(WRONG_DTYPE_CONFIG.outputs[0])], {"W": GRID_W})


def write_text(root: Path, version: str = "1", scale: float = 1.0) -> None:
    write_version(root, TEXT_CONFIG, version, text_onnx(scale), REPORT)


def write_bn_models(root: Path) -> Path:
    """Write the BatchNorm models: ``regress-bn``, ``regress-bn-fixed`` and ``bn-no-graph``."""
    _write_regress(root, regress_config())
    _write_regress(root, regress_config("regress-bn-fixed", rows=5))
    no_graph = bn_no_graph_config()
    report = {**REPORT, "batch_stats": {"unavailable": BN_NO_GRAPH_REASON}}
    write_version(root, no_graph, "1", regress_onnx(no_graph), report)
    return root


def write_user_models(root: Path, broken: bool = False) -> Path:
    """Write every user model of this module into ``root`` (and ``wrong-dtype`` where ``broken``)."""
    write_text(root)
    write_grid(root)
    write_version(root, DTYPES_CONFIG, "1", dtypes_onnx(), REPORT)
    write_bn_models(root)
    if broken:
        write_version(root, WRONG_DTYPE_CONFIG, "1", wrong_dtype_onnx(), REPORT)
    return root
