import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from export.fold import BatchNormAffine, FoldError, fold_batchnorms
from models.norms import TokenBatchNorm
from models.zoo import build_model, config_to_dict
from tests.conftest import randomize_batchnorms, tiny_cnn_spec, tiny_vit_spec


def assert_same_outputs(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model = randomize_batchnorms(model)
    result = fold_batchnorms(model, x)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, _BatchNorm) for m in result.model.modules())
    assert any(isinstance(m, _BatchNorm) for m in model.modules())  # the input model is left as it was
    return result


@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_batchnorm_folds(bias: bool) -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6), nn.ReLU())
    result = assert_same_outputs(model, torch.randn(4, 3, 5, 5) * 3)
    assert [(f.layer, f.norm, f.kind) for f in result.folds] == [("0", "1", "Conv2d+BatchNorm2d")]
    assert result.unfoldable == [] and result.model[0].bias is not None


def test_linear_batchnorm1d_folds() -> None:
    model = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.Linear(5, 2), nn.BatchNorm1d(2))
    result = assert_same_outputs(model, torch.randn(8, 7))
    assert [f.kind for f in result.folds] == ["Linear+BatchNorm1d"] * 2


def test_transposed_conv_batchnorm_folds() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(4, 3, 2, stride=2), nn.BatchNorm2d(3))
    result = assert_same_outputs(model, torch.randn(2, 4, 3, 3))
    assert result.folds[0].kind == "ConvTranspose2d+BatchNorm2d"


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_after_add = nn.BatchNorm2d(4)
        self.branch = nn.Conv2d(4, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_after_add(self.conv(x) + x)
        z = self.branch(y)
        return self.bn_shared(z) + z  # z also feeds the add: folding would change that path


def test_batchnorm_without_a_foldable_producer_becomes_an_affine_map_and_is_named() -> None:
    result = assert_same_outputs(Residual(), torch.randn(2, 4, 6, 6))
    assert result.folds == []
    reasons = {u.norm: u.reason for u in result.unfoldable}
    assert "call_function 'add'" in reasons["bn_after_add"]
    assert "also feeds 1 other node" in reasons["bn_shared"]
    assert isinstance(result.model.bn_after_add, BatchNormAffine)


def test_token_batchnorm_in_a_vit_is_handled() -> None:
    spec = tiny_vit_spec("bn")
    model = build_model(spec.arch, config_to_dict(spec.config))
    result = assert_same_outputs(model, torch.rand(3, 1, 8, 8))
    assert len(result.unfoldable) == 3 and result.folds == []  # norm1, norm2, final norm


def test_tiny_cnn_folds_every_batchnorm() -> None:
    spec = tiny_cnn_spec("bn")
    model = build_model(spec.arch, config_to_dict(spec.config))
    result = assert_same_outputs(model, torch.rand(3, 1, 8, 8))
    assert len(result.folds) == 6 and result.unfoldable == []


def test_linear_on_tokens_does_not_fold_into_a_token_batchnorm() -> None:
    model = nn.Sequential(nn.Linear(6, 6), TokenBatchNorm(6))
    result = assert_same_outputs(model, torch.randn(2, 5, 6))
    assert "axis -1" in result.unfoldable[0].reason


def test_batchnorm_without_running_statistics_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(FoldError, match="batch statistics even at inference"):
        fold_batchnorms(model, torch.randn(2, 1, 3, 3))


class SharedModules(nn.Module):
    """A conv called twice (BN after one call only) and a BN called after a conv and after an add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn_one_call = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn_two_calls = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn_one_call(self.conv(x)) + self.conv(x * 2)
        return self.bn_two_calls(self.conv2(a)) + self.bn_two_calls(a + 1)


def test_modules_called_at_several_places_are_not_folded_into() -> None:
    result = assert_same_outputs(SharedModules(), torch.randn(2, 3, 4, 4))
    assert result.folds == []
    reasons = {u.norm: u.reason for u in result.unfoldable}
    assert reasons == {
        "bn_one_call": "'conv' is called at 2 places; folding would change them all",
        "bn_two_calls": "it is called at 2 places",
    }
