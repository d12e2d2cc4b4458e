"""The baseline: the FastAPI + onnxruntime app a user would write in twenty lines.

pydantic parses the nested lists, a ``def`` endpoint (run on Starlette's thread pool) calls
``session.run`` one request at a time, and the answer goes back through FastAPI's encoder. It
speaks the same JSON as normserve, so one load test can drive both.

    NAIVE_MODEL=model_repository/cnn-bn/1/model.onnx uvicorn bench.naive_app:app --port 8001
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("NAIVE_THREADS", "1"))
session = ort.InferenceSession(
    os.environ.get("NAIVE_MODEL", "model_repository/cnn-bn/1/model.onnx"), options, providers=["CPUExecutionProvider"]
)
app = FastAPI()


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float] | list[list[list[list[float]]]]


class InferenceRequest(BaseModel):
    inputs: list[Tensor]


@app.post("/v2/models/{model_name}/infer")
def infer(model_name: str, request: InferenceRequest) -> dict[str, object]:
    tensor = request.inputs[0]
    x = np.array(tensor.data, dtype=np.float32).reshape(tensor.shape)
    (logits,) = session.run(None, {tensor.name: x})
    return {
        "model_name": model_name,
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": list(logits.shape), "data": logits.ravel().tolist()}
        ],
    }
