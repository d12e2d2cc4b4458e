import pytest
import torch
from torch import nn

from models.norms import NORM_KINDS, ChannelLayerNorm, TokenBatchNorm, bn_channel_dim, make_norm2d, make_token_norm


@pytest.mark.parametrize(
    ("kind", "cls"),
    [("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm), ("in", nn.InstanceNorm2d), ("ln", ChannelLayerNorm)],
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
