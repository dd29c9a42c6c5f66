"""Shared driver of the layer-wise reconstruction passes (AdaRound, AdaQuant).

:func:`run_layerwise` selects the weight layers of a calibrated QuantSim, caches samples, builds
the float reference (:func:`~quantlib.ptq.quantizer_groups.fp32_reference`) and streams the
layers in graph order (:func:`~quantlib.ptq.layer_cache.stream_layers`), calling a per-layer
function that optimizes and rewrites one layer. :class:`LayerwiseConfig` holds the settings every
such pass shares; the passes' configs extend it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..quantsim import QuantSim
from ..threads import torch_threads
from .chunk_store import CachedChunks, ChunkStore
from .layer_cache import CacheConfig, LayerData, collect_samples, stream_layers, stream_regions
from .output_fisher import output_fisher_weights
from .pass_config import PassConfigError, check_choice, check_int
from .quantizer_groups import fp32_reference, select
from .regions import RegionData, block_regions

INPUT_SOURCES = ("quantized", "fp32")
R = TypeVar("R")


@dataclass(frozen=True)
class LayerwiseConfig:
    """Settings shared by the layer-wise passes.

    Attributes:
        num_samples: samples cached per layer (the first ones the data yields).
        batch_size: samples per cached chunk; each optimization step uses one random chunk.
        crop: output window side for convolutions (a random window per step, see
            :class:`~quantlib.ptq.layer_ops.ReconstructionBatches`); None uses whole feature maps.
        max_cache_mb: memory budget of the activation cache in MiB (the rest spills to disk).
        spill_dir: folder for spilled chunks; None uses the system temporary folder.
        mirror: also cache every sample mirrored left-right (see :class:`CacheConfig`).
        crop_views: also cache this many random resized crops of every image sample (see
            :class:`CacheConfig`); with ``seed``.
        input_source: "quantized" (inputs from the quantized model as optimized so far, the AIMET
            default) or "fp32" (inputs from the float model).
        input_drop: QDrop (Wei et al. 2022): during the optimization each element of a layer's
            quantized input is replaced by the float model's input with this probability (0.5
            in the paper); 0 (the default) leaves the quantized inputs alone. Needs
            ``input_source="quantized"``; the comparison with round-to-nearest after the
            optimization always uses the quantized inputs the final model gives the layer.
        holdout_chunks: the last this many cached chunks (``batch_size`` samples each, the last
            samples the data yields) are left out of the optimization and serve as held-out
            calibration data: a pass reports its reconstruction error on them and makes its
            keep/select decisions on them (AdaRound's ``keep_nearest_if_worse``, AdaQuant's best
            iterate) instead of on the first chunk it was fitted on. 0 (the default) fits on every
            chunk. At least one chunk must be left to fit on.
        include, exclude: fnmatch globs over weight module names selecting the layers.
        seed: seeds the mini-batch order.
        through_activation: measure the reconstruction error after the ReLU/ReLU6/clip that
            follows a layer, where there is one (Nagel et al. 2020, section 4: errors the
            activation removes do not count).
        optimizer_threads: torch intra-op threads while a layer is optimized (restored afterwards;
            None leaves torch's setting). One step works on a small window of one chunk, where
            thread synchronization costs more than it saves: on a busy 2-core machine one
            thread ran a small conv step 100x faster than two. Caching passes keep torch's setting.
    """

    num_samples: int = 256
    batch_size: int = 32
    crop: int | None = None
    max_cache_mb: float = 1024.0
    spill_dir: str | None = None
    mirror: bool = False
    crop_views: int = 0
    input_source: str = "quantized"
    input_drop: float = 0.0
    holdout_chunks: int = 0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    seed: int = 0
    through_activation: bool = True
    optimizer_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.crop is not None:
            check_int("crop", self.crop, 1)
        if self.optimizer_threads is not None:
            check_int("optimizer_threads", self.optimizer_threads, 1)
        check_choice("input_source", self.input_source, INPUT_SOURCES)
        if not isinstance(self.input_drop, (int, float)) or not 0.0 <= self.input_drop <= 1.0:
            raise PassConfigError(f"input_drop={self.input_drop!r} must be a probability in [0, 1] (QDrop uses 0.5)")
        if self.input_drop > 0 and self.input_source != "quantized":
            raise PassConfigError(f"input_drop={self.input_drop} mixes float inputs into quantized ones; "
                                  f"it needs input_source='quantized', not {self.input_source!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise PassConfigError(f"{name}={value!r} must be a list of glob patterns over module names, e.g. ['*']")
        self.cache_config()
        self._check_holdout()

    def _check_holdout(self) -> None:
        check_int("holdout_chunks", self.holdout_chunks, 0)
        if self.holdout_chunks == 0:
            return
        if self.mirror:
            raise PassConfigError(f"holdout_chunks={self.holdout_chunks} with mirror=true would hold out mirror images of "
                                  "samples that are fitted on; set mirror=false or holdout_chunks=0")
        if self.crop_views:
            raise PassConfigError(f"holdout_chunks={self.holdout_chunks} with crop_views={self.crop_views} would hold out "
                                  "crops of samples that are fitted on; set crop_views=0 or holdout_chunks=0")
        cached_chunks = -(-self.num_samples // self.batch_size)
        if self.holdout_chunks >= cached_chunks:
            raise PassConfigError(f"holdout_chunks={self.holdout_chunks} leaves nothing to fit on: num_samples="
                                  f"{self.num_samples} with batch_size={self.batch_size} caches {cached_chunks} chunks; "
                                  f"lower holdout_chunks or raise num_samples")

    def cache_config(self) -> CacheConfig:
        """The :class:`CacheConfig` these settings describe."""
        try:
            return CacheConfig(num_samples=self.num_samples, batch_size=self.batch_size,
                               max_resident_mb=self.max_cache_mb, spill_dir=self.spill_dir, mirror=self.mirror,
                               crop_views=self.crop_views, seed=self.seed)
        except PassConfigError as err:
            raise PassConfigError(str(err).replace("max_resident_mb", "max_cache_mb")) from None


@dataclass
class LayerwiseStats:
    """Totals of one layer-wise run."""

    num_samples: int
    seconds: float
    peak_cache_mb: float
    spilled_mb: float

    def to_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "seconds": round(self.seconds, 3),
                "peak_cache_mb": round(self.peak_cache_mb, 1), "spilled_mb": round(self.spilled_mb, 1)}


def loss_activation(layer: LayerData, config: LayerwiseConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation the reconstruction error is measured after (None: the layer's own output)."""
    return layer.activation if config.through_activation else None


def fit_and_holdout(data: CachedChunks, holdout_chunks: int) -> tuple[int, tuple[int, ...]]:
    """(number of chunks to fit on, indices of the held-out chunks) of one layer's or region's
    cache: the last ``holdout_chunks`` chunks are held out. Raises :class:`PassConfigError` when
    the data gave too few samples to leave a chunk to fit on."""
    total = data.num_chunks
    if holdout_chunks >= total:
        raise PassConfigError(f"holdout_chunks={holdout_chunks} leaves nothing to fit on: the calibration data filled "
                              f"only {total} chunks; lower holdout_chunks or give more calibration samples")
    return total - holdout_chunks, tuple(range(total - holdout_chunks, total))


def selected_layers(sim: QuantSim, config: LayerwiseConfig, method: str) -> list[str]:
    """Weight modules a pass will optimize: integer, enabled, calibrated, matching the globs."""
    chosen = []
    modules = sim.weight_modules()
    for name in select(modules, config.include, config.exclude):
        wq = modules[name].weight_quantizer
        if not wq.spec.enabled or wq.spec.is_float:
            continue
        if not wq.has_encoding:
            raise PassConfigError(f"weight quantizer {name}.weight has no encoding; run sim.calibrate(data) before {method}")
        chosen.append(name)
    return chosen


def run_layerwise(sim: QuantSim, data: Iterable, config: LayerwiseConfig,
                  layer_fn: Callable[[LayerData, torch.Generator], R] | Callable[[RegionData, torch.Generator], R],
                  *, method: str, progress: bool = True, blocks: bool = False,
                  fisher_samples: int = 0) -> tuple[list[R], LayerwiseStats]:
    """Call ``layer_fn(layer_data, generator)`` on every selected layer of ``sim``, in graph order;
    with ``blocks``, ``layer_fn(region_data, generator)`` on every BRECQ block of the selected
    layers instead (:func:`~quantlib.ptq.regions.block_regions`). With ``blocks`` and
    ``fisher_samples`` >= 1, each block's data carries output weights from the float model's
    output Fisher, estimated with that many sampled labels per sample
    (:func:`~quantlib.ptq.output_fisher.output_fisher_weights`).

    ``layer_fn`` may rewrite the layers it is given; later ones then see their new outputs.
    Returns the per-layer (per-block) results and the run's totals.
    """
    start = time.perf_counter()
    names = selected_layers(sim, config, method)
    sim.model.eval()
    device = next(sim.model.parameters()).device
    cache = config.cache_config()
    samples = collect_samples(data, cache, device)
    reference = fp32_reference(sim)
    generator = torch.Generator().manual_seed(config.seed)
    results: list[R] = []
    with ChunkStore(int(cache.max_resident_mb * 2**20), cache.spill_dir) as store:
        if names:
            def visit(item: LayerData | RegionData) -> None:
                if isinstance(item, RegionData) and "f:" + item.region.output.name in store:
                    item.weight_key = "f:" + item.region.output.name
                with torch_threads(config.optimizer_threads):
                    results.append(layer_fn(item, generator))
                if isinstance(item, RegionData) and item.weight_key is not None:
                    store.drop(item.weight_key)

            reference_inputs = config.input_source == "fp32"
            if blocks:
                regions = block_regions(sim.model, names)
                if fisher_samples:
                    outputs = [region.output.name for region in regions]
                    fisher = output_fisher_weights(reference, samples, outputs, fisher_samples,
                                                   torch.Generator().manual_seed(config.seed))
                    for name, chunks in fisher.items():
                        for chunk in chunks:
                            store.append("f:" + name, chunk)
                    del fisher
                stream_regions(sim.model, reference, samples, regions, visit, store,
                               reference_inputs=reference_inputs, progress=progress, desc=method)
            else:
                stream_layers(sim.model, reference, samples, names, visit, store,
                              reference_inputs=reference_inputs, progress=progress, desc=method)
        peak, spilled = store.peak_resident_bytes, store.spilled_bytes
    stats = LayerwiseStats(num_samples=sum(s.shape[0] for s in samples), seconds=time.perf_counter() - start,
                           peak_cache_mb=peak / 2**20, spilled_mb=spilled / 2**20)
    return results, stats
