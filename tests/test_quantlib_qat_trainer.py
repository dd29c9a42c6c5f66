"""quantlib.qat.train: exact resume, losses, observers, BN modes, hooks, schedule and config errors."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from quantlib.qat import CheckpointError, TrainConfig, TrainConfigError, disable_range_learning, enable_range_learning, train
from quantlib.qat.checkpointing import checkpoint_path
from quantlib.qat.data import training_loader
from quantlib.qat.optim import lr_factor

from test_quantlib_qat_fixtures import _trained_mlp, accuracy, digits, quantized, trained_mlp

# Dropout, shuffling, learned ranges, observers for the first steps and a distilling loss: every
# piece of state a resumed run must restore.
RESUME_CONFIG = TrainConfig(epochs=3, optimizer="sgd", lr=0.05, momentum=0.9, quantizer_lr=0.01, loss="both",
                            distill_weight=0.5, temperature=2.0, freeze_observers_after=3, checkpoint_every_steps=2,
                            warmup_steps=2, weight_decay=1e-4)


class Interrupt(Exception):
    pass


def _qat_setup(cached: bool = True):
    teacher = trained_mlp(dropout=0.2) if cached else _trained_mlp.__wrapped__(0.2, 32)  # uncached: built on this thread count
    sim = quantized(teacher)
    enable_range_learning(sim.model)
    train_set, _ = digits()
    return sim, teacher, training_loader(train_set, 256, seed=1)  # 6 batches per epoch


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(tmp_path):
    sim, teacher, loader = _qat_setup()
    ptq = accuracy(sim.model)
    full = train(sim.model, loader, RESUME_CONFIG, teacher=teacher, checkpoint_dir=tmp_path / "full", progress=False)
    reference = _state(sim.model)
    assert full.global_steps == 18 and len(full.history) == 3 and not full.resumed

    sim, teacher, loader = _qat_setup()

    def stop(model, step):
        if step == 9:  # mid epoch 2; the last checkpoint is at step 8
            raise Interrupt

    with pytest.raises(Interrupt):
        train(sim.model, loader, RESUME_CONFIG, teacher=teacher, checkpoint_dir=tmp_path / "cut", step_hooks=[stop], progress=False)
    saved = torch.load(checkpoint_path(tmp_path / "cut"), weights_only=True)
    assert saved["global_step"] == 8 and saved["epoch"] == 1 and saved["batch_in_epoch"] == 2

    sim, teacher, loader = _qat_setup()  # a fresh process would rebuild the PTQ state like this
    steps: list[int] = []
    resumed = train(sim.model, loader, RESUME_CONFIG, teacher=teacher, checkpoint_dir=tmp_path / "cut", resume=True,
                    step_hooks=[lambda m, s: steps.append(s)], progress=False)
    assert resumed.resumed and resumed.resumed_from_step == 8 and steps == list(range(9, 19))
    state = _state(sim.model)
    assert state.keys() == reference.keys()
    for key in reference:
        assert torch.equal(state[key], reference[key]), key  # bit for bit on the CPU
    assert _without_seconds(resumed.history) == _without_seconds(full.history)
    disable_range_learning(sim.model)
    assert accuracy(sim.model) > ptq + 10.0


def test_resume_without_a_checkpoint_starts_over_and_a_finished_run_takes_no_step(tmp_path):
    sim, teacher, loader = _qat_setup()
    config = TrainConfig(epochs=1, lr=0.01, loss="task")
    report = train(sim.model, loader, config, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert not report.resumed and report.global_steps == 6
    again = train(sim.model, loader, config, checkpoint_dir=tmp_path, resume=True, progress=False,
                  step_hooks=[lambda m, s: pytest.fail("a finished run must not step again")])
    assert again.resumed and again.global_steps == 6 and again.history == report.history


def test_a_checkpoint_from_other_settings_or_a_corrupt_one_is_refused(tmp_path):
    sim, teacher, loader = _qat_setup()
    train(sim.model, loader, TrainConfig(epochs=1, lr=0.01), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"lr=0.02 .* lr=0.01"):
        train(sim.model, loader, TrainConfig(epochs=1, lr=0.02), checkpoint_dir=tmp_path, resume=True, progress=False)
    # checkpoint_every_steps does not change the result, so it may differ
    train(sim.model, loader, TrainConfig(epochs=1, lr=0.01, checkpoint_every_steps=5), checkpoint_dir=tmp_path,
          resume=True, progress=False)
    checkpoint_path(tmp_path).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable training checkpoint"):
        train(sim.model, loader, TrainConfig(epochs=1, lr=0.01), checkpoint_dir=tmp_path, resume=True, progress=False)


def test_a_killed_process_loses_only_the_steps_since_its_last_checkpoint(tmp_path):
    """SIGKILL a training process mid-run; resuming from its last checkpoint ends where an uninterrupted run ends."""
    script = Path(__file__).resolve()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent.parent), str(script.parent)]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "killed")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = checkpoint_path(tmp_path / "killed")
    step = 0
    deadline = time.monotonic() + 240
    try:
        while step < 5 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            if path.exists():
                step = torch.load(path, weights_only=True)["global_step"]
    finally:
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
    assert step >= 5, f"the training process never checkpointed step 5: {stderr.decode()[-2000:]}"
    saved = torch.load(path, weights_only=True)["global_step"]
    assert saved < 18, "the process finished before it was killed; nothing was tested"

    with torch.random.fork_rng():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the killed process ran on one thread: same float summation order
        try:
            sim, teacher, loader = _qat_setup(cached=False)
            resumed = train(sim.model, loader, _kill_config(), teacher=teacher, checkpoint_dir=tmp_path / "killed",
                            resume=True, progress=False)
            after_kill = _state(sim.model)
            sim, teacher, loader = _qat_setup(cached=False)
            full = train(sim.model, loader, _kill_config(), teacher=teacher, progress=False)
        finally:
            torch.set_num_threads(threads)
    assert resumed.resumed_from_step == saved and resumed.global_steps == full.global_steps == 18
    for key, value in _state(sim.model).items():  # same thread count and code: the same floats
        assert torch.equal(after_kill[key], value), key
    assert _without_seconds(resumed.history) == _without_seconds(full.history)


def _kill_config() -> TrainConfig:
    return TrainConfig(**{**RESUME_CONFIG.to_dict(), "checkpoint_every_steps": 1})


def test_distillation_trains_without_labels_and_task_loss_needs_them():
    sim, teacher, _ = _qat_setup()
    train_set, _ = digits()
    unlabelled = [train_set.tensors[0][i:i + 200] for i in range(0, 1400, 200)]
    ptq = accuracy(sim.model)
    report = train(sim.model, unlabelled, TrainConfig(epochs=3, optimizer="adam", lr=1e-3, quantizer_lr=1e-2,
                                                      loss="distill", temperature=2.0), teacher=teacher, progress=False)
    assert "top1" not in report.history[-1] and "task_loss" not in report.history[-1]
    assert report.history[-1]["teacher_agreement"] > report.history[0]["teacher_agreement"]
    assert report.history[-1]["distill_loss"] < report.history[0]["distill_loss"]
    assert accuracy(sim.model) > ptq + 10.0
    with pytest.raises(ValueError, match="loss=task needs labels"):
        train(sim.model, unlabelled, TrainConfig(epochs=1, loss="task"), progress=False)
    with pytest.raises(ValueError, match="loss=distill needs a teacher"):
        train(sim.model, unlabelled, TrainConfig(epochs=1, loss="distill"), progress=False)


def test_observers_follow_the_ranges_then_freeze():
    sim = quantized(trained_mlp())  # plain quantizers: only the observers move the encodings
    train_set, _ = digits()
    scales: list[dict[str, torch.Tensor]] = []

    def snapshot(model, step):
        scales.append({n: q.scale.detach().clone() for n, q in sim.quantizers().items()})

    train(sim.model, training_loader(train_set, 200, seed=0), TrainConfig(epochs=1, lr=0.05, freeze_observers_after=3),
          step_hooks=[snapshot], progress=False)
    changed = [any(not torch.equal(a[n], b[n]) for n in a) for a, b in zip(scales, scales[1:])]
    assert changed[:2] == [True, True]  # steps 2 and 3 still observe (weights and activations)
    assert not any(changed[2:])  # frozen from step 3 on
    frozen = quantized(trained_mlp())
    before = {n: q.scale.clone() for n, q in frozen.quantizers().items()}
    train(frozen.model, training_loader(train_set, 200, seed=0), TrainConfig(epochs=1, lr=0.05), progress=False)
    assert all(torch.equal(q.scale, before[n]) for n, q in frozen.quantizers().items())


def test_batch_norm_frozen_keeps_running_statistics_and_train_updates_them():
    torch.manual_seed(0)
    data = [(torch.randn(32, 8) * 3 + 1, torch.randint(0, 4, (32,))) for _ in range(4)]
    for mode, should_change in (("frozen", False), ("train", True)):
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
        mean = model[1].running_mean.clone()
        train(model, data, TrainConfig(epochs=1, lr=0.01, batch_norm=mode), progress=False)
        assert (not torch.equal(model[1].running_mean, mean)) == should_change, mode
        assert not model.training and not model[1].training  # modes restored


def test_fp32_fine_tuning_with_a_step_hook_keeping_zeros():
    model = trained_mlp()
    mask = model[0].weight.abs() > model[0].weight.abs().median()
    with torch.no_grad():
        model[0].weight.mul_(mask)
    steps = []

    def keep_sparsity(m, step):
        steps.append(step)
        with torch.no_grad():
            m[0].weight.mul_(mask)

    train_set, _ = digits()
    report = train(model, training_loader(train_set, 200, seed=0), TrainConfig(epochs=2, lr=0.05), step_hooks=[keep_sparsity],
                   progress=False)
    assert steps == list(range(1, 15)) and report.global_steps == 14
    assert int((model[0].weight == 0).sum()) == int((~mask).sum())
    assert report.history[-1]["loss"] < report.history[0]["loss"]


def test_lr_schedule():
    cosine = TrainConfig(lr=1.0, schedule="cosine", warmup_steps=4)
    assert [lr_factor(s, 24, cosine) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 24, cosine) == 1.0 and lr_factor(14, 24, cosine) == pytest.approx(0.5)
    assert lr_factor(24, 24, cosine) == pytest.approx(0.0, abs=1e-12)
    linear = TrainConfig(schedule="linear")
    assert lr_factor(5, 10, linear) == pytest.approx(0.5)
    assert lr_factor(7, 10, TrainConfig(schedule="constant")) == 1.0
    assert math.isclose(lr_factor(1, 3, TrainConfig()), 0.5 * (1 + math.cos(math.pi / 3)))


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs=0 must be"), ("optimizer", "lamb", "optimizer='lamb' is not supported; use one of sgd, adam, adamw"),
    ("loss", "mse", "loss='mse'"), ("distill_weight", 1.5, "distill_weight=1.5 must be in [0, 1]"),
    ("batch_norm", "fold", "batch_norm='fold'"), ("freeze_observers_after", -1, "freeze_observers_after=-1"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(TrainConfigError) as err:
        TrainConfig(**{field: value})
    assert message in str(err.value)
    with pytest.raises(TrainConfigError, match="unknown training setting 'epoch'"):
        TrainConfig.from_dict({"epoch": 3})


if __name__ == "__main__":  # the process test_a_killed_process... kills: train until killed, checkpointing every step
    torch.set_num_threads(1)
    _sim, _teacher, _loader = _qat_setup(cached=False)
    train(_sim.model, _loader, _kill_config(), teacher=_teacher, checkpoint_dir=sys.argv[1], progress=False,
          step_hooks=[lambda m, s: time.sleep(0.3)])
