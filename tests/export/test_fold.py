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


def test_batchnorm_without_a_foldable_producer_folds_forward_or_becomes_an_affine_map_and_is_named() -> None:
    result = assert_same_outputs(Residual(), torch.randn(2, 4, 6, 6))
    # After the add, the BatchNorm feeds only the unpadded 1x1 conv 'branch': it folds forward into it.
    assert [(f.layer, f.norm, f.kind, f.forward) for f in result.folds] == [
        ("branch", "bn_after_add", "BatchNorm2d+Conv2d", True)
    ]
    reasons = {u.norm: u.reason for u in result.unfoldable}
    assert "also feeds 1 other node" in reasons["bn_shared"]
    assert "nor forward: it feeds call_function 'add_1'" in reasons["bn_shared"]
    assert isinstance(result.model.bn_shared, BatchNormAffine)


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
        "bn_one_call": "'conv' is called at 2 places; folding would change them all; "
        "nor forward: it feeds call_function 'add', not a Conv or Linear layer",
        "bn_two_calls": "it is called at 2 places; nor into a layer after it",
    }


@pytest.mark.parametrize(
    ("conv", "bn", "shape"),
    [
        (nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6), (4, 3, 9)),
        (nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), (4, 3, 5, 5)),
        (nn.Conv3d(3, 6, 3, padding=1), nn.BatchNorm3d(6), (2, 3, 4, 4, 4)),
        (nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), (3, 4, 5, 5)),  # grouped
        (nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), (3, 6, 5, 5)),  # depthwise
        (nn.ConvTranspose1d(3, 4, 2, stride=2, bias=False), nn.BatchNorm1d(4), (2, 3, 5)),
        (nn.ConvTranspose3d(2, 4, 2, stride=2), nn.BatchNorm3d(4), (2, 2, 2, 3, 3)),
    ],
    ids=["conv1d", "conv2d", "conv3d", "grouped", "depthwise", "transposed1d", "transposed3d"],
)
def test_every_convolution_folds_its_batchnorm(conv: nn.Module, bn: nn.Module, shape: tuple[int, ...]) -> None:
    result = assert_same_outputs(nn.Sequential(conv, bn, nn.ReLU()), torch.randn(*shape) * 2 + 1)
    assert [(f.layer, f.norm, f.forward) for f in result.folds] == [("0", "1", False)]


def test_sync_batchnorm_is_a_batchnorm_at_inference() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.SyncBatchNorm(2))
    result = assert_same_outputs(model, torch.randn(2, 3, 6, 6))
    assert [f.kind for f in result.folds] == ["Conv2d+SyncBatchNorm"] * 2


@pytest.mark.parametrize(
    ("after", "folds_forward"),
    [
        (nn.Conv2d(4, 6, 3), True),  # no padding: exact
        (nn.Conv2d(4, 6, 1, groups=2), True),
        (nn.Conv2d(4, 4, 3, groups=4, bias=False), True),  # depthwise, no bias
        (nn.Conv2d(4, 6, 3, padding=1), False),  # zero padding would not see the shift
    ],
    ids=["conv", "grouped", "depthwise", "padded"],
)
def test_batchnorm_after_relu_folds_forward_into_an_unpadded_conv(after: nn.Module, folds_forward: bool) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), after)
    result = assert_same_outputs(model, torch.randn(3, 3, 7, 7))
    if folds_forward:
        assert [(f.layer, f.norm, f.forward) for f in result.folds] == [("3", "2", True)]
        assert isinstance(result.model[2], nn.Identity)
    else:
        assert result.folds == []
        assert result.unfoldable[0].reason == (
            "its input comes from ReLU '1', not from a Conv or Linear layer; "
            "nor forward: the Conv '3' after it pads with zeros, which the shift would change"
        )


def test_batchnorm1d_after_relu_folds_forward_into_a_linear() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 3))
    result = assert_same_outputs(model, torch.randn(8, 5))
    assert [(f.layer, f.kind, f.forward) for f in result.folds] == [("3", "BatchNorm1d+Linear", True)]


class DenseLayer(nn.Module):
    """DenseNet's layer: BatchNorm after a concatenation, then ReLU and a padded conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.norm = nn.BatchNorm2d(5)
        self.conv = nn.Conv2d(5, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.norm(torch.cat([x, self.a(x)], 1))))


def test_batchnorm_after_a_concat_becomes_an_affine_map() -> None:
    result = assert_same_outputs(DenseLayer(), torch.randn(2, 3, 5, 5))
    assert result.folds == []
    assert "call_function 'cat'" in result.unfoldable[0].reason
    assert "nor forward: it feeds call_function 'relu'" in result.unfoldable[0].reason


class TwoReaders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.side = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + self.side(y)  # the conv's output is read by the BatchNorm and by 'side'


def test_a_conv_read_by_two_layers_is_not_folded_into() -> None:
    result = assert_same_outputs(TwoReaders(), torch.randn(2, 3, 5, 5))
    assert result.folds == [] and "'conv' also feeds 1 other node(s)" in result.unfoldable[0].reason


class RegisteredOutOfOrder(nn.Module):
    """Registered bn, conv_b, conv_a; called conv_a -> bn -> conv_b: the dataflow decides, not the order."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 2, 1)
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(self.bn(self.conv_a(x)))


def test_the_fold_follows_the_dataflow_not_the_registration_order() -> None:
    result = assert_same_outputs(RegisteredOutOfOrder(), torch.randn(2, 3, 5, 5))
    assert [(f.layer, f.norm, f.forward) for f in result.folds] == [("conv_a", "bn", False)]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.mean() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return y
        return -y


def test_a_module_fx_cannot_trace_raises_fx_own_error() -> None:
    with pytest.raises(torch.fx.proxy.TraceError):
        fold_batchnorms(DataDependent(), torch.randn(2, 3, 5, 5))
