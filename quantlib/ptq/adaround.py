"""AdaRound: learn whether each weight rounds up or down, layer by layer (Nagel et al., ICML 2020,
"Up or Down? Adaptive Rounding for Post-Training Quantization").

For each weight layer of a calibrated :class:`~quantlib.quantsim.QuantSim`, in graph order:

* the layer's inputs come from the quantized model as optimized so far (activation quantizers on,
  earlier layers already AdaRounded; ``input_source="fp32"`` uses the float model's inputs) and
  its targets are the float layer's outputs on the float model's inputs, as in AIMET;
* with the encoding fixed, each weight is ``s * (clamp(floor(w/s) + h(V) + z, qmin, qmax) - z)``
  with ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (zeta 1.1, gamma -0.1), and
  ``V`` starts where ``h(V)`` equals the fractional part of ``w/s`` (the float weight);
* Adam minimizes ``||f(W_soft x) - f(W x_fp)||^2`` (summed over output channels, averaged over
  samples and positions; ``f`` is the ReLU/ReLU6 that follows the layer, as in the paper's
  section 4, or the identity with ``through_activation=False`` or no such activation)
  ``+ reg_weight * sum(1 - |2 h(V) - 1|^beta)``; the regularizer is off for the
  first ``warm_start`` fraction of the iterations, then ``beta`` anneals from ``beta_start`` to
  ``beta_end`` (cosine as in AIMET, or linear);
* the codes ``clamp(floor(w/s) + [V >= 0] + z, qmin, qmax)`` are written into the layer as grid
  weights and the weight encoding is frozen (:mod:`quantlib.ptq.weight_freeze`), so the sim,
  ``encodings()``, a later ``calibrate()``, the quantized checkpoint and the ONNX export all
  carry exactly these integers.

Memory: activations are cached layer by layer for ``num_samples`` samples by
:mod:`quantlib.ptq.layer_cache`: at most ``max_cache_mb`` MiB stay in memory and the rest is
spilled to disk (see that module for the bound).

The settings, their per-layer/per-block overrides and the annealing schedule are in
:mod:`quantlib.ptq.adaround_config`.

Pipeline step ``adaround`` (phase "sim"): :class:`AdaRoundStepConfig` (the settings above plus
``recalibrate``) runs :func:`apply_adaround` on ``context.sim`` with the calibration data, then
recomputes the activation encodings (AIMET's flow: AdaRound the weights, freeze their encodings,
then compute the activation encodings with the new weights).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..affine import dequantize, expand_qparam, quantize
from ..quantsim import QuantSim
from .layer_cache import LayerData
from .adaround_config import AdaRoundConfig, beta_at, check_overrides_match, config_for
from .adaround_restarts import best_of_restarts
from .adaround_selection import CheckpointSelection, Comparison
from .layer_ops import ReconstructionBatches, mix_inputs, reconstruction_mse
from .layerwise import LayerwiseStats, fit_and_holdout, loss_activation, run_layerwise, selected_layers
from .pass_config import config_from_mapping
from .regions import RegionData
from .registry import PTQContext, PTQStep
from .weight_freeze import write_weight_codes

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (Louizos et al. 2018), as in the paper


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) of the paper: a sigmoid stretched to (gamma, zeta) and clipped to [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with h(V) = ``h`` for ``h`` in [0, 1]."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


@dataclass
class AdaRoundLayerResult:
    """What AdaRound did to one layer.

    ``mse_nearest`` / ``mse_adaround``: layer output MSE against the float targets on the first
    cached chunk (whole feature maps) with round-to-nearest and with the AdaRounded weights;
    ``flipped``: fraction of codes that differ from round-to-nearest (0 when ``kept_nearest``);
    ``kept_nearest``: AdaRound was worse on that chunk and round-to-nearest was kept;
    ``undecided``: fraction of weights whose soft rounding ``h(V)`` ended strictly between 0 and
    1, where the hard rounding differs from what the optimization last saw. A large fraction
    means the schedule ended before the regularizer settled the rounding: raise ``reg_weight``
    or ``num_iterations``.
    ``holdout_mse_nearest`` / ``holdout_mse_adaround``: the same on the held-out chunks
    (``holdout_chunks``; None without them), which the optimization never saw; with them,
    ``kept_nearest`` is decided on these.
    ``selected_iteration``: with ``holdout_checkpoints``, the step count whose hard rounding had
    the lowest held-out MSE and was kept (``iterations`` when the end's was best; None without
    checkpoints); ``history`` then also holds each checkpoint's ``holdout_mse``.
    With ``reconstruct="block"`` one result covers a block: ``name`` is the block, ``layers`` its
    weight layers, ``bitwidth`` the narrowest of them, and the MSEs are of the block's output
    (weighted by its output Fisher weights with ``fisher_samples``).
    """

    name: str
    bitwidth: int
    num_weights: int
    iterations: int
    mse_nearest: float
    mse_adaround: float
    flipped: float
    seconds: float
    kept_nearest: bool = False
    history: list[dict[str, float | None]] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    undecided: float = 0.0
    holdout_mse_nearest: float | None = None
    holdout_mse_adaround: float | None = None
    selected_iteration: int | None = None


@dataclass
class AdaRoundResult:
    """Per-layer results plus the run's totals; :meth:`to_dict` is JSON-ready."""

    layers: list[AdaRoundLayerResult]
    stats: LayerwiseStats
    config: AdaRoundConfig
    restarts: list[dict[str, float]] = field(default_factory=list)  # each restart's seed and holdout_kl
    selected_restart: int | None = None

    def _restart_fields(self) -> dict[str, Any]:
        return {"restarts": self.restarts, "selected_restart": self.selected_restart} if self.restarts else {}

    def to_dict(self) -> dict[str, Any]:
        return {"method": "adaround", "config": asdict(self.config), **self.stats.to_dict(),
                "layers": [asdict(layer) for layer in self.layers], **self._restart_fields()}

    def summary(self) -> dict[str, Any]:
        """Compact JSON-able summary for a run record: totals and per-layer MSE (no loss history)."""
        improved = sum(layer.mse_adaround < layer.mse_nearest for layer in self.layers)
        return {**self.stats.to_dict(), "layers": len(self.layers), "layers_improved": improved,
                "layers_kept_nearest": sum(layer.kept_nearest for layer in self.layers),
                "mse_nearest_sum": sum(layer.mse_nearest for layer in self.layers),
                "mse_adaround_sum": sum(layer.mse_adaround for layer in self.layers),
                **_holdout_sums(self.layers), **self._restart_fields(),
                "per_layer": [{"name": layer.name, "bitwidth": layer.bitwidth, "mse_nearest": layer.mse_nearest,
                               "mse_adaround": layer.mse_adaround, "flipped": round(layer.flipped, 5),
                               "undecided": round(layer.undecided, 5), "iterations": layer.iterations,
                               "seconds": round(layer.seconds, 2),
                               **({"holdout_mse_nearest": layer.holdout_mse_nearest,
                                   "holdout_mse_adaround": layer.holdout_mse_adaround}
                                  if layer.holdout_mse_nearest is not None else {}),
                               **({"selected_iteration": layer.selected_iteration}
                                  if layer.selected_iteration is not None else {})}
                              for layer in self.layers]}


def _holdout_sums(layers: list[AdaRoundLayerResult]) -> dict[str, float]:
    """Summed held-out MSEs (empty without held-out chunks)."""
    if not layers or layers[0].holdout_mse_nearest is None:
        return {}
    sums = {"holdout_mse_nearest_sum": sum(layer.holdout_mse_nearest or 0.0 for layer in layers),
            "holdout_mse_adaround_sum": sum(layer.holdout_mse_adaround or 0.0 for layer in layers)}
    if layers[0].selected_iteration is not None:
        sums["layers_stopped_early"] = sum(layer.selected_iteration < layer.iterations for layer in layers
                                           if layer.selected_iteration is not None)
    return sums


def apply_adaround(sim: QuantSim, data: Iterable, config: AdaRoundConfig | Mapping[str, Any] | None = None,
                   *, progress: bool = True) -> AdaRoundResult:
    """AdaRound every selected weight layer of ``sim`` (mutated in place) using ``data``.

    Args:
        sim: a calibrated QuantSim (activation and weight encodings set).
        data: yields input tensors or (input, label) pairs; the first ``num_samples`` are used.
        config: an :class:`AdaRoundConfig` or a mapping of its fields (unknown keys raise
            :class:`~quantlib.ptq.pass_config.PassConfigError`).

    Returns the per-layer :class:`AdaRoundResult` (of the kept run with ``restarts``). Afterwards
    each AdaRounded layer's weight holds its grid values and its weight encoding is frozen.
    """
    config = config_from_mapping(AdaRoundConfig, config, "adaround")
    check_overrides_match(config, selected_layers(sim, config, "adaround"))
    if config.restarts > 1:
        return best_of_restarts(sim, data, config, lambda copy, once: apply_adaround(copy, data, once, progress=progress))
    if config.reconstruct == "block":
        layers, stats = run_layerwise(sim, data, config,
                                      lambda block, gen: adaround_block(block, config_for(config, block.name), gen),
                                      method="adaround", progress=progress, blocks=True,
                                      fisher_samples=config.fisher_samples)
    else:
        layers, stats = run_layerwise(sim, data, config,
                                      lambda layer, gen: adaround_layer(layer, config_for(config, layer.name), gen),
                                      method="adaround", progress=progress)
    return AdaRoundResult(layers=layers, stats=stats, config=config)


class SoftRounding:
    """One layer's AdaRound variables with its weight encoding fixed: ``v`` (a Parameter) starts
    where the soft rounding equals the float weight; :meth:`soft` gives the soft weight and
    ``h(V)``, :meth:`codes` the hard rounding, ``nearest`` round-to-nearest's codes."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        wq = module.weight_quantizer
        self.spec = wq.spec
        weight = module.weight.detach().float()
        self.num_weights = weight.numel()
        self.bias = module.bias.detach().float() if module.bias is not None else None
        self.scale = expand_qparam(wq.scale, weight.shape, self.spec)
        self.zero_point = expand_qparam(wq.zero_point, weight.shape, self.spec).float()
        scaled = weight / self.scale
        floor = torch.floor(scaled)
        self.shifted_floor = floor + self.zero_point  # loop invariant: the grid code below each weight
        self.nearest = quantize(weight, wq.scale, wq.zero_point, self.spec)
        self.v = torch.nn.Parameter(inverse_rectified_sigmoid((scaled - floor).clamp(0.0, 1.0)))

    def soft(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(soft weight, h(V))."""
        h = rectified_sigmoid(self.v)
        soft = (torch.clamp(self.shifted_floor + h, self.spec.quant_min, self.spec.quant_max) - self.zero_point) * self.scale
        return soft, h

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        return torch.clamp(self.shifted_floor + (self.v >= 0).float(), self.spec.quant_min, self.spec.quant_max).to(torch.int32)

    def dequantized(self, codes: torch.Tensor) -> torch.Tensor:
        wq = self.module.weight_quantizer
        return dequantize(codes, wq.scale, wq.zero_point, self.spec)

    @torch.no_grad()
    def undecided(self) -> int:
        """How many weights have ``0 < h(V) < 1``: not yet settled on one grid point."""
        h = rectified_sigmoid(self.v)
        return int(((h > 0) & (h < 1)).sum())


def _regularizer(config: AdaRoundConfig, h: torch.Tensor, beta: float | None) -> torch.Tensor | None:
    """The rounding regularizer at exponent ``beta`` (None while the warm start lasts or without it)."""
    if beta is None or config.reg_weight == 0:
        return None
    return config.reg_weight * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def adaround_layer(layer: LayerData, config: AdaRoundConfig, generator: torch.Generator) -> AdaRoundLayerResult:
    """Optimize the rounding of one layer on its cached data, then write the codes and freeze."""
    start = time.perf_counter()
    rounding = SoftRounding(layer.module)
    bias = rounding.bias
    activation = loss_activation(layer, config)
    fit_chunks, holdout = fit_and_holdout(layer, config.holdout_chunks)
    batches = ReconstructionBatches(layer, config.crop, generator, activation, config.input_drop, fit_chunks)
    history: list[dict[str, float | None]] = []
    log_at = _log_iterations(config.num_iterations, config.history_points)

    def mse(codes: torch.Tensor, chunks: tuple[int, ...]) -> float:
        return reconstruction_mse(layer, rounding.dequantized(codes), bias, chunks, activation)

    selection = CheckpointSelection(config, lambda codes: mse(codes, holdout))
    with torch.inference_mode(False), torch.enable_grad():
        optimizer = torch.optim.Adam([rounding.v], lr=config.learning_rate)
        for iteration in range(config.num_iterations):
            x, target = batches.sample()
            soft, h = rounding.soft()
            out = batches.forward(x, soft, bias)
            recon = (out - target).pow(2).sum(1).mean()
            beta = beta_at(config, iteration)
            reg = _regularizer(config, h, beta)
            if reg is None:
                reg = torch.zeros((), device=recon.device)
            loss = recon + reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if iteration in log_at:
                history.append({"iteration": iteration, "beta": beta, "recon": float(recon.detach()), "reg": float(reg.detach())})
            selection.after_step(iteration + 1, rounding.codes)
    with torch.no_grad():
        codes, nearest = selection.chosen(rounding.codes()), rounding.nearest
        comparison = Comparison.measure(mse, nearest, codes, holdout, config.keep_nearest_if_worse)
        if comparison.kept_nearest:
            codes = nearest
        flipped = float((codes != nearest).float().mean())
    write_weight_codes(layer.module, codes, "adaround")
    return AdaRoundLayerResult(name=layer.name, bitwidth=rounding.spec.bitwidth, num_weights=rounding.num_weights,
                               iterations=config.num_iterations, flipped=flipped, seconds=time.perf_counter() - start,
                               history=history + selection.scores, undecided=rounding.undecided() / rounding.num_weights,
                               selected_iteration=selection.best_iteration, **comparison.result_fields())


def adaround_block(block: RegionData, config: AdaRoundConfig, generator: torch.Generator) -> AdaRoundLayerResult:
    """BRECQ: optimize the roundings of all layers of one block jointly on the block's output
    (one random cached chunk per step, whole feature maps; QDrop's ``input_drop`` applies to the
    block input), then write every layer's codes and freeze them. Round-to-nearest is kept for
    the whole block when the result is worse (``keep_nearest_if_worse``, see
    :class:`~quantlib.ptq.adaround_selection.Comparison`).
    The held-out chunks (``holdout_chunks``) are never drawn for a step. With ``fisher_samples``
    every squared error, in the loss and in the comparisons, is weighted by the block's output
    Fisher weights (:mod:`quantlib.ptq.output_fisher`)."""
    start = time.perf_counter()
    roundings = {name: SoftRounding(module) for name, module in block.modules.items()}
    history: list[dict[str, float | None]] = []
    log_at = _log_iterations(config.num_iterations, config.history_points)

    fit_chunks, holdout = fit_and_holdout(block, config.holdout_chunks)

    def block_mse(codes: dict[str, torch.Tensor], chunks: tuple[int, ...]) -> float:
        weights = {name: (r.dequantized(codes[name]), r.bias) for name, r in roundings.items()}
        total, count = 0.0, 0
        for index in chunks:
            out, target = block.forward(block.inputs(index), weights), block.targets(index)
            total += float(_squared_error(out.double(), target.double(), block.output_weights(index)).sum())
            count += target.numel()
        return total / max(count, 1)

    selection = CheckpointSelection(config, lambda codes: block_mse(codes, holdout))

    def current_codes() -> dict[str, torch.Tensor]:
        return {name: r.codes() for name, r in roundings.items()}

    with block.float_arithmetic():
        with torch.inference_mode(False), torch.enable_grad():
            optimizer = torch.optim.Adam([r.v for r in roundings.values()], lr=config.learning_rate)
            for iteration in range(config.num_iterations):
                index = int(torch.randint(fit_chunks, (1,), generator=generator))
                x, target = block.inputs(index), block.targets(index)
                if config.input_drop > 0:
                    x = mix_inputs(x, block.float_inputs(index), config.input_drop, generator)
                weights, hs = {}, []
                for name, rounding in roundings.items():
                    soft, h = rounding.soft()
                    weights[name] = (soft, rounding.bias)
                    hs.append(h)
                recon = _squared_error(block.forward(x, weights), target, block.output_weights(index)).sum(1).mean()
                beta = beta_at(config, iteration)
                terms = [t for t in (_regularizer(config, h, beta) for h in hs) if t is not None]
                reg = torch.stack(terms).sum() if terms else torch.zeros((), device=recon.device)
                loss = recon + reg
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if iteration in log_at:
                    history.append({"iteration": iteration, "beta": beta, "recon": float(recon.detach()),
                                    "reg": float(reg.detach())})
                selection.after_step(iteration + 1, current_codes)
        with torch.no_grad():
            nearest = {name: r.nearest for name, r in roundings.items()}
            codes = selection.chosen(current_codes())
            comparison = Comparison.measure(block_mse, nearest, codes, holdout, config.keep_nearest_if_worse)
    if comparison.kept_nearest:
        codes = nearest
    changed = sum(int((codes[name] != nearest[name]).sum()) for name in roundings)
    total = sum(r.num_weights for r in roundings.values())
    for name, rounding in roundings.items():
        write_weight_codes(rounding.module, codes[name], "adaround")
    return AdaRoundLayerResult(name=block.name, bitwidth=min(r.spec.bitwidth for r in roundings.values()),
                               num_weights=total, iterations=config.num_iterations, flipped=changed / max(total, 1),
                               seconds=time.perf_counter() - start, history=history + selection.scores,
                               layers=list(roundings),
                               undecided=sum(r.undecided() for r in roundings.values()) / max(total, 1),
                               selected_iteration=selection.best_iteration, **comparison.result_fields())


def _squared_error(out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Element-wise squared error, times the block's output weights when it has them."""
    error = (out - target).pow(2)
    return error if weights is None else error * weights.to(error.dtype)


def _log_iterations(num_iterations: int, points: int) -> set[int]:
    if num_iterations == 0 or points == 0:
        return set()
    if points == 1:
        return {num_iterations - 1}
    return {round(i * (num_iterations - 1) / (points - 1)) for i in range(points)}


@dataclass(frozen=True)
class AdaRoundStepConfig(AdaRoundConfig):
    """Settings of the ``adaround`` pipeline step: those of :class:`AdaRoundConfig` plus

    Attributes:
        recalibrate: recompute the activation encodings after AdaRound (weights stay frozen).
    """

    recalibrate: bool = True


def _run_adaround(context: PTQContext, config: AdaRoundStepConfig) -> dict[str, Any]:
    sim = context.require_sim("adaround")
    result = apply_adaround(sim, context.calibration_data, config, progress=context.progress)
    if config.recalibrate:
        context.recalibrate("adaround")
    return {**result.summary(), "recalibrated": config.recalibrate}


STEPS = (
    PTQStep(name="adaround", config_cls=AdaRoundStepConfig, run=_run_adaround, phase="sim",
            description="learn each weight's rounding layer by layer (Nagel et al. 2020)"),
)
