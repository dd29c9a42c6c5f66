"""The training loop shared by QAT and FP32 fine-tuning: :func:`train`.

It trains any ``nn.Module`` in place: a QuantSim's ``sim.model`` (quantization-aware training:
the fake quantizers' straight-through estimator carries gradients through rounding, see
:func:`quantlib.affine.fake_quantize`) or a plain FP32 model (fine-tuning after pruning or
clustering, with ``step_hooks`` re-applying the structure after every step).

Per optimizer step: seed the RNG from (seed, step, rank) -> forward this rank's slice of the
batch (observers may update encodings, :mod:`quantlib.qat.observe`) -> teacher forward when the
loss distils -> loss (:mod:`quantlib.qat.losses`) -> backward (DDP averages gradients across
ranks, :mod:`quantlib.qat.distributed`) -> optional gradient clipping -> optimizer and LR
scheduler step (:mod:`quantlib.qat.optim`) -> weight re-calibration while observing -> every
``step_hooks`` entry as ``hook(model, global_step)`` -> checkpoint every N steps if configured.
At each epoch end: metrics reduced across ranks, appended to the history (and to ``metrics_log``),
and a checkpoint written (:mod:`quantlib.qat.checkpointing`).

Exact resume: all state a step depends on is in the checkpoint, and the RNG of step ``k`` is a
function of (seed, k, rank), so a run interrupted after a checkpoint and resumed takes the same
steps as an uninterrupted one; on the CPU the final weights and metrics agree bit for bit (the
tests assert it). The data order must be a function of the epoch: ``data`` (or its sampler) may
define ``set_epoch(epoch)``, which is called at the start of every epoch
(:class:`quantlib.qat.data.EpochShuffleSampler` does this).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import atomic_write_text
from ..quantizer import FakeQuantizer
from .checkpointing import checkpoint_path, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import DistContext, init_distributed, training_device
from .losses import training_loss
from .observe import ObserverTracker
from .optim import build_optimizer, build_scheduler

StepHook = Callable[[nn.Module, int], None]
# Per-step sums reduced across ranks: loss*n, task*n, distill*n, correct, agreeing, n, labelled n.
_SUMS = ("loss", "task", "distill", "correct", "agree", "samples", "labelled")


@dataclass(frozen=True)
class TrainReport:
    """What :func:`train` did.

    Attributes:
        history: one dict per finished epoch: ``epoch`` (1-based), ``loss`` (sample mean),
            ``task_loss``/``distill_loss`` (when used), ``top1`` (training-batch accuracy in %,
            when labelled), ``teacher_agreement`` (% of samples whose argmax matches the
            teacher's, when a teacher is used), ``lr`` (at the epoch's end), ``steps`` (global
            step at the end), ``samples``, ``seconds``.
        global_steps: optimizer steps taken in total (resumed runs included).
        seconds: training seconds in total (previous processes of a resumed run included).
        seconds_this_process: training seconds spent by this call.
        resumed: True when training continued from a checkpoint.
        resumed_from_step: the checkpoint's global step (None when not resumed).
        checkpoint: the checkpoint file (None without ``checkpoint_dir``).
        world_size: processes that trained together (1 without torchrun).
        config: the TrainConfig as a dict.
    """

    history: tuple[dict[str, Any], ...]
    global_steps: int
    seconds: float
    seconds_this_process: float
    resumed: bool
    resumed_from_step: int | None
    checkpoint: str | None
    world_size: int
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for run records)."""
        return {"epochs": len(self.history), "history": list(self.history), "global_steps": self.global_steps,
                "seconds": self.seconds, "seconds_this_process": self.seconds_this_process, "resumed": self.resumed,
                "resumed_from_step": self.resumed_from_step, "checkpoint": self.checkpoint,
                "world_size": self.world_size, "config": self.config}


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, labels or None) of a batch given as a tensor, ``(inputs,)`` or ``(inputs, labels, ...)``."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _set_epoch(data: Any, epoch: int) -> None:
    for owner in (data, getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        if owner is not None and hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
            return


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)


def _invalidate_quantizer_caches(model: nn.Module) -> None:
    """Bump every quantizer's version so cached quantized weights and biases are rebuilt after a load."""
    for module in model.modules():
        if isinstance(module, FakeQuantizer):
            module.version += 1


def _set_training_modes(model: nn.Module, batch_norm: str) -> dict[nn.Module, bool]:
    modes = {m: m.training for m in model.modules()}
    model.train()
    if batch_norm == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return modes


class _Trainer:
    """State of one :func:`train` call; see the module docstring for the step order."""

    def __init__(self, model: nn.Module, data: Iterable, config: TrainConfig, teacher: nn.Module | None,
                 checkpoint_dir: Path | None, step_hooks: Sequence[StepHook], progress: bool,
                 device: torch.device, dist: DistContext, metrics_log: Path | None) -> None:
        self.model, self.data, self.config, self.teacher = model, data, config, teacher
        self.checkpoint_dir, self.step_hooks, self.progress = checkpoint_dir, tuple(step_hooks), progress
        self.device, self.dist, self.metrics_log = device, dist, metrics_log
        if not hasattr(data, "__len__"):
            raise ValueError("train(data=...) needs a sized iterable (a DataLoader or a list of batches) to plan the LR schedule")
        self.batches_per_epoch = len(data)
        if self.batches_per_epoch == 0:
            raise ValueError("train(data=...) is empty; give at least one batch")
        self.total_steps = config.epochs * self.batches_per_epoch
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.tracker = ObserverTracker(model, config.freeze_observers_after, config.observer_momentum, dist)
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        self.history: list[dict[str, Any]] = []
        self.seconds_before = 0.0
        self.epoch_seconds_before = 0.0
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None
        self.ddp: nn.Module = model

    # -- checkpoints ---------------------------------------------------------------------------
    def restore(self) -> None:
        state = load_checkpoint(self.checkpoint_dir, self.config) if self.checkpoint_dir else None
        if state is None:
            return
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise RuntimeError(f"the checkpoint in {self.checkpoint_dir} does not fit this model ({err}); "
                               "delete it or set resume=false") from None
        _invalidate_quantizer_caches(self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.tracker.load_state_dict(state["tracker"])
        self.global_step, self.epoch, self.batch_in_epoch = state["global_step"], state["epoch"], state["batch_in_epoch"]
        self.sums = state["sums"].clone()
        self.history = list(state["history"])
        self.seconds_before, self.epoch_seconds_before = state["seconds"], state["epoch_seconds"]
        self.resumed_from = self.global_step
        self.last_checkpoint = checkpoint_path(self.checkpoint_dir)

    def save(self, seconds: float, epoch_seconds: float) -> None:
        if self.checkpoint_dir is None:
            return
        if self.dist.is_primary:
            state = {
                "config": self.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "tracker": self.tracker.state_dict(), "global_step": self.global_step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "sums": self.sums.clone(), "history": self.history,
                "seconds": seconds, "epoch_seconds": epoch_seconds, "world_size": self.dist.world_size,
            }
            self.last_checkpoint = save_checkpoint(self.checkpoint_dir, state)
        else:
            self.last_checkpoint = checkpoint_path(self.checkpoint_dir)
        self.dist.barrier()

    # -- one step ------------------------------------------------------------------------------
    def step(self, batch: Any) -> None:
        config, dist = self.config, self.dist
        inputs, labels = split_batch(batch)
        size = inputs.shape[0]
        if size < dist.world_size:
            raise ValueError(f"a batch of {size} samples cannot be split over {dist.world_size} processes; "
                             "use a batch size of at least --nproc_per_node")
        shard = dist.shard(size)
        inputs = inputs[shard].to(self.device)
        labels = labels[shard].to(self.device) if labels is not None else None
        torch.manual_seed(_step_seed(config.seed, self.global_step, dist.rank))
        logits = self.ddp(inputs)
        teacher_logits = None
        if config.uses_teacher:
            with torch.no_grad():
                teacher_logits = self.teacher(inputs)
        loss, parts = training_loss(logits, labels, teacher_logits, config)
        n = inputs.shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        (loss * dist.loss_weight(n, size) if dist.enabled else loss).backward()
        if config.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        self.tracker.after_step(self.global_step)
        for hook in self.step_hooks:
            hook(self.model, self.global_step)
        with torch.no_grad():
            predicted = logits.detach().argmax(-1)
            correct = float((predicted == labels).sum()) if labels is not None else 0.0
            agree = float((predicted == teacher_logits.argmax(-1)).sum()) if teacher_logits is not None else 0.0
        step_sums = torch.tensor([float(loss.detach()) * n, parts.get("task", 0.0) * n, parts.get("distill", 0.0) * n,
                                  correct, agree, n, n if labels is not None else 0], dtype=torch.float64)
        self.sums += dist.all_reduce(step_sums.to(self._reduce_device)).cpu()

    @property
    def _reduce_device(self) -> torch.device:
        return self.device if self.dist.backend == "nccl" else torch.device("cpu")

    def epoch_metrics(self, seconds: float) -> dict[str, Any]:
        s = dict(zip(_SUMS, self.sums.tolist()))
        n = max(s["samples"], 1.0)
        metrics: dict[str, Any] = {"epoch": self.epoch + 1, "loss": s["loss"] / n}
        if self.config.uses_labels:
            metrics["task_loss"] = s["task"] / n
        if self.config.uses_teacher:
            metrics["distill_loss"] = s["distill"] / n
            metrics["teacher_agreement"] = 100.0 * s["agree"] / n
        if s["labelled"]:
            metrics["top1"] = 100.0 * s["correct"] / s["labelled"]
        metrics.update(lr=self.scheduler.get_last_lr()[0], steps=self.global_step, samples=int(s["samples"]),
                       seconds=round(seconds, 3))
        return metrics

    def write_log(self) -> None:
        if self.metrics_log is not None and self.dist.is_primary:
            atomic_write_text(self.metrics_log, "".join(json.dumps(row, sort_keys=True) + "\n" for row in self.history))

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainReport:
        config = self.config
        start = time.perf_counter()
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids, broadcast_buffers=False)
        self.tracker.attach(self.global_step)
        modes = _set_training_modes(self.model, config.batch_norm)
        if self.teacher is not None:
            self.teacher.eval()
        try:
            while self.epoch < config.epochs:
                epoch_start = time.perf_counter() - self.epoch_seconds_before
                _set_epoch(self.data, self.epoch)
                skip = self.batch_in_epoch
                bar = tqdm(total=self.batches_per_epoch, initial=skip, desc=f"qat epoch {self.epoch + 1}/{config.epochs}",
                           disable=not (self.progress and self.dist.is_primary), leave=False)
                for index, batch in enumerate(self.data):
                    if index < skip:
                        continue
                    self.step(batch)
                    self.batch_in_epoch = index + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{self.sums[0].item() / max(self.sums[5].item(), 1.0):.4f}")
                    if config.checkpoint_every_steps and self.global_step % config.checkpoint_every_steps == 0 \
                            and self.batch_in_epoch < self.batches_per_epoch:
                        self.save(self.seconds_before + time.perf_counter() - start, time.perf_counter() - epoch_start)
                bar.close()
                self.history.append(self.epoch_metrics(time.perf_counter() - epoch_start))
                self.epoch += 1
                self.batch_in_epoch, self.epoch_seconds_before = 0, 0.0
                self.sums.zero_()
                self.write_log()
                self.save(self.seconds_before + time.perf_counter() - start, 0.0)
        finally:
            self.tracker.detach()
            for module, mode in modes.items():
                module.training = mode
        elapsed = time.perf_counter() - start
        return TrainReport(
            history=tuple(self.history), global_steps=self.global_step, seconds=round(self.seconds_before + elapsed, 3),
            seconds_this_process=round(elapsed, 3), resumed=self.resumed_from is not None,
            resumed_from_step=self.resumed_from, checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
            world_size=self.dist.world_size, config=config.to_dict(),
        )


def train(model: nn.Module, data: Iterable, config: TrainConfig, *, teacher: nn.Module | None = None,
          checkpoint_dir: str | Path | None = None, resume: bool = False, step_hooks: Sequence[StepHook] = (),
          progress: bool = True, device: torch.device | str | None = None,
          metrics_log: str | Path | None = None) -> TrainReport:
    """Train ``model`` in place on ``data`` as ``config`` says; returns a :class:`TrainReport`.

    Args:
        model: any ``nn.Module`` (mutated: parameters, quantizer encodings, BN statistics; moved
            to the training device). Its train/eval modes are restored at the end.
        data: re-iterable batches ``(inputs, labels)`` (or inputs only when the loss is
            ``distill``) with a ``len()``; under torchrun every rank iterates all batches and keeps
            its slice of each. ``set_epoch(epoch)`` of ``data`` or its sampler is called per epoch.
        config: the :class:`~quantlib.qat.config.TrainConfig`.
        teacher: the FP32 model whose logits the ``distill``/``both`` losses follow (put in eval
            mode and moved to the device; its weights are not changed).
        checkpoint_dir: where ``last.pt`` is written at every epoch end (and every
            ``config.checkpoint_every_steps`` steps); None: no checkpoints.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists (a missing checkpoint
            starts from the beginning; one written with other result-deciding settings raises
            :class:`~quantlib.qat.checkpointing.CheckpointError`).
        step_hooks: callables ``hook(model, global_step)`` run after every optimizer step, on the
            unwrapped model (re-apply sparsity masks, cluster projections, ...).
        progress: show a tqdm bar per epoch with the running loss (rank 0 only).
        device: the training device (default: the model's); under torchrun with CUDA, each rank
            uses ``cuda:LOCAL_RANK``.
        metrics_log: a JSON-lines file rewritten atomically at every epoch end with the history.

    The global torch RNG state is restored on return. Under torchrun the process group is
    joined (gloo on CPU, NCCL on CUDA) and, if this call created it, left again at the end.
    """
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    device = training_device(device)
    model.to(device)
    if config.uses_teacher:
        if teacher is None:
            raise ValueError(f"loss={config.loss} needs a teacher; pass train(..., teacher=fp32_model) or use loss=task")
        teacher.to(device)
    dist = init_distributed(device)
    try:
        trainer = _Trainer(model, data, config, teacher, Path(checkpoint_dir) if checkpoint_dir else None,
                           step_hooks, progress, device, dist, Path(metrics_log) if metrics_log else None)
        if resume:
            trainer.restore()
        fork_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            return trainer.run()
    finally:
        dist.close()
