"""Bias tuning: train the biases of a quantized model end to end so that its logits match the
float model's (Hubara et al., ICML 2021, "Accurate Post Training Quantization With Small
Calibration Sets", section 4.3).

Once the weights are quantized (round-to-nearest, AdaRound or AdaQuant), each layer's error was
fitted to its own or its block's output; what the errors of many layers do to the prediction
together is left. A per-channel shift is few parameters (one per output channel), so a small
calibration set can fit it without the overfitting that training every weight would bring.

:func:`apply_bias_tuning` trains the biases of the selected weight layers of a calibrated
:class:`~quantlib.quantsim.QuantSim` with Adam on ``KL(FP32 || quantized)`` of the logits at
``temperature`` (:func:`quantlib.qat.losses.distillation_loss`). Weights, weight encodings and
activation encodings stay fixed; gradients pass the activation quantizers by the straight-through
estimator, and the layers compute in float arithmetic while training (the integer kernels'
requantization has no gradient). The teacher is the float model the sim was built from
(:func:`~quantlib.ptq.quantizer_groups.fp32_reference`). The biases before tuning are kept for
later passes' float references (:func:`~quantlib.ptq.float_parameters.keep_float_bias`).

With ``holdout_samples`` the last samples are left out of training; the KL on them after every
epoch, and before the first (epoch 0: the biases as they came), picks the biases that are kept,
so tuning that does not carry over to unseen images is undone.

Pipeline step ``bias_tuning`` (phase "sim"); it needs labels nowhere.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..qat.losses import distillation_loss
from ..quantsim import QuantSim
from .float_parameters import keep_float_bias
from .pass_config import PassConfigError, check_int, check_positive, config_from_mapping
from .quantizer_groups import fp32_reference, select
from .registry import PTQContext, PTQStep


@dataclass(frozen=True)
class BiasTuningConfig:
    """Settings of :func:`apply_bias_tuning`.

    Attributes:
        epochs: passes over the training samples.
        learning_rate: Adam learning rate of the biases.
        batch_size: samples per optimizer step.
        num_samples: calibration samples used (the first ones the data yields).
        holdout_samples: the last this many of them are not trained on; their KL after each epoch
            (and before the first) picks the biases kept. 0: train on all, keep the last epoch's.
        temperature: softmax temperature of the KL (the loss is multiplied by its square).
        include, exclude: fnmatch globs over weight module names selecting the layers whose
            biases are trained (layers without a bias are left alone).
        seed: seeds the sample order.
    """

    epochs: int = 5
    learning_rate: float = 1e-3
    batch_size: int = 16
    num_samples: int = 256
    holdout_samples: int = 0
    temperature: float = 1.0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 1)
        check_positive("learning_rate", self.learning_rate)
        check_int("batch_size", self.batch_size, 1)
        check_int("num_samples", self.num_samples, 1)
        check_int("holdout_samples", self.holdout_samples, 0)
        check_positive("temperature", self.temperature)
        if self.holdout_samples >= self.num_samples:
            raise PassConfigError(f"holdout_samples={self.holdout_samples} leaves nothing to train on with "
                                  f"num_samples={self.num_samples}; lower holdout_samples or raise num_samples")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise PassConfigError(f"{name}={value!r} must be a list of glob patterns over module names, e.g. ['*']")


@dataclass
class BiasTuningResult:
    """What :func:`apply_bias_tuning` did.

    ``history`` has one entry per epoch (epoch 0: before training) with the mean training KL of
    the epoch (``fit_kl``, None for epoch 0) and, with held-out samples, ``holdout_kl``;
    ``selected_epoch`` is the epoch whose biases were kept.
    """

    layers: list[str]
    num_parameters: int
    samples: int
    holdout_samples: int
    history: list[dict[str, Any]] = field(default_factory=list)
    selected_epoch: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "layers": len(self.layers), "seconds": round(self.seconds, 2)}


@contextlib.contextmanager
def _trainable_biases(model: nn.Module, biases: list[nn.Parameter]) -> Iterator[None]:
    """Only ``biases`` require grad, and weight layers compute in float arithmetic; restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    arithmetic = [(m, m.integer_arithmetic) for m in model.modules() if hasattr(m, "integer_arithmetic")]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for bias in biases:
            bias.requires_grad_(True)
        for module, _ in arithmetic:
            module.integer_arithmetic = False
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for module, value in arithmetic:
            module.integer_arithmetic = value


def _samples(data: Iterable, num_samples: int) -> torch.Tensor:
    pieces, count = [], 0
    for batch in data:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(inputs, torch.Tensor):
            raise PassConfigError(f"data must yield tensors or (tensor, label) pairs, got {type(inputs).__name__}")
        pieces.append(inputs[: num_samples - count].detach())
        count += pieces[-1].shape[0]
        if count >= num_samples:
            break
    if count == 0:
        raise PassConfigError("data is empty; give at least one batch of calibration inputs")
    return torch.cat(pieces).clone()


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(chunk) for chunk in x.split(batch_size)])


def apply_bias_tuning(sim: QuantSim, data: Iterable, config: BiasTuningConfig | dict | None = None) -> BiasTuningResult:
    """Train the biases of ``sim`` (mutated in place) on ``data`` to match the float model's logits.

    Args:
        sim: a calibrated QuantSim.
        data: yields input tensors or (input, label) pairs; the first ``num_samples`` are used.
        config: a :class:`BiasTuningConfig` or a mapping of its fields.

    Returns the :class:`BiasTuningResult`. Raises PassConfigError when no selected layer has a
    bias, or when the data holds no more samples than ``holdout_samples``.
    """
    config = config_from_mapping(BiasTuningConfig, config, "bias_tuning")
    start = time.perf_counter()
    modules = sim.weight_modules()
    names = [name for name in select(modules, config.include, config.exclude) if modules[name].bias is not None]
    if not names:
        raise PassConfigError("bias_tuning: no selected weight layer has a bias; widen include or fold BatchNorm first")
    device = next(sim.model.parameters()).device
    with torch.inference_mode(False):
        x = _samples(data, config.num_samples).to(device)
        if x.shape[0] <= config.holdout_samples:
            raise PassConfigError(f"holdout_samples={config.holdout_samples} leaves nothing to train on: the data gave "
                                  f"{x.shape[0]} samples")
        teacher = _logits(fp32_reference(sim), x, config.batch_size)
        train_count = x.shape[0] - config.holdout_samples
        biases = [modules[name].bias for name in names]
        for name in names:
            keep_float_bias(modules[name], modules[name].bias.numel())
        result = BiasTuningResult(layers=names, num_parameters=sum(b.numel() for b in biases), samples=train_count,
                                  holdout_samples=config.holdout_samples)
        sim.model.eval()
        generator = torch.Generator().manual_seed(config.seed)
        with _trainable_biases(sim.model, biases):
            def holdout_kl() -> float | None:
                if not config.holdout_samples:
                    return None
                logits = _logits(sim.model, x[train_count:], config.batch_size)
                return float(distillation_loss(logits, teacher[train_count:], config.temperature))

            best = (holdout_kl(), 0, [b.detach().clone() for b in biases])
            result.history.append({"epoch": 0, "fit_kl": None, "holdout_kl": best[0]})
            optimizer = torch.optim.Adam(biases, lr=config.learning_rate)
            with torch.enable_grad():
                for epoch in range(1, config.epochs + 1):
                    order = torch.randperm(train_count, generator=generator)
                    total = 0.0
                    for batch in order.split(config.batch_size):
                        loss = distillation_loss(sim.model(x[batch]), teacher[batch], config.temperature)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        total += float(loss.detach()) * batch.numel()
                    score = holdout_kl()
                    result.history.append({"epoch": epoch, "fit_kl": total / train_count, "holdout_kl": score})
                    if score is None or score <= best[0]:
                        best = (score, epoch, [b.detach().clone() for b in biases])
        with torch.no_grad():
            for bias, kept in zip(biases, best[2]):
                bias.copy_(kept)
    result.selected_epoch = best[1]
    result.seconds = time.perf_counter() - start
    return result


@dataclass(frozen=True)
class BiasTuningStepConfig(BiasTuningConfig):
    """Settings of the ``bias_tuning`` pipeline step: those of :class:`BiasTuningConfig` plus

    Attributes:
        recalibrate: recompute the activation encodings afterwards. Off by default: the biases
            were fitted with the current encodings.
    """

    recalibrate: bool = False


def _run_bias_tuning(context: PTQContext, config: BiasTuningStepConfig) -> dict[str, Any]:
    sim = context.require_sim("bias_tuning")
    result = apply_bias_tuning(sim, context.calibration_data, config)
    if config.recalibrate:
        context.recalibrate("bias_tuning")
    return {**result.summary(), "recalibrated": config.recalibrate}


STEPS = (
    PTQStep(name="bias_tuning", config_cls=BiasTuningStepConfig, run=_run_bias_tuning, phase="sim",
            description="train the biases end to end to match the float logits (Hubara et al. 2021)"),
)
