"""Weight SVD and spatial SVD: exact at full rank, cost model equal to the measured MACs, error falls with rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlib.compress.cost import layer_costs, total_cost
from quantlib.compress.prepare import prepare_for_compression
from quantlib.compress.spaces import SvdSpace
from quantlib.compress.svd import SvdError, cost_per_rank, factorize, full_rank, svd_eligible

CONVS = [
    nn.Conv2d(6, 10, 3, padding=1),
    nn.Conv2d(6, 10, 3, stride=2, padding=1),
    nn.Conv2d(6, 10, (3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    nn.Conv2d(6, 4, 1, bias=False),
]


@pytest.mark.parametrize("method", ["weight_svd", "spatial_svd"])
@pytest.mark.parametrize("index", range(len(CONVS)))
def test_full_rank_reproduces_conv_outputs(method, index):
    torch.manual_seed(index)
    conv = CONVS[index]
    x = torch.randn(2, 6, 13, 11)
    factors = factorize(conv, method, full_rank(conv, method))
    with torch.no_grad():
        reference, out = conv(x), factors(x)
    assert out.shape == reference.shape
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert isinstance(factors[0], nn.Conv2d) and factors[0].bias is None
    if method == "weight_svd":
        assert factors[0].kernel_size == (1, 1) and factors[1].kernel_size == conv.kernel_size
    else:
        assert factors[0].kernel_size == (conv.kernel_size[0], 1) and factors[1].kernel_size == (1, conv.kernel_size[1])


def test_full_rank_reproduces_linear_outputs():
    torch.manual_seed(0)
    layer = nn.Linear(7, 5)
    x = torch.randn(3, 4, 7)
    factors = factorize(layer, "weight_svd", full_rank(layer, "weight_svd"))
    with torch.no_grad():
        assert torch.allclose(factors(x), layer(x), atol=1e-5)
    assert full_rank(layer, "weight_svd") == 5


@pytest.mark.parametrize("method", ["weight_svd", "spatial_svd"])
def test_error_falls_with_rank_and_cost_per_rank_matches_measured_macs(method):
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1)
    x = torch.randn(2, 16, 15, 15)
    with torch.no_grad():
        reference = conv(x)
    errors = []
    costs = layer_costs(nn.Sequential(conv), x[:1])
    macs_per_rank, params_per_rank = cost_per_rank(conv, method, costs["0"].input_shape, costs["0"].output_shape)
    for rank in (2, 6, 12, full_rank(conv, method)):
        factors = factorize(conv, method, rank)
        with torch.no_grad():
            errors.append(float((factors(x) - reference).norm() / reference.norm()))
        measured = layer_costs(factors, x[:1])
        assert sum(c.macs for c in measured.values()) == rank * macs_per_rank
        assert factors[0].weight.numel() + factors[1].weight.numel() == rank * params_per_rank
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5 and errors[0] > 0.1


def test_grouped_and_transposed_convs_are_not_eligible():
    assert not svd_eligible(nn.Conv2d(8, 8, 3, groups=8), "spatial_svd")
    assert not svd_eligible(nn.ConvTranspose2d(4, 4, 2), "weight_svd")
    assert not svd_eligible(nn.Linear(4, 4), "spatial_svd")
    with pytest.raises(SvdError, match="rank=0 is out of range"):
        factorize(nn.Conv2d(4, 4, 3), "weight_svd", 0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.dw(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("method", ["weight_svd", "spatial_svd"])
def test_space_cost_model_equals_measured_macs_of_the_applied_model(method):
    torch.manual_seed(0)
    example = torch.randn(1, 3, 16, 16)
    model = prepare_for_compression(_Net().eval(), example)
    space = SvdSpace(model, method, example)
    assert "dw" not in space.layers() and "c2" in space.layers()
    ratios = {"c2": 0.5, "c1": 0.75}
    compressed = space.apply(ratios)
    assert space.cost(ratios) == total_cost(compressed, example)["macs"] < total_cost(model, example)["macs"]
    assert space.cost({}) == total_cost(model, example)["macs"]
    assert isinstance(compressed.get_submodule("c2"), nn.Sequential)
    assert isinstance(model.get_submodule("c2"), nn.Conv2d)  # the space's model is not mutated


def test_least_squares_refit_of_the_second_factors_lowers_the_output_error():
    torch.manual_seed(0)
    example = torch.randn(1, 3, 16, 16)
    model = prepare_for_compression(_Net().eval(), example)
    calibration = [torch.randn(16, 3, 16, 16) for _ in range(4)]
    held_out = torch.randn(32, 3, 16, 16)
    space = SvdSpace(model, "weight_svd", example)
    ratios = {"c1": 0.5, "c2": 0.25}
    plain = space.apply(ratios)
    refit = space.apply(ratios)
    fits = space.refit(refit, ratios, calibration)
    assert set(fits) == {"c1", "c2"} and all(f["relative_error_after"] < f["relative_error_before"] for f in fits.values())
    with torch.no_grad():
        reference = model(held_out)
        errors = [float((m(held_out) - reference).norm() / reference.norm()) for m in (plain, refit)]
    assert errors[1] < 0.8 * errors[0], errors


class _Pointwise(nn.Module):
    """Inverted-residual-like stack of 1x1 convs (the layers reduced-rank regression re-fits)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.pw = nn.Conv2d(12, 48, 1)
        self.pwl = nn.Conv2d(48, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.pwl(torch.relu(self.pw(x)))
        return self.fc(x.mean((2, 3)))


def test_reduced_rank_refit_of_both_factors_beats_the_second_factor_refit():
    torch.manual_seed(0)
    example = torch.randn(1, 3, 8, 8)
    model = prepare_for_compression(_Pointwise().eval(), example)
    # correlated inputs: the data-aware fit has something to exploit that the weight SVD ignores
    mix = torch.randn(3, 3)
    calibration = [torch.einsum("ij,bjhw->bihw", mix, torch.randn(16, 3, 8, 8)) for _ in range(4)]
    held_out = torch.einsum("ij,bjhw->bihw", mix, torch.randn(32, 3, 8, 8))
    space = SvdSpace(model, "weight_svd", example, include=("pw", "pwl", "fc"))
    ratios = {"pw": 0.5, "pwl": 0.5, "fc": 0.6}
    models = {kind: space.apply(ratios) for kind in ("none", "second", "both")}
    fits = {kind: space.refit(models[kind], ratios, calibration, factors=kind) for kind in ("second", "both")}
    assert {f["factors"] for f in fits["both"].values()} == {"both"}
    assert all(fits["both"][n]["relative_error_after"] < fits["second"][n]["relative_error_after"] for n in ratios)
    with torch.no_grad():
        reference = model(held_out)
        errors = {k: float((m(held_out) - reference).norm() / reference.norm()) for k, m in models.items()}
    assert errors["both"] < errors["second"] < errors["none"], errors
    with pytest.raises(ValueError, match="factors='all' is not supported"):
        space.refit(models["none"], ratios, calibration, factors="all")


def test_reduced_rank_refit_at_full_rank_keeps_the_layer_exact():
    torch.manual_seed(0)
    example = torch.randn(1, 3, 8, 8)
    model = prepare_for_compression(_Pointwise().eval(), example)
    space = SvdSpace(model, "weight_svd", example, include=("pw",))
    compressed = space.apply({"pw": 0.5})
    name = "pw"
    full = factorize(model.get_submodule(name), "weight_svd", full_rank(model.get_submodule(name), "weight_svd"))
    from quantlib.batchnorm_fold import set_submodule
    from quantlib.compress.refit import RefitConfig, refit_low_rank
    set_submodule(compressed, name, full)
    stats = refit_low_rank(compressed, model, name, [torch.randn(8, 3, 8, 8) for _ in range(2)], RefitConfig(ridge=0.0))
    held_out = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(compressed(held_out), model(held_out), atol=1e-4)
    assert stats["relative_error_after"] < 1e-6


def test_refit_factors_setting_is_checked_by_name():
    from quantlib.compress.steps import CompressConfigError, parse_step

    assert parse_step({"method": "spatial_svd", "refit": True, "refit_factors": "both"}).refit_factors == "both"
    with pytest.raises(CompressConfigError, match=r"weight_svd.refit_factors='all' is not supported; use one of second, both"):
        parse_step({"method": "weight_svd", "refit_factors": "all"})
