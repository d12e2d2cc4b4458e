"""Inference requests built from real held-out digits, as KServe v2 JSON or Triton binary data.

The digits (scikit-learn's ``load_digits``, the test split every script shares) are 8x8 in [0, 1].
A model that takes another image size gets each digit scaled up by nearest neighbour and repeated
over its channels, so a ResNet-18 at 3x224x224 sees real pictures of digits too.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from models.data import load_splits

__all__ = ["InputSpec", "ModelSignature", "fetch_signature", "read_signature", "digit_images", "build_requests"]

ENCODINGS = ("json", "binary")
_NUMPY = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # with the batch dimension first (-1)


@dataclass(frozen=True)
class ModelSignature:
    """What a request needs to know of a model: its one image input and the outputs to ask for."""

    name: str
    input: InputSpec
    outputs: tuple[str, ...]

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> ModelSignature:
        """Read KServe v2 model metadata (or a repository ``config.json``, which has the same fields)."""
        inputs = metadata.get("inputs") or []
        if len(inputs) != 1:
            raise ValueError(f"model {metadata.get('name')!r} has {len(inputs)} inputs; the load generator sends one")
        spec = inputs[0]
        if spec["datatype"] not in _NUMPY:
            raise ValueError(f"input {spec['name']!r} is {spec['datatype']}; expected one of {sorted(_NUMPY)}")
        shape = tuple(int(d) for d in spec["shape"])
        if len(shape) != 4 or any(d <= 0 for d in shape[1:]):
            raise ValueError(f"input {spec['name']!r} has shape {list(shape)}; expected an image [-1, C, H, W]")
        outputs = tuple(o["name"] for o in metadata.get("outputs") or [])
        return cls(str(metadata["name"]), InputSpec(spec["name"], spec["datatype"], shape), outputs)


def fetch_signature(url: str, model: str, timeout: float = 10.0) -> ModelSignature:
    """The signature from the server's model metadata (``GET /v2/models/{model}``)."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/v2/models/{model}", timeout=timeout) as response:
        return ModelSignature.from_metadata(json.load(response))


def read_signature(config: Path) -> ModelSignature:
    """The signature from a model repository's ``config.json``, for servers that serve no metadata."""
    return ModelSignature.from_metadata(json.loads(config.read_text()))


def digit_images(count: int, channels: int, height: int, width: int) -> np.ndarray:
    """``count`` held-out digits as (count, channels, height, width) float32 in [0, 1], cycling the test set."""
    digits = load_splits().x_test[:, 0]  # (270, 8, 8)
    picked = digits[np.arange(count) % len(digits)]
    rows = np.arange(height) * digits.shape[1] // height  # nearest neighbour
    cols = np.arange(width) * digits.shape[2] // width
    scaled = picked[:, rows][:, :, cols]  # (count, H, W)
    return np.ascontiguousarray(np.repeat(scaled[:, None], channels, axis=1), dtype=np.float32)


def build_requests(
    signature: ModelSignature, encoding: str, batch: int = 1, distinct: int = 64
) -> list[tuple[bytes, dict[str, str]]]:
    """``distinct`` request bodies of ``batch`` digits each, with the headers each needs.

    Args:
        signature: the model's input and outputs.
        encoding: ``json`` (the tensor as a flat JSON list) or ``binary`` (Triton's binary tensor data
            extension, for the input and every output).
        batch: rows per request.
        distinct: how many different bodies to cycle through.
    Returns:
        A list of ``(body, headers)``.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding is {encoding!r}; expected one of {ENCODINGS}")
    spec = signature.input
    _, channels, height, width = spec.shape
    images = digit_images(distinct * batch, channels, height, width).astype(_NUMPY[spec.datatype])
    shape = [batch, channels, height, width]
    requests = []
    for i in range(distinct):
        x = images[i * batch : (i + 1) * batch]
        if encoding == "json":
            body = orjson.dumps(
                {"inputs": [{"name": spec.name, "datatype": spec.datatype, "shape": shape, "data": x.ravel().tolist()}]}
            )
            requests.append((body, {"Content-Type": "application/json"}))
            continue
        blob = x.tobytes()
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": spec.name,
                        "datatype": spec.datatype,
                        "shape": shape,
                        "parameters": {"binary_data_size": len(blob)},
                    }
                ],
                "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in signature.outputs],
            }
        )
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
        requests.append((header + blob, headers))
    return requests
