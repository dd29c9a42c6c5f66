"""Cross-layer equalization (CLE; Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", section 4.1).

For a pair ``y = W2 f(W1 x + b1)`` with ``f`` positive homogeneous (ReLU, LeakyReLU, identity,
pooling, zero padding), scaling output channel ``i`` of layer 1 by ``1/s_i`` and input channel
``i`` of layer 2 by ``s_i`` leaves the function unchanged. With ``r1_i`` the range (max |w|) of
output channel ``i`` of ``W1`` and ``r2_i`` that of input channel ``i`` of ``W2``, the choice
``s_i = sqrt(r1_i / r2_i)`` makes both ranges ``sqrt(r1_i * r2_i)``, which maximizes the
per-tensor quantization precision of the pair. Chains (conv -> depthwise -> pointwise) are
equalized pair by pair, repeatedly, until the scales converge.

A clip activation -- ReLU6 (MobileNetV2, EfficientNet-Lite), Hardtanh, clamp -- is not positive
homogeneous, so ``relu6`` says what to do with the pairs it joins:

* ``"per_channel_clip"`` (default): equalize them and rescale the clip's bounds per channel,
  ``clip(x / s, lo / s, hi / s) == clip(x, lo, hi) / s``; the ReLU6 becomes a
  ``torch.clamp(x, low, high)`` with per-channel tensor bounds. Exact: the FP32 function does not
  change. QuantSim fuses it with the conv like any clip (one activation quantizer after it).
  It exports as ONNX ``Max``/``Min`` with per-channel constants, which ONNX Runtime cannot fold
  into ``QLinearConv``: those convs run as float ``Conv`` between DequantizeLinear and
  QuantizeLinear (the same fake-quant numerics, not integer kernels; on EfficientNet-Lite0 32 of
  49 convs).
* ``"relu"``: replace exactly those ReLU6 with ReLU (what Vitis AI's optimizer and AIMET do).
  Changes the FP32 function wherever a pre-activation exceeds 6; on EfficientNet-Lite0 that
  costs tens of points of FP32 top-1, on models trained with ReLU6 rarely saturating it is cheap.
* ``"skip"``: leave those pairs alone.

Pairs come from the fx graph (:mod:`quantlib.ptq.layer_pairs`); BatchNorm must be folded first
(the pipeline's ``cle`` step folds it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..batchnorm_fold import fold_batch_norms, set_submodule
from . import channels
from .layer_pairs import RELU, LayerPair, chains_of, find_layer_pairs, module_call_counts
from .registry import PTQConfigError, PTQContext, PTQStep

RELU6_MODES = ("per_channel_clip", "relu", "skip")


@dataclass(frozen=True)
class CLEConfig:
    """Settings of cross-layer equalization.

    Attributes:
        relu6: pairs joined by ReLU6 or another clip: ``per_channel_clip`` equalizes them and
            rescales the clip bounds per channel (exact), ``relu`` converts those ReLU6 to ReLU
            (changes the FP32 function where activations exceed 6; other clips are skipped),
            ``skip`` leaves them alone.
        max_iterations: sweeps over each chain at most.
        tolerance: stop a chain when every scale of a sweep is within ``exp(+-tolerance)`` of 1.
        max_plots: with a plots directory, plot the per-channel weight ranges of this many
            layers (those with the worst range balance before CLE).
    """

    relu6: Literal["per_channel_clip", "relu", "skip"] = "per_channel_clip"
    max_iterations: int = 100
    tolerance: float = 1e-3
    max_plots: int = 3

    def __post_init__(self) -> None:
        if self.relu6 not in RELU6_MODES:
            raise PTQConfigError(f"relu6={self.relu6!r} is not supported; use one of {', '.join(RELU6_MODES)}")
        if self.max_iterations < 1:
            raise PTQConfigError(f"max_iterations={self.max_iterations} must be at least 1")
        if not self.tolerance > 0:
            raise PTQConfigError(f"tolerance={self.tolerance} must be positive")
        if self.max_plots < 0:
            raise PTQConfigError(f"max_plots={self.max_plots} must be 0 or more")


@dataclass
class CLEResult:
    """What :func:`equalize_model` did.

    Attributes:
        pairs: the equalized pairs, forward order.
        chains: the equalized chains as layer names.
        converted_relu6: fx node names of the ReLU6 replaced by ReLU.
        rescaled_clips: fx node names of the clips whose bounds were rescaled per channel.
        skipped_relu6: pairs left alone because they are joined by ReLU6 or another clip.
        depthwise_pairs: equalized pairs with a depthwise conv on either side.
        iterations: the most sweeps any chain needed.
        unconverged_chains: chains still changing by more than ``tolerance`` after ``max_iterations``.
        scales: ``{layer: s}``: output channel ``i`` of ``layer`` was divided by ``s[i]`` in total.
        precision_before / precision_after: DFQ's objective (:func:`channels.pair_precision`)
            averaged over the equalized pairs; CLE raises it (1.0: every channel uses the whole
            per-tensor grid).
        channel_ranges_before / channel_ranges_after: ``{layer: (min, max)}`` per output channel.
    """

    pairs: list[LayerPair] = field(default_factory=list)
    chains: list[list[str]] = field(default_factory=list)
    converted_relu6: list[str] = field(default_factory=list)
    rescaled_clips: list[str] = field(default_factory=list)
    skipped_relu6: int = 0
    depthwise_pairs: int = 0
    iterations: int = 0
    unconverged_chains: int = 0
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    precision_before: float = 0.0
    precision_after: float = 0.0
    channel_ranges_before: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    channel_ranges_after: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-able counts for reports."""
        return {
            "pairs": len(self.pairs),
            "chains": len(self.chains),
            "depthwise_pairs": self.depthwise_pairs,
            "converted_relu6": len(self.converted_relu6),
            "rescaled_clips": len(self.rescaled_clips),
            "skipped_clip_pairs": self.skipped_relu6,
            "iterations": self.iterations,
            "unconverged_chains": self.unconverged_chains,
            "precision_before": round(self.precision_before, 4),
            "precision_after": round(self.precision_after, 4),
        }


def channel_min_max(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of every output channel of a weight."""
    flat = weight.detach().flatten(1)
    return flat.amin(dim=1).cpu(), flat.amax(dim=1).cpu()


def _groups(module: nn.Module) -> int:
    return getattr(module, "groups", 1)


@torch.no_grad()
def equalize_pair(first: nn.Module, second: nn.Module) -> torch.Tensor:
    """Equalize one pair in place; returns the scales ``s`` (first's channel i divided by s_i).

    Channels where either range is zero (dead channels) keep ``s_i = 1``.
    """
    r1 = channels.out_channel_absmax(first.weight)
    r2 = channels.in_channel_absmax(second.weight, _groups(second))
    valid = (r1 > 0) & (r2 > 0)
    s = torch.where(valid, torch.sqrt(r1 / torch.where(valid, r2, torch.ones_like(r2))), torch.ones_like(r1))
    channels.scale_out_channels_(first.weight, 1.0 / s)
    if first.bias is not None:
        first.bias.div_(s.to(first.bias))
    channels.scale_in_channels_(second.weight, _groups(second), s)
    return s


def is_depthwise(module: nn.Module) -> bool:
    """A conv whose every group has one input channel (MobileNet's depthwise conv)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1 and module.groups == module.in_channels


def _pair_precision(first: nn.Module, second: nn.Module) -> float:
    return channels.pair_precision(channels.out_channel_absmax(first.weight),
                                   channels.in_channel_absmax(second.weight, _groups(second)))


def convert_relu6_to_relu(gm: fx.GraphModule, node_names: list[str]) -> list[str]:
    """Replace the ReLU6 computed by the named nodes with ReLU; returns the nodes changed.

    A ReLU6 module called from one node is swapped for ``nn.ReLU``; a shared module or a
    functional ReLU6 is rewritten into a ``F.relu`` call at that node only.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    counts = module_call_counts(gm)
    changed = []
    for name in node_names:
        node = nodes[name]
        if node.op == "call_module" and counts[node.target] == 1:
            inplace = bool(getattr(modules[node.target], "inplace", False))
            set_submodule(gm, node.target, nn.ReLU(inplace=inplace))
        else:
            node.op, node.target = "call_function", F.relu
            node.args, node.kwargs = node.args[:1], {}
        changed.append(name)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


CLIP_BOUNDS_MODULE = "cle_clip_bounds"


def channel_view(layer: nn.Module, channels_: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-output-channel vector over ``layer``'s output."""
    return (channels_,) if isinstance(layer, nn.Linear) else (channels_,) + (1,) * (layer.weight.dim() - 2)


def _per_channel(bound: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(bound, torch.Tensor):
        return bound.detach().to(like).reshape(-1).clone()
    return torch.full_like(like, float(bound))


@torch.no_grad()
def set_channel_clip(gm: fx.GraphModule, node_name: str, low: torch.Tensor, high: torch.Tensor,
                     shape: tuple[int, ...]) -> None:
    """Make node ``node_name`` compute ``torch.clamp(x, low, high)`` with per-channel tensor bounds.

    ``low``/``high`` (1-D, one value per channel) are stored as buffers of the submodule
    ``cle_clip_bounds`` of ``gm``, viewed as ``shape`` (channels first, ones for the spatial
    axes). A node that already is such a clamp gets its buffers replaced; any other clip node
    (ReLU6 module, ``F.relu6``, ``hardtanh``, scalar ``clamp``) is rewritten in place, and a clip
    module no other node calls is deleted. Mutates ``gm`` (call ``gm.recompile()`` afterwards).
    """
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    if not hasattr(gm, CLIP_BOUNDS_MODULE):
        gm.add_module(CLIP_BOUNDS_MODULE, nn.Module())
    holder = getattr(gm, CLIP_BOUNDS_MODULE)
    key = _safe_filename(node.name).replace(".", "_")
    holder.register_buffer(f"{key}_low", low.reshape(shape).clone())
    holder.register_buffer(f"{key}_high", high.reshape(shape).clone())
    already = node.target is torch.clamp and all(
        isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target).startswith(f"{CLIP_BOUNDS_MODULE}.")
        for a in node.args[1:3])
    if already and len(node.args) == 3:
        return
    old_module = node.target if node.op == "call_module" else None
    with gm.graph.inserting_before(node):
        low_node = gm.graph.get_attr(f"{CLIP_BOUNDS_MODULE}.{key}_low")
        high_node = gm.graph.get_attr(f"{CLIP_BOUNDS_MODULE}.{key}_high")
    node.op, node.target = "call_function", torch.clamp
    node.args, node.kwargs = (node.args[0], low_node, high_node), {}
    if old_module is not None and module_call_counts(gm)[old_module] == 0:
        gm.delete_submodule(old_module)


def _rescale_clips(gm: fx.GraphModule, pairs: list[LayerPair], scales: dict[str, torch.Tensor],
                   modules: dict[str, nn.Module]) -> list[str]:
    """Divide the bounds of every clip joining a pair by its first layer's scales (per channel)."""
    changed = []
    for pair in pairs:
        if not pair.activation.is_clip or pair.first not in scales:
            continue
        first = modules[pair.first]
        s = scales[pair.first].to(first.weight)
        low = _per_channel(pair.activation.low, s) / s
        high = _per_channel(pair.activation.high, s) / s
        set_channel_clip(gm, pair.activation_node, low, high, channel_view(first, s.numel()))
        changed.append(pair.activation_node)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def equalize_model(gm: fx.GraphModule, config: CLEConfig | None = None) -> CLEResult:
    """Equalize every pair of ``gm`` (mutated in place: weights, biases and the clips between pairs).

    BatchNorm must already be folded (a BN between two layers hides the pair). Returns a
    :class:`CLEResult`. The function of ``gm`` is unchanged unless ``config.relu6 == "relu"``
    converted ReLU6 that saturate on some input.
    """
    config = config or CLEConfig()
    result = CLEResult()
    pairs = find_layer_pairs(gm)
    clipped = [p for p in pairs if p.activation.is_clip]
    if config.relu6 == "relu":
        relu6 = [p for p in clipped if p.activation.kind == "relu6"]
        result.converted_relu6 = convert_relu6_to_relu(gm, [p.activation_node for p in relu6])
        result.skipped_relu6 = len(clipped) - len(relu6)
        pairs = [LayerPair(p.first, p.second, RELU, p.activation_node) if p.activation.kind == "relu6" else p
                 for p in pairs if p.activation.kind == "relu6" or not p.activation.is_clip]
    elif config.relu6 == "skip":
        result.skipped_relu6 = len(clipped)
        pairs = [p for p in pairs if not p.activation.is_clip]
    modules = dict(gm.named_modules())
    chains = chains_of(pairs)
    layers = sorted({name for p in pairs for name in (p.first, p.second)})
    result.channel_ranges_before = {name: channel_min_max(modules[name].weight) for name in layers}
    before = [_pair_precision(modules[p.first], modules[p.second]) for p in pairs]
    for chain in chains:
        for sweep in range(1, config.max_iterations + 1):
            worst = 0.0
            for pair in chain:
                s = equalize_pair(modules[pair.first], modules[pair.second])
                prev = result.scales.get(pair.first)
                result.scales[pair.first] = s if prev is None else prev * s
                worst = max(worst, float(s.log().abs().max()))
            result.iterations = max(result.iterations, sweep)
            if worst < config.tolerance:
                break
        else:
            result.unconverged_chains += 1
    result.rescaled_clips = _rescale_clips(gm, pairs, result.scales, modules)
    after = [_pair_precision(modules[p.first], modules[p.second]) for p in pairs]
    result.pairs = pairs
    result.depthwise_pairs = sum(is_depthwise(modules[p.first]) or is_depthwise(modules[p.second]) for p in pairs)
    result.chains = [[chain[0].first] + [p.second for p in chain] for chain in chains]
    result.precision_before = sum(before) / len(before) if before else 0.0
    result.precision_after = sum(after) / len(after) if after else 0.0
    result.channel_ranges_after = {name: channel_min_max(modules[name].weight) for name in layers}
    return result


def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_worst_layers(result: CLEResult, plots_dir: Path, count: int) -> list[Path]:
    """Plot before/after channel ranges of the ``count`` layers with the worst balance before CLE."""
    from .plots import plot_channel_ranges

    def balance(name: str) -> float:
        low, high = result.channel_ranges_before[name]
        return channels.precision(torch.maximum(low.abs(), high.abs()))

    worst = sorted(result.channel_ranges_before, key=lambda n: (balance(n), n))[:count]
    return [
        plot_channel_ranges(result.channel_ranges_before[name], result.channel_ranges_after[name],
                            Path(plots_dir) / f"cle_weight_ranges_{_safe_filename(name)}.png",
                            title=f"{name}: per-channel weight ranges before and after CLE")
        for name in worst
    ]


def _run_cle(context: PTQContext, config: CLEConfig) -> dict[str, Any]:
    folded = fold_batch_norms(context.model)
    result = equalize_model(context.model, config)
    for name, s in result.scales.items():
        if name in context.layer_output_stats:
            context.layer_output_stats[name] = context.layer_output_stats[name].scaled(1.0 / s)
    summary = result.summary()
    summary["folded_batch_norms"] = len(folded)
    if context.plots_dir is not None and config.max_plots:
        paths = plot_worst_layers(result, context.plots_dir, config.max_plots)
        context.plots.extend(paths)
        summary["plots"] = [str(p) for p in paths]
    return summary


STEPS = (
    PTQStep(name="cle", config_cls=CLEConfig, run=_run_cle, phase="model",
            description="cross-layer equalization of conv/linear pairs (folds BatchNorm first)"),
)
