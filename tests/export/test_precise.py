import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export.build import export_model
from export.precise import precise_statistics, with_precise_statistics
from export.verify import cpu_session
from models.data import load_splits
from models.train import evaluate, make_checkpoint
from models.zoo import build_model, config_to_dict
from tests.conftest import tiny_cnn_spec


def _pointwise_model() -> nn.Sequential:
    """Two 1x1 conv + BatchNorm layers: simple enough to compute by hand in numpy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():  # well-spread channels: float32 statistics of a near-constant channel are not exact
        model[0].weight.copy_(torch.tensor([1.5, -2.0, 0.7]).view(3, 1, 1, 1))
    return model


def _conv1x1(model: nn.Sequential, i: int, x: np.ndarray) -> np.ndarray:
    w = model[i].weight.detach().double().numpy()[:, :, 0, 0]  # (C_out, C_in)
    b = model[i].bias.detach().double().numpy()
    return np.einsum("oc,nchw->nohw", w, x) + b[None, :, None, None]


def test_precise_statistics_equal_a_direct_computation_over_the_split() -> None:
    model = _pointwise_model()
    x = load_splits().x_train.astype(np.float64)
    h1 = _conv1x1(model, 0, x)  # the first BatchNorm's input does not depend on the batching
    stats = precise_statistics(model, load_splits().x_train, batch_size=7)
    np.testing.assert_allclose(stats["1"].mean, h1.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["1"].var, h1.var((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert stats["1"].count == len(x) * 64
    # The second one sees the first normalized with batch statistics, as in train(): in one batch of
    # the whole split that is the split's own statistics.
    whole = precise_statistics(model, load_splits().x_train, batch_size=len(x))
    mean, var = h1.mean((0, 2, 3), keepdims=True), h1.var((0, 2, 3), keepdims=True)
    weight = model[1].weight.detach().double().numpy()[None, :, None, None]
    bias = model[1].bias.detach().double().numpy()[None, :, None, None]
    h2 = _conv1x1(model, 3, np.maximum((h1 - mean) / np.sqrt(var + model[1].eps) * weight + bias, 0))
    np.testing.assert_allclose(whole["4"].mean, h2.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(whole["4"].var, h2.var((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_precise_statistics_replace_the_running_ones_unbiased_and_leave_the_model_alone() -> None:
    model = _pointwise_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = precise_statistics(model, load_splits().x_train, batch_size=32)
    precise = with_precise_statistics(model, stats)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)  # neither weights nor buffers moved
    n = stats["1"].count
    np.testing.assert_allclose(precise[1].running_var.double().numpy(), stats["1"].var * n / (n - 1), rtol=1e-6)
    np.testing.assert_allclose(precise[1].running_mean.double().numpy(), stats["1"].mean, rtol=1e-6)
    assert not precise.training
    with pytest.raises(ValueError, match="at least 2 samples"):
        precise_statistics(model, load_splits().x_train, batch_size=1)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        precise_statistics(nn.Conv2d(1, 1, 1), load_splits().x_train, batch_size=8)


def test_export_folds_precise_statistics_when_asked_and_reports_both(tiny, tmp_path) -> None:
    model, meta, x = tiny
    version, report = export_model(model, meta, tmp_path, "1", precise_bn=True)
    stats = report["bn_statistics"]
    assert stats["folded"] == "precise" and set(stats["test_accuracy"]) == {"ema", "precise"}
    assert "batches of 32" in stats["precise_over"]  # the checkpoint's training batch size
    precise = with_precise_statistics(model, precise_statistics(model, load_splits().x_train, 32))
    data = load_splits()
    assert stats["test_accuracy"]["precise"] == evaluate(precise, data.x_test, data.y_test)[1]
    assert stats["test_accuracy"]["ema"] == evaluate(model, data.x_test, data.y_test)[1]
    served = cpu_session(onnx.load(version.model_file)).run(None, {"input": x[:16]})[0]
    with torch.no_grad():
        np.testing.assert_allclose(served, precise(torch.tensor(x[:16])).numpy(), atol=1e-4, rtol=1e-4)
        assert np.abs(served - model(torch.tensor(x[:16])).numpy()).max() > 1e-2  # not the EMA statistics
    _, default = export_model(model, meta, tmp_path / "ema", "1")
    assert default["bn_statistics"]["folded"] == "ema"


def test_a_switchable_norm_model_exports_with_every_check_passing(tmp_path) -> None:
    spec = tiny_cnn_spec("sn")
    model = build_model(spec.arch, config_to_dict(spec.config))
    with torch.no_grad():  # mixture weights and running statistics away from their initial values
        for m in model.modules():
            if hasattr(m, "mean_logits"):
                m.mean_logits.copy_(torch.tensor([0.5, -1.0, 1.5]))
                m.var_logits.copy_(torch.tensor([-0.5, 1.0, 0.2]))
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    meta = make_checkpoint(spec, model.eval(), {"test_accuracy": None})
    del meta["state_dict"]
    _, report = export_model(model, meta, tmp_path, "1")
    assert all(c["passed"] for c in report["checks"].values()), report["checks"]
    assert set(report["checks"]) >= {"no_batchnorm", "parity", "batch_invariance", "accuracy"}
    assert report["norm_layers"] == {"SwitchableNorm2d": 6}
    assert report["bn_statistics"] is None and report["batch_stats"] is None  # no BatchNorm to fold or swap
    assert "BatchNormalization" not in report["ops"]["served"]
