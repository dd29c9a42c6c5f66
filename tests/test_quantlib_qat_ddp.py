"""Multi-process QAT: ``torchrun --nproc_per_node=2`` with gloo on the CPU matches one process.

The fast test trains the digits MLP (4-bit weights and activations, learned ranges, observers
for the first steps, distillation plus task loss) in two torchrun processes and in this process.
Each rank keeps its half of every batch and DDP averages the gradients, so the two runs take the
same steps up to float summation order: the accuracy must agree within 0.5 points and the
weights closely. The slow test does the same through ``quantzoo run digits_mlp/qat_w4a4`` and checks
that only rank 0 evaluates, exports and writes the run record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantlib.qat import TrainConfig, disable_range_learning, enable_range_learning, train
from quantlib.qat.data import training_loader
from quantlib.qat.distributed import DistContext

from test_quantlib_qat_fixtures import _trained_mlp, accuracy, digits, quantized

# SGD: Adam's normalised steps on the quantizer scales turn the float summation-order differences of
# the gradient all-reduce into code flips within a few steps (measured: 2% epoch-1 loss apart at
# quantizer_lr=1e-2), which would test chaos rather than DDP.
CONFIG = TrainConfig(epochs=3, optimizer="sgd", lr=0.05, momentum=0.9, quantizer_lr=1e-3, loss="both", temperature=2.0,
                     freeze_observers_after=2)
REPO = Path(__file__).resolve().parent.parent


def _train_once(checkpoint_dir: str | None = None) -> tuple[dict[str, torch.Tensor], float, dict]:
    """Train the quantized MLP as CONFIG says (one thread); returns (state, test top-1, report)."""
    torch.set_num_threads(1)
    teacher = _trained_mlp.__wrapped__(0.0, 32)
    sim = quantized(teacher, weight_bits=4, activation_bits=4)
    enable_range_learning(sim.model)
    train_set, _ = digits()
    report = train(sim.model, training_loader(train_set, 256, seed=0), CONFIG, teacher=teacher,
                   checkpoint_dir=checkpoint_dir, progress=False)
    disable_range_learning(sim.model)
    return {k: v.detach().clone() for k, v in sim.model.state_dict().items()}, accuracy(sim.model), report.to_dict()


def _torchrun(args: list[str], tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_shards_cover_every_sample_once_and_loss_weights_average_to_the_batch_mean():
    sizes = [len(range(100)[DistContext(rank=r, world_size=3).shard(100)]) for r in range(3)]
    assert sizes == [34, 33, 33]
    starts = [DistContext(rank=r, world_size=3).shard(100).start for r in range(3)]
    assert starts == [0, 34, 67]
    weights = [DistContext(rank=r, world_size=3).loss_weight(n, 100) for r, n in enumerate(sizes)]
    # DDP averages over 3 ranks: sum(w_r * mean_r) / 3 == sum(n_r * mean_r) / 100, the whole-batch mean
    assert sum(w / 3 * n for w, n in zip(weights, sizes)) == pytest.approx(sum(n * n / 100 for n in sizes))


def test_two_gloo_processes_match_one_process(tmp_path):
    result = _torchrun([str(Path(__file__).resolve()), str(tmp_path / "ddp.pt")], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    state, top1, report = _train_once()
    assert ddp["report"]["world_size"] == 2 and report["world_size"] == 1
    assert ddp["report"]["global_steps"] == report["global_steps"] == 18
    assert abs(ddp["top1"] - top1) <= 0.5, (ddp["top1"], top1)
    worst = max(float((ddp["state"][k].float() - v.float()).abs().max()) for k, v in state.items() if v.is_floating_point())
    for key, value in state.items():
        if value.is_floating_point():
            assert torch.allclose(ddp["state"][key], value, rtol=1e-3, atol=1e-4), (key, worst)
        else:
            assert torch.equal(ddp["state"][key], value), key
    for theirs, ours in zip(ddp["report"]["history"], report["history"]):
        assert theirs["samples"] == ours["samples"] == 1400
        assert theirs["loss"] == pytest.approx(ours["loss"], rel=1e-5)


def _quantzoo_script() -> str:
    """The installed ``quantzoo`` console script (torchrun runs a script, and ``zoo.cli`` has no ``__main__``)."""
    script = Path(sys.executable).with_name("quantzoo")
    assert script.exists(), f"{script} is missing; pip install -e . puts the quantzoo script next to {sys.executable}"
    return str(script)


@pytest.mark.slow
def test_quantzoo_run_under_torchrun_matches_a_single_process_run(tmp_path):
    """Two gloo processes through the CLI write one record whose accuracy is within 0.5 points of one process."""
    common = ["run", "digits_mlp/qat_w4a4", "hydra.run.dir=.", "evaluator.progress=false", "evaluator.onnxruntime=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    single = subprocess.run([_quantzoo_script(), *common, "results_dir=single", "artifacts_dir=single_art"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert single.returncode == 0, single.stderr[-3000:]
    result = _torchrun([_quantzoo_script(), *common, "results_dir=ddp", "artifacts_dir=ddp_art"], tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    (one,) = [json.loads(p.read_text()) for p in (tmp_path / "single" / "runs").glob("*.json")]
    records = sorted((tmp_path / "ddp" / "runs").glob("*.json"))
    assert len(records) == 1, f"rank 0 alone must write the record; got {[p.name for p in records]}"
    two = json.loads(records[0].read_text())
    exported = sorted(p.name for p in (tmp_path / "ddp_art").iterdir() if p.name != "qat")
    assert exported == [two["run_id"]], exported  # one set of ONNX/encodings/safetensors, rank 0's
    assert one["qat"]["world_size"] == 1 and two["qat"]["world_size"] == 2
    assert two["qat"]["global_steps"] == one["qat"]["global_steps"]
    assert abs(one["metrics"]["quantsim"]["top1"] - two["metrics"]["quantsim"]["top1"]) <= 0.5


if __name__ == "__main__":  # one torchrun worker of test_two_gloo_processes_match_one_process
    _state, _top1, _report = _train_once()
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"state": _state, "top1": _top1, "report": _report}, sys.argv[1])
