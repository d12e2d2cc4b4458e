import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from models.cnn import CNNConfig
from models.data import load_splits
from models.train import (
    BatchNormRecorder,
    evaluate,
    init_untrained,
    load_checkpoint,
    main,
    random_shift,
    train_model,
)
from models.zoo import DEFAULT_MODELS, ModelSpec, build_model, config_to_dict
from tests.conftest import tiny_cnn_spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, dict, object]:
    spec = tiny_cnn_spec()
    spec = replace(spec, train=replace(spec.train, batch_size=8))  # n = 8 * H * W: unbiased differs by 1/(n-1)
    out = tmp_path_factory.mktemp("tiny-cnn-bn")
    log = train_model(spec, out, max_steps=4, progress=False)
    return spec, log, out


def test_running_statistics_follow_pytorch_momentum_rule(trained) -> None:
    """running <- (1 - m) * running + m * batch, with the unbiased batch variance stored."""
    _, log, out = trained
    history = np.load(out / "bn_history.npz")
    layers = log["batchnorm"]
    assert len(layers) == 6  # stem, two per block, and the strided shortcut of the second stage
    for name, info in layers.items():
        m = info["momentum"]
        bm, bv = history[f"{name}.batch_mean"], history[f"{name}.batch_var"]
        rm, rv, n = history[f"{name}.running_mean"], history[f"{name}.running_var"], history[f"{name}.count"]
        assert len(bm) == log["steps"] == 4
        prev_mean, prev_var = np.zeros_like(rm[0]), np.ones_like(rv[0])  # a fresh BatchNorm's buffers
        for t in range(len(bm)):
            unbiased = bv[t] * n[t] / (n[t] - 1)
            np.testing.assert_allclose(rm[t], (1 - m) * prev_mean + m * bm[t], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(rv[t], (1 - m) * prev_var + m * unbiased, rtol=1e-5, atol=1e-6)
            # The variance blended in, solved from the update, is the unbiased one and not the biased one
            # the layer normalized with: they differ by a factor n/(n-1), far above this tolerance.
            blended = (rv[t] - (1 - m) * prev_var) / m
            assert np.abs(blended / unbiased - 1).max() < 0.1 / (n[t] - 1)
            assert np.abs(blended / bv[t] - 1).min() > 0.9 / (n[t] - 1)
            prev_mean, prev_var = rm[t], rv[t]


def test_batch_norm_normalizes_with_the_biased_variance_it_records() -> None:
    bn = nn.BatchNorm2d(3).train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.0, 0.5, 1.0]))
    x = torch.randn(2, 3, 2, 2) * 4 + 1  # 8 values per channel: biased and unbiased differ by 8/7
    with BatchNormRecorder(nn.Sequential(bn)) as rec:
        y = bn(x).detach()
    mean = torch.from_numpy(rec.arrays()["0.batch_mean"][0])
    var = torch.from_numpy(rec.arrays()["0.batch_var"][0])
    expected = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
    expected = expected * bn.weight.detach()[:, None, None] + bn.bias.detach()[:, None, None]
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(var, x.var(dim=(0, 2, 3), unbiased=False))


def test_checkpoint_loads_weights_only_and_reproduces_the_logged_accuracy(trained) -> None:
    spec, log, out = trained
    raw = torch.load(out / "checkpoint.pt", weights_only=True)  # never an arbitrary pickle
    assert raw["config"] == config_to_dict(spec.config)
    model, meta = load_checkpoint(out / "checkpoint.pt")
    assert not model.training and meta["name"] == spec.name
    data = load_splits()
    _, acc = evaluate(model, data.x_test, data.y_test)
    assert acc == log["test_accuracy"] == meta["metrics"]["test_accuracy"]
    logged = json.loads((out / "training_log.json").read_text())
    assert logged["epochs"][0]["step"] == 4 and 0.0 <= logged["epochs"][0]["val_accuracy"] <= 1.0
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_without_batchnorm_write_no_bn_history(tmp_path) -> None:
    log = train_model(tiny_cnn_spec("gn"), tmp_path, max_steps=1, progress=False)
    assert log["batchnorm"] == {}
    assert not (tmp_path / "bn_history.npz").exists()


def test_random_shift_moves_each_image_by_at_most_max_shift() -> None:
    x = torch.zeros(50, 1, 8, 8)
    x[:, 0, 4, 4] = 1.0
    g = torch.Generator().manual_seed(0)
    y = random_shift(x, 1, g)
    assert torch.equal(y.sum(dim=(1, 2, 3)), torch.ones(50))  # the dot stays inside the frame
    pos = y[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 8, pos % 8
    assert set(rows.tolist()) == {3, 4, 5} and set(cols.tolist()) == {3, 4, 5}
    assert torch.equal(random_shift(x, 0, g), x)


def test_untrained_model_gets_real_batchnorm_statistics(tmp_path) -> None:
    spec = replace(
        DEFAULT_MODELS["resnet18-bn"],
        config=CNNConfig(in_channels=3, image_size=32, num_classes=5, widths=(8,), blocks=(1,), stem="imagenet"),
    )
    init_untrained(spec, tmp_path, calibration_batches=2, batch_size=4)
    model, meta = load_checkpoint(tmp_path / "checkpoint.pt")
    assert meta["trained"] is False
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.momentum == 0.1 for bn in bns)
    assert all(not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in bns)


def test_build_model_rejects_unknown_arch() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        build_model("mlp", {})


def test_cli_lists_the_default_models_and_rejects_unknown_ones(capsys) -> None:
    main(["--list"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(DEFAULT_MODELS)
    with pytest.raises(SystemExit):
        main(["cnn-xx"])
    assert "expected one of cnn-bn" in capsys.readouterr().err
