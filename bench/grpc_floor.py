"""grpc.aio's own floor: normserve with its gRPC ModelInfer answered at once, without the model.

    python -m bench.grpc_floor     # normserve's settings (NORMSERVE_GRPC_PORT, ...); then, e.g.,
    perf_analyzer -m cnn-bn -u 127.0.0.1:8001 -i grpc -x 1 --concurrency-range 16 --input-data zero

Everything but ModelInfer's work is normserve's: its settings, registry, access check, the servicer and its
error handling, on grpcio's asyncio server and the same event loop. Each ModelInfer call is answered with
zeros of the outputs' shapes, with no checks, no batcher and no onnxruntime. So perf_analyzer against it
measures what a gRPC call costs the server before any inference (grpcio's server, its completion-queue
thread and the hop to the loop), which no change to normserve's own path can take away. The suite runs it
beside the real server, so that T8's judgement says how much of a call's cost is grpc.aio's.

Not for serving: its answers are zeros. Its ModelStatistics says nothing of the calls (perf_analyzer needs
``-x 1``: the version it asks for).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from repository import DTYPES
from service import __main__ as service_main
from service import grpc_service
from service.state import ServiceState

__all__ = ["answer_at_once", "main"]


async def answer_at_once(
    state: ServiceState, request: grpc_service.pb.ModelInferRequest, remaining_s: float | None
) -> grpc_service.pb.ModelInferResponse:
    """In place of ``grpc_service.infer``: the served version's outputs as zeros, for the request's rows."""
    served = state.registry.get(request.model_name, request.model_version or None)
    rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
    response = grpc_service.pb.ModelInferResponse(
        model_name=served.config.name, model_version=served.version.number, id=request.id
    )
    for spec in served.config.output_specs.values():
        shape = [rows if d == -1 else d for d in spec.shape]
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        response.raw_output_contents.append(bytes(int(np.prod(shape)) * DTYPES[spec.datatype].itemsize))
    return response


def main(argv: Any = None) -> None:
    grpc_service.infer = answer_at_once  # ModelInfer looks ``infer`` up when it is called
    service_main.main()


if __name__ == "__main__":
    main()
