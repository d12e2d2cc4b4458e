import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from torch import nn

from export.build import verification_inputs
from models.train import make_checkpoint
from models.zoo import build_model, config_to_dict
from tests.conftest import randomize_batchnorms, tiny_cnn_spec


@pytest.fixture(scope="session")
def tiny() -> tuple[nn.Module, dict, np.ndarray]:
    """A tiny BN CNN with non-trivial statistics, its checkpoint metadata, and its verification inputs."""
    spec = tiny_cnn_spec()
    model = randomize_batchnorms(build_model(spec.arch, config_to_dict(spec.config)))
    meta = make_checkpoint(spec, model, {"test_accuracy": None})
    del meta["state_dict"]
    x, _, _ = verification_inputs(meta)
    return model, meta, x


def perturb_first_conv_weight(model: onnx.ModelProto, delta: float = 0.05) -> onnx.ModelProto:
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    conv = next(n for n in broken.graph.node if n.op_type == "Conv")
    init = next(i for i in broken.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += delta
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    return broken
