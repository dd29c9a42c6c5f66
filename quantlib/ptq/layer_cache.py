"""Layer-by-layer activation caches for PTQ passes that reconstruct one layer at a time.

:func:`stream_layers` runs a simulated model (``QuantSim.model``) and a float reference with the
same graph node by node over a fixed set of cached samples. When it reaches a selected weight
layer it hands the callback that layer's cached inputs (from the quantized model as optimized so
far, the AIMET AdaRound default, or from the float reference), the float reference's inputs, and
its float outputs (the reconstruction targets). The callback may change the layer (new weights, frozen encodings); the
quantized stream then continues with the changed layer, so every later layer sees the inputs the
final model will give it. Each node is computed once per model (cost: about one forward pass of
each model over the cached samples), unlike re-running the model prefix for every layer.

Memory bound: only the live frontier of the graph is kept (a value is dropped once its last user
has run) and only nodes that lead to a selected layer are computed. All cached values live in a
:class:`~quantlib.ptq.chunk_store.ChunkStore`: at most ``max_resident_bytes`` of them stay in memory and the rest are spilled
to ``.npy`` files that are read back through memory maps (so a random crop of a spilled chunk
reads only the pages it needs). Peak memory is therefore ``max_resident_bytes`` plus the working
set of one chunk: the inputs and output of one node for ``batch_size`` samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from .chunk_store import CachedChunks, ChunkStore
from .layer_pairs import activation_of
from .regions import NodeRunner, Region, RegionData, layer_regions
from .pass_config import PassConfigError, check_int, check_positive


CROP_VIEW_SCALE = (0.35, 1.0)  # area fraction range of CacheConfig.crop_views


@dataclass(frozen=True)
class CacheConfig:
    """How many samples a layer-wise pass caches and how much memory the cache may hold.

    Attributes:
        num_samples: samples taken (in order) from the data; fewer if the data runs out.
        batch_size: samples per cached chunk (also the optimization mini-batch of AdaRound/AdaQuant).
        max_resident_mb: memory budget in MiB for cached activations; the rest is spilled to disk.
        spill_dir: folder for spilled chunks (a temporary folder is made inside it and removed
            afterwards); None uses the system temporary folder.
        mirror: also cache every sample mirrored along its last axis (left-right for images):
            twice the data for models whose task is unchanged by a mirror, at twice the cache
            memory and caching time.
        crop_views: also cache this many random views of every image sample (a random crop of
            :data:`CROP_VIEW_SCALE` of its area and aspect ratio 3/4 to 4/3, resized back to the
            input size, mirrored with probability 1/2; torchvision's RandomResizedCrop and
            RandomHorizontalFlip), drawn with ``seed``: ``1 + crop_views`` times the data, cache
            memory and caching time. Needs 4-D (N, C, H, W) inputs.
        seed: seeds the crop views.
    """

    num_samples: int = 256
    batch_size: int = 32
    max_resident_mb: float = 1024.0
    spill_dir: str | None = None
    mirror: bool = False
    crop_views: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("num_samples", self.num_samples, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("crop_views", self.crop_views, 0)
        check_positive("max_resident_mb", self.max_resident_mb, allow_zero=True)


@dataclass
class LayerData(CachedChunks):
    """The cached data of one weight layer, as handed to a :func:`stream_layers` callback.

    Chunk ``i`` holds ``batch_size`` samples: ``inputs(i)`` is what the layer receives (its first
    argument), ``float_inputs(i)`` what the float reference layer receives for the same samples
    (the same tensors when the layer's inputs come from the reference) and ``targets(i)`` the
    float reference layer's output.
    ``activation`` is the ReLU/ReLU6/clip applied to the layer's output next in the graph (as a
    function that leaves its input alone), or None (see :func:`following_activation`).
    """

    name: str
    module: nn.Module
    store: ChunkStore
    input_key: str
    target_key: str
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None
    float_input_key: str | None = None

    def __post_init__(self) -> None:
        if self.float_input_key is None:
            self.float_input_key = self.input_key


@dataclass(frozen=True, eq=False)
class _Clip:
    """``clamp(x, low, high)`` without touching ``x``; tensor bounds (one per channel) are viewed
    along dim 1, the channel axis of conv and linear outputs."""

    low: float | torch.Tensor
    high: float | torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.low, torch.Tensor) and not isinstance(self.high, torch.Tensor):
            return torch.clamp(x, self.low, self.high)
        # torch.clamp takes two numbers or two tensors: a scalar bound next to a tensor one becomes a tensor
        return torch.clamp(x, self._bound(self.low, x), self._bound(self.high, x))

    @staticmethod
    def _bound(bound: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(bound, torch.Tensor):
            return torch.tensor(bound, dtype=x.dtype, device=x.device)
        shape = (-1,) + (1,) * (x.dim() - 2) if x.dim() >= 2 else (-1,)
        return bound.to(x).reshape(shape)


def following_activation(node: fx.Node, modules: dict[str, nn.Module]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The ReLU or clip that is the only user of ``node``'s output, as a function that does not
    modify its argument (an in-place module would corrupt cached targets); None when the output
    goes anywhere else or the user is not a ReLU/clip. The AdaRound paper reconstructs layer
    outputs after this activation.

    Recognised as :func:`quantlib.ptq.layer_pairs.activation_of` does: ReLU, ReLU6, Hardtanh,
    and ``clamp`` with scalar or per-channel tensor bounds (what CLE leaves for a ReLU6).
    ``modules`` is ``dict(gm.named_modules())``; its ``""`` entry is where tensor bounds are read.
    """
    users = list(node.users)
    if len(users) != 1 or not users[0].args or users[0].args[0] is not node:
        return None
    activation = activation_of(users[0], modules)
    if activation is None:
        return None
    if activation.kind == "relu":
        return F.relu
    if activation.is_clip:
        return _Clip(activation.low, activation.high)
    return None


def collect_samples(data: Iterable, config: CacheConfig, device: torch.device) -> list[torch.Tensor]:
    """The first ``config.num_samples`` inputs of ``data`` as chunks of ``config.batch_size``
    (followed by their mirror images when ``config.mirror``, then by ``config.crop_views`` random
    views of each, see :func:`random_crop_views`).

    ``data`` yields input tensors or (input, label) pairs (a DataLoader, a list of batches).
    Raises :class:`PassConfigError` when it yields nothing.
    """
    pieces: list[torch.Tensor] = []
    count = 0
    for batch in data:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(inputs, torch.Tensor):
            raise PassConfigError(f"data must yield tensors or (tensor, label) pairs, got {type(inputs).__name__}")
        inputs = inputs[: config.num_samples - count]
        pieces.append(inputs.detach().to(device))
        count += inputs.shape[0]
        if count >= config.num_samples:
            break
    if count == 0:
        raise PassConfigError("data is empty; give at least one batch of calibration inputs")
    inputs = torch.cat(pieces)
    originals = inputs
    if config.mirror:
        inputs = torch.cat([inputs, originals.flip(-1)])
    if config.crop_views:
        inputs = torch.cat([inputs, random_crop_views(originals, config.crop_views, config.seed)])
    return list(inputs.split(config.batch_size))


def random_crop_views(images: torch.Tensor, views: int, seed: int) -> torch.Tensor:
    """``views`` random resized crops (with random mirroring) of every image of ``images``
    (N, C, H, W), at the input size, view by view: ``views * N`` images. The global RNG is
    left as it was."""
    if images.dim() != 4:
        raise PassConfigError(f"crop_views needs image inputs shaped (N, C, H, W); the data gave shape {tuple(images.shape)}")
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomResizedCrop(tuple(images.shape[-2:]), scale=CROP_VIEW_SCALE, antialias=True),
                            v2.RandomHorizontalFlip()])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.cat([torch.stack([transform(image) for image in images]) for _ in range(views)])


def stream_layers(model: fx.GraphModule, reference: fx.GraphModule, samples: list[torch.Tensor],
                  layers: list[str], on_layer: Callable[[LayerData], None], store: ChunkStore, *,
                  reference_inputs: bool = False, progress: bool = False, desc: str = "layers") -> None:
    """Visit ``layers`` (module names of ``model``) in graph order with their cached data.

    Args:
        model: the simulated model; the quantized inputs of each layer come from it.
        reference: the float reference, a copy of ``model``'s graph (same node names) whose
            quantizers are disabled; the reconstruction targets come from it.
        samples: input chunks (see :func:`collect_samples`).
        layers: names of call_module targets to visit; each must be called exactly once.
        on_layer: called with a :class:`LayerData` before the layer's quantized output is
            computed; may modify the layer in place.
        store: where cached values live (see the module docstring for the memory bound).
        reference_inputs: give layers the float reference's inputs instead of the quantized ones.

    Nothing is returned; ``model`` is changed only by what ``on_layer`` does.
    """
    modules = dict(model.named_modules())

    def visit(data: RegionData) -> None:
        node = data.region.output
        on_layer(LayerData(name=str(node.target), module=data.modules[str(node.target)], store=store,
                           input_key=data.input_key, target_key=data.target_key,
                           activation=following_activation(node, modules), float_input_key=data.float_input_key))

    stream_regions(model, reference, samples, layer_regions(model, layers), visit, store,
                   reference_inputs=reference_inputs, progress=progress, desc=desc)


def stream_regions(model: fx.GraphModule, reference: fx.GraphModule, samples: list[torch.Tensor],
                   regions: list[Region], on_region: Callable[[RegionData], None], store: ChunkStore, *,
                   reference_inputs: bool = False, progress: bool = False, desc: str = "layers") -> None:
    """Visit ``regions`` of ``model`` (:mod:`quantlib.ptq.regions`, in graph order) with their
    cached data: what :func:`stream_layers` does for single layers, for regions of any size.

    ``on_region`` gets a :class:`~quantlib.ptq.regions.RegionData` after the float reference has
    computed the region and before the quantized model does; it may modify the region's layers.
    """
    nodes = list(model.graph.nodes)
    ref_nodes = {n.name: n for n in reference.graph.nodes}
    if [n.name for n in nodes] != list(ref_nodes):
        raise ValueError("reference must have the same graph as model (build it with fp32_reference(sim))")
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"layer-wise passes support models with one input; this one has {len(placeholders)}")
    region_at = {region.nodes[0]: region for region in regions}
    inside = {node for region in regions for node in region.nodes}
    needed = _ancestors(list(inside))
    index = {n: i for i, n in enumerate(nodes)}
    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        if node in needed or node in inside:
            for arg in node.all_input_nodes:
                last_use[arg] = max(last_use.get(arg, -1), index[node])
    quant_runner, ref_runner = NodeRunner(model), NodeRunner(reference)
    streams = ((ref_runner, "r:"),) if reference_inputs else ((quant_runner, "q:"), (ref_runner, "r:"))
    num_chunks = len(samples)
    for chunk in samples:
        store.append("input", chunk)

    def key(node: fx.Node, prefix: str) -> str:
        return "input" if node.op == "placeholder" else prefix + node.name

    def fetcher(runner: NodeRunner, prefix: str, chunk: int) -> Callable[[fx.Node], Any]:
        def fetch(node: fx.Node) -> Any:
            if node.op == "get_attr":
                return runner.attr(node.target)
            return store.get(key(node, prefix), chunk)
        return fetch

    def compute(node: fx.Node, runner: NodeRunner, prefix: str) -> None:
        target_node = node if runner is quant_runner else ref_nodes[node.name]
        for chunk in range(num_chunks):
            store.append(prefix + node.name, runner.run(target_node, fetcher(runner, prefix, chunk)))

    def release(node: fx.Node) -> None:
        for arg in node.all_input_nodes:
            if last_use.get(arg) == index[node]:
                store.drop("q:" + arg.name)
                store.drop("r:" + arg.name)

    bar = tqdm(total=len(regions), desc=desc, disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for node in nodes:
                if node.op in ("placeholder", "get_attr", "output"):
                    continue
                if node in region_at:
                    region = region_at[node]
                    for member in region.nodes:  # the float outputs: reconstruction targets
                        compute(member, ref_runner, "r:")
                    prefix = "r:" if reference_inputs else "q:"
                    on_region(RegionData(region=region, runner=quant_runner, store=store,
                                         input_key=key(region.input, prefix), float_input_key=key(region.input, "r:"),
                                         target_key="r:" + region.output.name))
                    members = set(region.nodes)
                    feeds_later = any(user not in members and (user in needed or user in inside)
                                      for member in region.nodes for user in member.users)
                    if feeds_later and not reference_inputs:
                        for member in region.nodes:
                            compute(member, quant_runner, "q:")
                    for member in region.nodes:
                        if member not in needed:  # read by no later node
                            store.drop("r:" + member.name)
                            store.drop("q:" + member.name)
                        release(member)
                    bar.update(1)
                elif node in inside:
                    continue  # computed with its region
                else:
                    if node in needed:
                        for runner, prefix in streams:
                            compute(node, runner, prefix)
                    release(node)
    finally:
        bar.close()
        store.drop("input")
        for node in nodes:
            store.drop("q:" + node.name)
            store.drop("r:" + node.name)


def _ancestors(calls: list[fx.Node]) -> set[fx.Node]:
    """Nodes whose values are needed to compute the inputs of ``calls`` (the calls' own outputs
    are included only when a later call needs them)."""
    needed: set[fx.Node] = set()
    stack = [arg for call in calls for arg in call.all_input_nodes]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    return needed
