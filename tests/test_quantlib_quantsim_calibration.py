"""quantlib.quantsim calibration and simulated numerics: calibration data handling, W8A8 accuracy
against FP32, and agreement of the simulation with integer kernels (exact weight division, int32 bias).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quantlib.affine import quantize
from quantlib.checkpoint import load_quantized_state_dict, quantized_state_dict
from quantlib.config import load_config
from quantlib.quantizer import FakeQuantizer, QuantizerNotCalibratedError
from quantlib.quantsim import QuantSim

from quantlib_models import Conv1dNet, DepthwiseNet, FunctionalNet, TransposedNet
from quantlib_quantsim_helpers import IMG, ResBlockNet, build, randn, rel_error


# ----------------------------------------------------------------------------- calibration


def test_quantizer_used_before_calibration_raises():
    sim = QuantSim(build(ResBlockNet), randn(*IMG))
    with pytest.raises(QuantizerNotCalibratedError, match="quantizer x has no encoding; run QuantSim.calibrate"):
        sim.model(randn(*IMG))
    with pytest.raises(QuantizerNotCalibratedError, match="<unnamed>"):
        FakeQuantizer(load_config("per_channel").activation)(torch.ones(3))


def test_calibrate_with_tqdm_accepts_x_y_tuples():
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 3, 8, 8, generator=gen), torch.randint(0, 3, (12,), generator=gen))
    loader = DataLoader(data, batch_size=4)
    sim = QuantSim(build(ResBlockNet), randn(*IMG))
    assert sim.calibrate(loader, progress=True) == 3
    assert all(q.has_encoding and not q.calibrating for q in sim.activation_quantizers().values())
    # the input range is the union of the 12 images' range
    x_all = data.tensors[0]
    lo, hi = sim.activation_quantizers()["x"].representable_range()
    assert lo.item() == pytest.approx(x_all.min().item(), abs=0.02)
    assert hi.item() == pytest.approx(x_all.max().item(), abs=0.02)
    # num_batches limits the pass; lists of (x, y) tuples work too
    pairs = [(x, y) for x, y in loader]
    assert sim.calibrate(pairs, num_batches=2, progress=False) == 2
    with pytest.raises(ValueError, match="calibration data is empty"):
        sim.calibrate([], progress=False)


def test_w8a8_output_close_to_fp32():
    model = build(ResBlockNet)
    data = [randn(8, 3, 8, 8, seed=s) for s in range(4)]
    sim = QuantSim(model, data[0])
    sim.calibrate(data, progress=False)
    with torch.no_grad():
        for x in data:
            assert rel_error(sim.model(x), model(x)) < 0.05
    # and quantization does change the numbers
    with torch.no_grad():
        assert not torch.equal(sim.model(data[0]), model(data[0]))


@pytest.mark.parametrize("cls, shape", [(FunctionalNet, (4, 3, 4, 4)), (DepthwiseNet, (4, 3, 6, 6)),
                                        (TransposedNet, (4, 3, 8, 8)), (Conv1dNet, (4, 3, 10))])
def test_w8a8_close_to_fp32_on_other_models(cls, shape):
    model = build(cls)
    data = [randn(*shape, seed=s) for s in range(3)]
    sim = QuantSim(model, data[0])
    sim.calibrate(data, progress=False)
    with torch.no_grad():
        assert rel_error(sim.model(data[1]), model(data[1])) < 0.05


# --------------------------------------------------------------- simulation vs integer kernels

NEAR_TIE = 0.04330708459019661  # with scale 1/127: x / s and x * (1 / s) round to different codes (6 vs 5)


def test_weights_use_exact_division_so_checkpoint_and_simulation_agree():
    model = nn.Sequential(nn.Linear(2, 1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, NEAR_TIE]]))
    x = torch.tensor([[0.0, 1.0], [1.0, 0.5]])
    for config in ("per_tensor", "per_channel"):
        sim = QuantSim(model, x, config)
        sim.calibrate([x], progress=False)
        module = sim.weight_modules()["0"]
        wq = module.weight_quantizer
        assert wq.exact
        # absmax 1 -> scale 1/127; 0.0433070846 / (1/127) = 5.49999... / 5.5 -> the ONNX division gives code 6
        assert wq.scale.item() == pytest.approx(1 / 127, rel=1e-7)
        with torch.no_grad():
            codes = (module.quantized_weight() / wq.scale.reshape(-1, 1)).round()
        stored = quantize(module.weight.detach(), wq.scale, wq.zero_point, wq.spec)
        assert codes.tolist() == [[127.0, 6.0]] and stored.tolist() == [[127, 6]]
        tensors, metadata = quantized_state_dict(sim)
        fresh = QuantSim(model, x, config)
        load_quantized_state_dict(fresh, tensors, metadata)
        with torch.no_grad():
            assert torch.equal(fresh.model(x), sim.model(x))


class SingleLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x):
        return self.fc(x)


def test_simulated_bias_is_rounded_to_the_int32_grid():
    model = SingleLinear().eval()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[0.7, -0.3]]))
        model.fc.bias.fill_(0.0123)
    x = torch.tensor([[0.0, 2.55], [1.0, 2.0]])
    # W4A8 (symmetric per-channel int4 weights, asymmetric uint8 activations), output not quantized
    sim = QuantSim(model, x, {"defaults": {"weight": {"bitwidth": 4}}, "model_output": {"enabled": False}})
    sim.calibrate([x], progress=False)
    # input [0, 2.55] asymmetric uint8: scale 0.01, zero point 0 -> x is on the grid
    assert sim.activation_quantizers()["x"].scale.item() == pytest.approx(0.01, rel=1e-6)
    # weight int4 symmetric: absmax 0.7 / 7 = 0.1 -> codes [7, -3]; bias scale 0.01 * 0.1 = 0.001
    # int32 bias code round(0.0123 / 0.001) = 12 -> 0.012
    # row 1: 1.0 * 0.7 + 2.0 * -0.3 + 0.012 = 0.112 (the float bias gives 0.1123)
    with torch.no_grad():
        out = sim.model(x)
    assert out[1, 0].item() == pytest.approx(0.112, abs=1e-6)
