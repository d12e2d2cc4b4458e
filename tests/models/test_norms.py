import pytest
import torch
from torch import nn

from models.norms import (
    NORM_KINDS,
    SWITCHABLE_SOURCES,
    ChannelLayerNorm,
    SwitchableNorm2d,
    TokenBatchNorm,
    bn_channel_dim,
    make_norm2d,
    make_token_norm,
)


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("bn", nn.BatchNorm2d),
        ("gn", nn.GroupNorm),
        ("in", nn.InstanceNorm2d),
        ("ln", ChannelLayerNorm),
        ("sn", SwitchableNorm2d),
    ],
)
def test_factory_builds_each_kind(kind: str, cls: type) -> None:
    assert kind in NORM_KINDS
    layer = make_norm2d(kind, 16, groups=4)
    assert isinstance(layer, cls)
    x = torch.randn(3, 16, 5, 5)
    assert layer(x).shape == x.shape


def test_factory_rejects_unknown_kind_and_bad_groups() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        make_norm2d("xn", 8)
    with pytest.raises(ValueError, match="divisible"):
        make_norm2d("gn", 10, groups=4)
    with pytest.raises(ValueError, match="'ln' or 'bn'"):
        make_token_norm("gn", 8)


def test_channel_layer_norm_normalizes_each_position_over_channels() -> None:
    x = torch.randn(2, 8, 3, 4) * 5 + 3
    y = ChannelLayerNorm(8)(x)
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=1, unbiased=False), torch.ones(2, 3, 4), atol=1e-3, rtol=0)
    # Independent of the image: a position's output depends on that position's C-vector alone.
    x2 = x.clone()
    x2[:, :, 0, 0] += 100
    y2 = ChannelLayerNorm(8)(x2)
    torch.testing.assert_close(y2[:, :, 1:], y[:, :, 1:])


def test_token_batch_norm_pools_over_every_token_of_the_batch() -> None:
    x = torch.randn(4, 5, 6) * 3 + 2  # (B, T, D)
    bn = TokenBatchNorm(6).train()
    y = bn(x)
    flat = y.reshape(-1, 6)
    torch.testing.assert_close(flat.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(0, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)
    torch.testing.assert_close(bn.running_mean, 0.1 * x.reshape(-1, 6).mean(0))
    assert bn_channel_dim(bn) == -1 and bn_channel_dim(nn.BatchNorm2d(3)) == 1


def _one_hot_switch(layer: SwitchableNorm2d, source: str) -> SwitchableNorm2d:
    with torch.no_grad():
        for logits in (layer.mean_logits, layer.var_logits):
            logits.fill_(-1e4)
            logits[SWITCHABLE_SOURCES.index(source)] = 0.0
    return layer


@pytest.mark.parametrize(
    ("source", "reference"),
    [
        ("in", lambda: nn.InstanceNorm2d(6)),
        ("ln", lambda: nn.GroupNorm(1, 6, affine=False)),  # LN over (C, H, W) of each sample
        ("bn", lambda: nn.BatchNorm2d(6, affine=False).train()),
    ],
)
def test_switchable_norm_with_one_source_is_that_norm(source: str, reference) -> None:
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    layer = _one_hot_switch(SwitchableNorm2d(6).train(), source)
    torch.testing.assert_close(layer(x), reference()(x), atol=1e-4, rtol=1e-4)
    assert layer.mixture()["mean"][source] == pytest.approx(1.0)


def test_switchable_norm_mixes_statistics_and_keeps_batchnorm_running_statistics() -> None:
    x = torch.randn(4, 6, 5, 5) * 2 + 3
    layer = SwitchableNorm2d(6).train()
    y = layer(x)  # equal weights: each source weighs 1/3
    mean = (x.mean((2, 3), keepdim=True) + x.mean((1, 2, 3), keepdim=True) + x.mean((0, 2, 3), keepdim=True)) / 3
    var = sum(x.var(axes, keepdim=True, unbiased=False) for axes in ((2, 3), (1, 2, 3), (0, 2, 3))) / 3
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + 1e-5), atol=1e-5, rtol=1e-5)
    n = 4 * 5 * 5  # values per channel: the running variance is the unbiased one, as BatchNorm's
    torch.testing.assert_close(layer.running_mean, 0.1 * x.mean((0, 2, 3)))
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * x.var((0, 2, 3), unbiased=False) * n / (n - 1))
    # In eval mode the BN part uses the running statistics: a sample's output is its own.
    layer.eval()
    alone = layer(x[:1])
    torch.testing.assert_close(layer(x)[:1], alone, atol=1e-6, rtol=0)
    assert not torch.allclose(y[:1], alone, atol=1e-3)
