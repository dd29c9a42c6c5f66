"""quantlib.observers: calibrated ranges on known data, batch combination rules, robustness."""

from __future__ import annotations

import pytest
import torch

from quantlib.affine import compute_qparams, fake_quantize
from quantlib.observers import (
    EntropyObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    build_observer,
)
from quantlib.quantizer import FakeQuantizer
from quantlib.spec import ObserverSpec, QuantizerSpec


def observer(name: str = "minmax", *, bitwidth: int = 8, symmetric: bool = False, granularity: str = "per_tensor",
             axis: int = 0, **observer_kwargs):
    spec = QuantizerSpec(bitwidth=bitwidth, symmetric=symmetric, signed=symmetric, granularity=granularity, axis=axis,
                         observer=ObserverSpec(name=name, **observer_kwargs))
    return build_observer(spec)


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch_with_range(lo: float, hi: float) -> torch.Tensor:
    """A batch whose min is ``lo`` and max is ``hi`` (values in between)."""
    return torch.tensor([[lo, 0.5 * (lo + hi), hi, 0.25 * lo + 0.75 * hi]])


def as_list(values: torch.Tensor) -> list[float]:
    return [round(v, 6) for v in values.reshape(-1).tolist()]


def test_build_observer_classes():
    assert type(observer("minmax")) is MinMaxObserver
    assert type(observer("moving_average_minmax")) is MovingAverageMinMaxObserver
    assert type(observer("percentile")) is PercentileObserver
    assert type(observer("entropy")) is EntropyObserver
    assert type(observer("mse")) is MSEObserver


def test_no_data_raises():
    with pytest.raises(RuntimeError, match="observer has seen no data"):
        observer("minmax").compute_range()
    with pytest.raises(RuntimeError, match="observer has seen no data"):
        observer("minmax", combine="mean").compute_range()


def test_minmax_known_tensor_and_input_not_mutated():
    x = torch.tensor([[0.5, -2.0, 3.25], [1.0, 0.0, -0.75]])
    before = x.clone()
    obs = observer("minmax")
    obs.update(x)
    lo, hi = obs.compute_range()
    assert as_list(lo) == [-2.0] and as_list(hi) == [3.25]
    assert torch.equal(x, before)
    assert obs.num_batches == 1


def test_minmax_per_channel():
    obs = observer("minmax", granularity="per_channel", axis=1)
    x = torch.tensor([[0.5, -2.0, 3.25], [1.0, 0.0, -0.75]])
    obs.update(x)
    lo, hi = obs.compute_range()
    # columns: [0.5, 1.0], [-2.0, 0.0], [3.25, -0.75]
    assert as_list(lo) == [0.5, -2.0, -0.75]
    assert as_list(hi) == [1.0, 0.0, 3.25]


# Five batches with hand-picked ranges (min, max):
BATCH_RANGES = [(-1.0, 1.0), (-1.1, 1.1), (-0.9, 1.05), (-2.0, 5.0), (-1.0, 0.95)]


@pytest.mark.parametrize(
    "combine, expected",
    [
        # max: the union of the ranges -> [-2.0, 5.0]
        ("max", (-2.0, 5.0)),
        # mean: mins sum to -6.0 -> -1.2; maxs sum to 9.1 -> 1.82
        ("mean", (-1.2, 1.82)),
        # median: sorted mins [-2, -1.1, -1, -1, -0.9] -> -1.0; sorted maxs [0.95, 1, 1.05, 1.1, 5] -> 1.05
        ("median", (-1.0, 1.05)),
        # mode: ceil(sqrt(5)) = 3 bins.
        #   mins span [-2, -0.9], width 0.3667: -2 -> bin 0; -1.1, -1, -1, -0.9 -> bin 2 -> mean -1.0
        #   maxs span [0.95, 5], width 1.35: 1, 1.1, 1.05, 0.95 -> bin 0; 5 -> bin 2 -> mean 4.1/4 = 1.025
        ("mode", (-1.0, 1.025)),
    ],
)
def test_combine_rules_across_batches(combine, expected):
    obs = observer("minmax", combine=combine)
    for lo, hi in BATCH_RANGES:
        obs.update(batch_with_range(lo, hi))
    lo, hi = obs.compute_range()
    assert lo.item() == pytest.approx(expected[0], abs=1e-6)
    assert hi.item() == pytest.approx(expected[1], abs=1e-6)
    assert obs.num_batches == 5


def test_combine_mean_per_channel():
    obs = observer("minmax", granularity="per_channel", combine="mean")
    obs.update(torch.tensor([[-1.0, 2.0], [0.0, 4.0]]))  # channel ranges [-1, 2], [0, 4]
    obs.update(torch.tensor([[-3.0, 0.0], [-2.0, 8.0]]))  # channel ranges [-3, 0], [-2, 8]
    lo, hi = obs.compute_range()
    # channel 0: mean(-1, -3) = -2, mean(2, 0) = 1; channel 1: mean(0, -2) = -1, mean(4, 8) = 6
    assert as_list(lo) == [-2.0, -1.0] and as_list(hi) == [1.0, 6.0]


def test_reset_forgets_history():
    obs = observer("minmax", combine="mean")
    obs.update(batch_with_range(-5.0, 5.0))
    obs.reset()
    obs.update(batch_with_range(-1.0, 2.0))
    lo, hi = obs.compute_range()
    assert (lo.item(), hi.item()) == (-1.0, 2.0)
    assert obs.num_batches == 1


def test_moving_average_with_momentum():
    obs = observer("moving_average_minmax", momentum=0.9, combine="median")  # combine is ignored
    obs.update(batch_with_range(-1.0, 1.0))
    assert as_list(torch.cat(obs.compute_range())) == [-1.0, 1.0]  # first batch taken as is
    obs.update(batch_with_range(-3.0, 5.0))
    # min: 0.9 * -1 + 0.1 * -3 = -1.2;  max: 0.9 * 1 + 0.1 * 5 = 1.4
    lo, hi = obs.compute_range()
    assert lo.item() == pytest.approx(-1.2, abs=1e-6) and hi.item() == pytest.approx(1.4, abs=1e-6)
    obs.update(batch_with_range(-1.0, 1.0))
    # min: 0.9 * -1.2 + 0.1 * -1 = -1.18;  max: 0.9 * 1.4 + 0.1 * 1 = 1.36
    lo, hi = obs.compute_range()
    assert lo.item() == pytest.approx(-1.18, abs=1e-6) and hi.item() == pytest.approx(1.36, abs=1e-6)
    assert obs.num_batches == 3


def test_moving_average_momentum_zero_tracks_the_last_batch():
    obs = observer("moving_average_minmax", momentum=0.0)
    for lo, hi in BATCH_RANGES:
        obs.update(batch_with_range(lo, hi))
    lo, hi = obs.compute_range()
    assert (round(lo.item(), 6), round(hi.item(), 6)) == (-1.0, 0.95)


def test_percentile_of_a_uniform_ramp():
    obs = observer("percentile", percentile=99.9)
    obs.update(torch.arange(10001, dtype=torch.float32))
    lo, hi = obs.compute_range()
    # 99.9% of the 10000 gaps above 0 -> 9990; the lower percentile (0.1%) -> 10
    assert hi.item() == 9990.0
    assert lo.item() == 10.0


def test_percentile_100_is_minmax_and_99_99_default():
    ramp = torch.arange(10001, dtype=torch.float32) - 5000.0  # -5000..5000
    obs = observer("percentile", percentile=100.0)
    obs.update(ramp)
    assert as_list(torch.cat(obs.compute_range())) == [-5000.0, 5000.0]
    obs = observer("percentile")  # 99.99 -> the 9999th of 10000 gaps
    obs.update(ramp)
    assert as_list(torch.cat(obs.compute_range())) == [-4999.0, 4999.0]


def test_percentile_per_channel():
    obs = observer("percentile", percentile=90.0, granularity="per_channel")
    rows = torch.stack([torch.arange(11.0), 10.0 * torch.arange(11.0)])  # 0..10 and 0..100
    obs.update(rows)
    lo, hi = obs.compute_range()
    # 90% of 10 gaps -> index 9: 9 and 90; lower: index 1: 1 and 10
    assert as_list(lo) == [1.0, 10.0] and as_list(hi) == [9.0, 90.0]


def gaussian_with_outliers(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, generator=rng(seed))
    x[:4] = torch.tensor([40.0, -35.0, 50.0, -45.0])  # 4 huge outliers, sigma is 1
    return x


def test_entropy_clips_outliers_but_keeps_the_gaussian_body():
    obs = observer("entropy")
    obs.update(gaussian_with_outliers(20000))
    lo, hi = obs.compute_range()
    # the max is 50 (outlier); the KL-optimal threshold lies well below it but above 3 sigma
    assert 3.0 < hi.item() < 10.0
    assert -10.0 < lo.item() < -3.0
    # signed data: symmetric threshold on |x|
    assert lo.item() == pytest.approx(-hi.item())


def test_entropy_non_negative_data_thresholds_on_zero_to_max():
    x = gaussian_with_outliers(20000).clamp_min(0)  # like a ReLU output
    obs = observer("entropy")
    obs.update(x)
    lo, hi = obs.compute_range()
    assert lo.item() == 0.0
    assert 3.0 < hi.item() < 10.0


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_exact_search_clips_below_the_max(symmetric):
    obs = observer("mse", symmetric=symmetric)
    x = gaussian_with_outliers(20000)
    obs.update(x)
    lo, hi = obs.compute_range()
    # candidates are alpha * (min, max) = alpha * (-45, 50), alpha in {0.01, 0.02, ..., 1}
    alpha = hi.item() / 50.0
    assert lo.item() == pytest.approx(-45.0 * alpha, rel=1e-5)
    assert round(alpha * 100) == pytest.approx(alpha * 100, abs=1e-3)
    assert 3.0 < hi.item() < 50.0
    # the chosen range really has a lower quantization MSE than the full min/max range
    spec = obs.spec

    def mse(lo_, hi_):
        s, z = compute_qparams(lo_.reshape(1), hi_.reshape(1), spec)
        return (fake_quantize(x, s, z, spec) - x).pow(2).mean().item()

    assert mse(lo, hi) < mse(torch.tensor(-45.0), torch.tensor(50.0))


def test_mse_histogram_search_on_a_large_tensor_clips_below_the_max():
    # more than 2**18 elements: the histogram path is used
    x = torch.randn(300_000, generator=rng(1))
    x[:3] = torch.tensor([40.0, -40.0, 60.0])
    obs = observer("mse")
    obs.update(x)
    lo, hi = obs.compute_range()
    assert 3.0 < hi.item() < 60.0
    assert -40.0 < lo.item() < -3.0


def test_mse_per_channel_weights_get_per_channel_ranges():
    sigmas = torch.tensor([0.1, 1.0, 3.0, 10.0])
    w = torch.randn(4, 64, 3, 3, generator=rng(2)) * sigmas.reshape(4, 1, 1, 1)
    obs = observer("mse", bitwidth=4, symmetric=True, granularity="per_channel")
    obs.update(w)
    lo, hi = obs.compute_range()
    assert lo.shape == (4,) and hi.shape == (4,)
    absmax = w.reshape(4, -1).abs().amax(dim=1)
    # every channel is clipped below its own max, at a 4-bit MSE optimum of roughly 2-3 sigma
    assert (hi < absmax).all() and (-lo < absmax).all()
    ratio = torch.maximum(-lo, hi) / sigmas
    assert ((ratio > 1.5) & (ratio < 3.5)).all(), ratio
    # so the ranges scale with the channel's sigma (a per-tensor range would be ~ 25 for all)
    assert (hi[1:] > hi[:-1]).all()
    assert (torch.maximum(-lo, hi)[3] / torch.maximum(-lo, hi)[0]).item() == pytest.approx(100.0, rel=0.4)


@pytest.mark.parametrize("name", ["minmax", "moving_average_minmax", "percentile", "entropy", "mse"])
@pytest.mark.parametrize("value", [0.0, 2.0, -3.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_constant_tensor_gives_a_positive_scale(name, value, symmetric):
    # (300 histogram bins keep the entropy search short: 45 candidate thresholds instead of 128)
    spec = QuantizerSpec(symmetric=symmetric, signed=symmetric, observer=ObserverSpec(name=name, num_bins=300))
    q = FakeQuantizer(spec, name="const")
    q.calibrating = True
    x = torch.full((4, 50), value)
    q(x)
    q.calibrating = False
    q.compute_encoding()
    assert q.scale.numel() == 1 and q.scale.item() > 0 and torch.isfinite(q.scale).all()
    out = q(x)
    assert torch.isfinite(out).all()
    # the constant is reproduced to within half a step (0 exactly)
    assert (out - x).abs().max().item() <= q.scale.item() / 2 + 1e-6
    if value == 0.0:
        assert q.scale.item() == pytest.approx(1e-8, rel=1e-6)
        assert torch.equal(out, x)


def test_fake_quantizer_calibration_then_quantization():
    q = FakeQuantizer(QuantizerSpec(), name="act")
    x = torch.linspace(-1.0, 3.0, 101)
    q.calibrating = True
    assert torch.equal(q(x), x)  # calibrating: pass through and observe
    q.calibrating = False
    q.compute_encoding()
    # [-1, 3]: scale 4/255, zero point 64 (see test_quantlib_affine)
    assert q.scale.item() == pytest.approx(4 / 255, rel=1e-6) and q.zero_point.tolist() == [64]
    assert q.version == 1
    out = q(x)
    assert (out - x).abs().max().item() <= 2 / 255 + 1e-6
    record = q.encoding()[0]
    # AIMET fields: offset = -zero_point; min/max of the grid = (0 - 64) * s, (255 - 64) * s
    assert record["offset"] == -64 and record["bitwidth"] == 8 and record["is_symmetric"] == "False"
    assert record["min"] == pytest.approx(-64 * 4 / 255, rel=1e-6)
    assert record["max"] == pytest.approx(191 * 4 / 255, rel=1e-6)
