"""Sparsity masks (magnitude, 2:4, channel), the polynomial schedule, and 2:4 surviving fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quantlib.compress.pipeline import CompressContext, compress_model
from quantlib.compress.schedule import GradualPruningHook, PolynomialDecay
from quantlib.compress.sparsity import channel_mask, magnitude_mask, n_m_mask, sparsify
from quantlib.qat import TrainConfig, train


def _groups_of_four_nonzeros(weight: torch.Tensor) -> torch.Tensor:
    """Non-zeros in every group of 4 consecutive input channels (last partial group included)."""
    w = weight.detach().movedim(1, -1)
    pad = (-w.shape[-1]) % 4
    w = torch.cat([w, w.new_zeros(*w.shape[:-1], pad)], -1)
    return (w.reshape(*w.shape[:-1], -1, 4) != 0).sum(-1)


def test_magnitude_mask_hits_the_exact_sparsity_and_drops_the_smallest():
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3)
    keep = magnitude_mask(w, 0.7)
    assert int((~keep).sum()) == round(0.7 * w.numel())
    assert w[~keep].abs().max() <= w[keep].abs().min()


def test_two_four_mask_keeps_the_two_largest_of_every_four_input_channels():
    torch.manual_seed(0)
    w = torch.randn(8, 10, 3, 3)  # 10 input channels: two full groups and one of 2
    keep = n_m_mask(w, 2, 4)
    counts = _groups_of_four_nonzeros(w * keep)
    assert counts[..., :2].eq(2).all() and counts[..., 2].eq(2).all()
    group = w[0, 0:4, 1, 1].abs()
    assert set(torch.nonzero(keep[0, 0:4, 1, 1]).flatten().tolist()) == set(group.topk(2).indices.tolist())


def test_channel_mask_zeroes_whole_low_norm_output_channels():
    w = torch.arange(1.0, 9.0).repeat_interleave(6).reshape(8, 6)
    keep = channel_mask(w, 0.25)
    assert keep.all(1).tolist() == [False, False] + [True] * 6


def test_polynomial_schedule_matches_tfmot_formula():
    schedule = PolynomialDecay(0.0, 0.8, begin_step=10, end_step=110, power=3, frequency=10)
    assert schedule.sparsity(0) == 0.0 and schedule.sparsity(10) == 0.0 and schedule.sparsity(500) == 0.8
    assert schedule.sparsity(60) == pytest.approx(0.8 + (0.0 - 0.8) * 0.5 ** 3)
    values = [schedule.sparsity(s) for s in range(0, 120, 5)]
    assert values == sorted(values)
    assert schedule.updates_at(20) and not schedule.updates_at(25) and schedule.updates_at(110) and not schedule.updates_at(120)


def _mlp_data(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(256, 16)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32), x


def test_gradual_pruning_hook_reaches_the_final_sparsity_during_training():
    data, _ = _mlp_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    hook = GradualPruningHook(model, PolynomialDecay(0.0, 0.75, begin_step=0, end_step=12, frequency=4))
    train(model, data, TrainConfig(epochs=2, lr=0.05), step_hooks=[hook], progress=False)
    assert [step for step, _ in hook.history] == [4, 8, 12]
    for layer in (model[0], model[2]):
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.75, abs=1 / layer.weight.numel())


def test_two_four_sparsity_survives_the_pass_and_fine_tuning():
    data, x = _mlp_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    ctx = CompressContext(example_input=x[:1], train_data=data, train_config=TrainConfig(epochs=2, lr=0.05),
                          sensitivity=False, progress=False)
    one_shot = compress_model(model, [{"method": "n_m_sparsity"}], ctx).model
    tuned = compress_model(model, [{"method": "n_m_sparsity", "finetune": True}], ctx)
    for name in ("0", "2"):
        before = one_shot.get_submodule(name).weight
        after = tuned.model.get_submodule(name).weight
        assert _groups_of_four_nonzeros(before).max() == 2 and _groups_of_four_nonzeros(after).max() == 2
        assert float((after == 0).float().mean()) == 0.5
        assert not torch.equal(before, after)  # fine-tuning moved the kept weights
    assert tuned.structure == ("sparsity",) and "finetune" in tuned.steps[0]


def test_sparsify_only_touches_matching_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    reached = sparsify(model, "magnitude", sparsity=0.5, exclude=("2",))
    assert reached == {"0": 0.5} and bool((model[2].weight != 0).all())


def test_distilling_fine_tuning_follows_the_uncompressed_model():
    data, x = _mlp_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    config = TrainConfig(epochs=1, lr=0.05, loss="distill", temperature=2.0)
    ctx = CompressContext(example_input=x[:1], train_data=data, train_config=config, sensitivity=False, progress=False)
    result = compress_model(model, [{"method": "magnitude_sparsity", "sparsity": 0.75, "finetune": True}], ctx)
    history = result.steps[0]["finetune"]["history"]
    assert history[0]["distill_loss"] > 0 and 0 <= history[0]["teacher_agreement"] <= 100
    assert float((result.model.get_submodule("0").weight == 0).float().mean()) == 0.75
