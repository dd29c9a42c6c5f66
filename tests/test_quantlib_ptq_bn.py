"""BatchNorm folding, re-estimation and the BN output statistics of quantlib.ptq.

Folding must be exact in eval mode; re-estimation must recompute the running statistics from
the data (and leave everything else as it was); the Gaussian model of BN outputs must give the
clipped means a Monte Carlo estimate gives.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlib.graph import trace
from quantlib.ptq.bn_reestimation import batch_norms, reestimate_bn_stats
from quantlib.ptq.bn_stats import ChannelGaussian, clipped_normal_mean, collect_bn_output_stats, expected_activation
from quantlib.ptq.layer_pairs import RELU, RELU6, Activation
from quantlib.ptq.pipeline import prepare_fp32_model

from quantlib_models import Conv1dNet, DepthwiseNet


class ConvBNNet(nn.Module):
    """Conv-BN-ReLU -> Conv(no bias)-BN -> pool -> Linear-BN1d."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 4, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.bn3(self.fc(y.mean((2, 3))))


def _randomize_bns(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in batch_norms(model).values():
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=generator))
            bn.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)
            bn.weight.copy_(torch.rand(n, generator=generator) * 2 - 0.5)  # some negative gammas
            bn.bias.copy_(torch.randn(n, generator=generator))
    return model.eval()


def _batches(shape, count=4, seed=1, scale=1.0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) * scale + shift for _ in range(count)]


# ---------------------------------------------------------------------------------- folding


@pytest.mark.parametrize("factory, shape, expected", [
    (ConvBNNet, (4, 3, 10, 10), 3),
    (Conv1dNet, (4, 3, 12), 1),
    (DepthwiseNet, (4, 3, 8, 8), 1),
])
def test_bn_fold_is_exact_in_eval_mode(factory, shape, expected):
    torch.manual_seed(0)
    model = _randomize_bns(factory())
    data = _batches(shape)
    context, report = prepare_fp32_model(model, data[0], ["bn_fold"], data, progress=False)
    assert report.steps[0].summary == {"folded_batch_norms": expected}
    assert batch_norms(context.model) == {}
    x = _batches(shape, count=1, seed=7)[0]
    with torch.no_grad():
        reference, folded = model(x), context.model(x)
    assert float((folded - reference).norm() / reference.norm()) <= 1e-5


def test_bn_fold_keeps_a_batchnorm_that_follows_no_layer():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    _randomize_bns(model)
    data = _batches((2, 3, 5, 5))
    context, report = prepare_fp32_model(model, data[0], ["bn_fold"], data, progress=False)
    assert report.steps[0].summary == {"folded_batch_norms": 1}
    assert list(batch_norms(context.model)) == ["0"]
    with torch.no_grad():
        torch.testing.assert_close(context.model(data[1]), model(data[1]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- re-estimation


def test_reestimation_recomputes_running_stats_from_the_data():
    torch.manual_seed(0)
    model = _randomize_bns(ConvBNNet())
    model.bn1.momentum = 0.3
    data = _batches((8, 3, 10, 10), count=5, scale=2.0, shift=0.5)
    affine_before = (model.bn1.weight.clone(), model.bn1.bias.clone())
    used = reestimate_bn_stats(model, data)
    assert used == 5
    with torch.no_grad():
        outputs = [model.conv1(x) for x in data]  # bn1's input; equal batch sizes
    batch_means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs])
    batch_vars = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outputs])
    torch.testing.assert_close(model.bn1.running_mean, batch_means.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var, batch_vars.mean(0), rtol=1e-4, atol=1e-5)
    assert int(model.bn1.num_batches_tracked) == 5
    # everything else as it was: eval mode, momentum, affine parameters
    assert not any(m.training for m in model.modules())
    assert model.bn1.momentum == 0.3
    assert torch.equal(model.bn1.weight, affine_before[0]) and torch.equal(model.bn1.bias, affine_before[1])


def test_reestimation_repairs_stale_statistics_after_a_weight_change():
    torch.manual_seed(0)
    model = ConvBNNet().eval()
    data = _batches((8, 3, 10, 10), count=4)
    reestimate_bn_stats(model, data)
    with torch.no_grad():
        model.conv1.weight.mul_(3.0)  # e.g. after compression: bn1's stored statistics are stale
        model.conv1.bias.add_(1.0)
        normalized = [model.bn1(model.conv1(x)) for x in data]
    stale_mean = torch.cat([n.mean(dim=(0, 2, 3)) for n in normalized]).abs().max()
    reestimate_bn_stats(model, data, num_batches=4)
    with torch.no_grad():
        normalized = torch.cat([model.bn1(model.conv1(x)) for x in data])
    # after re-estimation BN's output has mean beta (0 here) and std gamma (1 here) again
    assert float(stale_mean) > 0.5
    assert float(normalized.mean(dim=(0, 2, 3)).abs().max()) < 1e-3
    assert float((normalized.std(dim=(0, 2, 3)) - 1).abs().max()) < 0.02


def test_reestimation_uses_num_batches_and_refuses_empty_data():
    model = ConvBNNet().eval()
    data = _batches((4, 3, 10, 10), count=6)
    assert reestimate_bn_stats(model, data, num_batches=2) == 2
    assert int(model.bn1.num_batches_tracked) == 2
    with pytest.raises(ValueError, match="BN re-estimation data is empty"):
        reestimate_bn_stats(model, [])
    assert reestimate_bn_stats(nn.Sequential(nn.Linear(3, 2)), data) == 0


def test_bn_reestimation_step_with_fold():
    torch.manual_seed(0)
    model = _randomize_bns(ConvBNNet())
    data = _batches((8, 3, 10, 10), count=3)
    context, report = prepare_fp32_model(model, data[0], [{"name": "bn_reestimation", "fold": True}], data,
                                         progress=False)
    assert report.steps[0].summary == {"batch_norms": 3, "batches": 3, "folded_batch_norms": 3}
    reference = _randomize_bns(ConvBNNet())
    reference.load_state_dict(model.state_dict())
    reestimate_bn_stats(reference, data)
    with torch.no_grad():
        torch.testing.assert_close(context.model(data[0]), reference(data[0]), rtol=1e-4, atol=1e-5)
    # the caller's model keeps its statistics
    assert not torch.allclose(model.bn1.running_mean, reference.bn1.running_mean)


# ------------------------------------------------------------------------ BN output statistics


def test_collected_stats_are_beta_and_abs_gamma_of_each_folded_layer():
    model = _randomize_bns(ConvBNNet())
    stats = collect_bn_output_stats(trace(model))
    assert sorted(stats) == ["conv1", "conv2", "fc"]
    assert torch.equal(stats["conv1"].mean, model.bn1.bias)
    assert torch.equal(stats["conv2"].std, model.bn2.weight.abs())


@pytest.mark.parametrize("activation", [RELU, RELU6, Activation("clip", low=torch.tensor([0.0, -1.0, 0.5]),
                                                                  high=torch.tensor([1.0, 2.0, 4.0])),
                                        Activation("leaky_relu", slope=0.1)])
def test_expected_activation_matches_monte_carlo(activation):
    stats = ChannelGaussian(torch.tensor([0.5, -1.0, 3.0]), torch.tensor([1.0, 2.0, 0.5]))
    generator = torch.Generator().manual_seed(0)
    z = stats.mean[:, None] + stats.std[:, None] * torch.randn(3, 400_000, generator=generator)
    if activation.kind == "leaky_relu":
        sampled = torch.where(z > 0, z, 0.1 * z)
    else:
        low = activation.low if isinstance(activation.low, torch.Tensor) else torch.full((3,), activation.low)
        high = activation.high if isinstance(activation.high, torch.Tensor) else torch.full((3,), activation.high)
        sampled = torch.minimum(torch.maximum(z, low[:, None]), high[:, None])
    torch.testing.assert_close(expected_activation(stats, activation), sampled.mean(1), rtol=0, atol=0.01)


def test_clipped_normal_mean_with_zero_std_is_the_clipped_mean():
    result = clipped_normal_mean(torch.tensor([-2.0, 3.0, 9.0]), torch.zeros(3), 0.0, 6.0)
    assert result.tolist() == [0.0, 3.0, 6.0]
