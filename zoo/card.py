"""Model cards: validated, frozen descriptions of every model in the zoo.

A :class:`ModelCard` says everything needed to rebuild, load, evaluate and cite
a model, in the spirit of torchvision's ``Weights`` records:

* :class:`ArchitectureSource` -- how to build the (randomly initialised)
  network: ``timm`` / ``torchvision`` by name, or a ``local`` callable
  ``"module.path:callable"``;
* :class:`WeightsSource` -- where the fp32 checkpoint lives (a URL fetched into
  the cache, a file shipped inside an installed package, or a file shipped in
  ``zoo/weights/``) and its sha256, which is verified on every load;
* :class:`PreprocessingSpec` -- how an image becomes the input tensor (the
  same fields as ``evaluators.Preprocessing``, see :meth:`PreprocessingSpec.as_kwargs`);
* :class:`PublishedResult` / :class:`PublishedArtifact` -- cited reference
  numbers, and optimized artifacts that ``quantzoo download MODEL/RECIPE``
  fetches from ``hub_base_url + <model>/<recipe>/<filename>``;
* :class:`TrainingRecipe` -- for models trained by ``quantzoo train``.

Every dataclass validates itself in ``__post_init__`` and raises
:class:`CardError` (a ``ValueError``) naming the offending field, e.g.
``weights.sha256 must be 64 hex characters``. :class:`ModelCard` re-checks
its parts and prefixes every message with the card name
(``card mnist_cnn: weights.sha256 must be 64 hex characters, got 'abc'``), as
does :meth:`ModelCard.from_dict`. :meth:`ModelCard.to_dict` is
JSON-serializable and round-trips through :meth:`ModelCard.from_dict`.

This module imports neither torch nor anything heavy.

The parts live in their own modules -- :mod:`zoo.card_fields` (CardError and
the field validators), :mod:`zoo.card_preprocessing`, :mod:`zoo.card_sources`,
:mod:`zoo.card_published` and :mod:`zoo.card_training` -- and every public
name is re-exported here, so ``from zoo.card import ...`` is the one import.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from zoo.card_fields import (
    NAME_RE,
    CardError,
    check_choice,
    check_int,
    check_str,
    check_url,
    fail,
    from_mapping,
    set_field,
    str_tuple,
)
from zoo.card_preprocessing import INTERPOLATIONS, PreprocessingSpec
from zoo.card_published import ARTIFACT_KINDS, PublishedArtifact, PublishedResult
from zoo.card_sources import (
    ARCHITECTURE_KINDS,
    KEY_MAPPINGS,
    WEIGHT_EXTENSIONS,
    ArchitectureSource,
    WeightsSource,
)
from zoo.card_training import OPTIMIZERS, TrainingRecipe

__all__ = [
    "ARCHITECTURE_KINDS",
    "ARTIFACT_KINDS",
    "CardError",
    "DATASETS",
    "DEFAULT_HUB_BASE_URL",
    "INTERPOLATIONS",
    "KEY_MAPPINGS",
    "NATIVE_INPUT_SIZES",
    "OPTIMIZERS",
    "TASKS",
    "TRAINABLE_DATASETS",
    "WEIGHT_EXTENSIONS",
    "ArchitectureSource",
    "ModelCard",
    "PreprocessingSpec",
    "PublishedArtifact",
    "PublishedResult",
    "TrainingRecipe",
    "WeightsSource",
]

TASKS: tuple[str, ...] = ("classification",)
#: evaluators dataset names a card may be evaluated on.
DATASETS: tuple[str, ...] = ("digits", "imagenet_sample", "mnist")
#: datasets ``quantzoo train`` can train on (read by :mod:`zoo.training_data`).
TRAINABLE_DATASETS: tuple[str, ...] = ("digits", "mnist")
#: native (C, H, W) of the array datasets, used when a card neither resizes nor crops.
NATIVE_INPUT_SIZES: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {"mnist": (1, 28, 28), "digits": (1, 8, 8)}
)
DEFAULT_HUB_BASE_URL = "https://huggingface.co/quantzoo/zoo/resolve/main/"


_PARTS: tuple[tuple[str, type], ...] = (
    ("architecture", ArchitectureSource),
    ("preprocessing", PreprocessingSpec),
    ("weights", WeightsSource),
)


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to build, load, evaluate and cite one zoo model.

    ``name``: lowercase id (``[a-z0-9][a-z0-9_.-]*``); ``task``:
    ``"classification"``; ``input_size``: ``(C, H, W)`` with ``C ==
    preprocessing.in_chans`` and ``H == W == crop`` when cropping;
    ``dataset``: the evaluators dataset name the model is evaluated on;
    ``training_dataset``: free text naming what it was trained on.
    """

    name: str
    task: str
    architecture: ArchitectureSource
    num_classes: int
    input_size: tuple[int, int, int]
    preprocessing: PreprocessingSpec
    weights: WeightsSource
    dataset: str
    license: str
    training_dataset: str
    published: tuple[PublishedResult, ...] = ()
    artifacts: tuple[PublishedArtifact, ...] = ()
    hub_base_url: str = DEFAULT_HUB_BASE_URL
    tags: tuple[str, ...] = ()
    description: str = ""
    training: TrainingRecipe | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise CardError(
                f"card {self.name!r}: name must be lowercase letters, digits, '_', '.', '-' "
                "(starting with a letter or digit)"
            )
        try:
            self._validate()
        except CardError as exc:
            raise CardError(f"card {self.name}: {exc}") from None

    def _validate(self) -> None:
        check_choice("task", self.task, TASKS)
        for name, cls in _PARTS:
            part = getattr(self, name)
            if not isinstance(part, cls):
                fail(name, f"must be a {cls.__name__}, got {type(part).__name__}")
            part._validate(name)
        check_int("num_classes", self.num_classes, minimum=2)
        size = self.input_size
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size)
        ):
            fail("input_size", f"must be (C, H, W) positive integers, got {size!r}")
        set_field(self, "input_size", tuple(size))
        pre = self.preprocessing
        if self.input_size[0] != pre.in_chans:
            fail(
                "input_size",
                f"has {self.input_size[0]} channel(s) but preprocessing.in_chans is {pre.in_chans}",
            )
        if pre.crop is not None and self.input_size[1:] != (pre.crop, pre.crop):
            fail("input_size", f"{self.input_size} does not match preprocessing.crop={pre.crop}")
        check_choice("dataset", self.dataset, DATASETS)
        native = NATIVE_INPUT_SIZES.get(self.dataset)
        if native is not None and pre.resize is None and pre.crop is None and self.input_size != native:
            fail(
                "input_size",
                f"{self.input_size} does not match the native {self.dataset} size {native} "
                "(set preprocessing.resize/crop to change it)",
            )
        if native is None and pre.crop is None:
            fail("preprocessing.crop", f"must be set for {self.dataset} (images have varying sizes)")
        check_str("license", self.license)
        check_str("training_dataset", self.training_dataset)
        set_field(self, "published", self._tuple_of("published", self.published, PublishedResult))
        set_field(self, "artifacts", self._tuple_of("artifacts", self.artifacts, PublishedArtifact))
        seen: set[tuple[str, str, str]] = set()
        for result in self.published:
            key = (result.recipe, result.metric, result.dataset)
            if key in seen:
                fail("published", f"lists {key} twice")
            seen.add(key)
        names: set[tuple[str, str]] = set()
        for artifact in self.artifacts:
            if (artifact.recipe, artifact.filename) in names:
                fail("artifacts", f"lists {artifact.recipe}/{artifact.filename} twice")
            names.add((artifact.recipe, artifact.filename))
        check_url("hub_base_url", self.hub_base_url)
        if not self.hub_base_url.endswith("/"):
            set_field(self, "hub_base_url", self.hub_base_url + "/")
        set_field(self, "tags", str_tuple("tags", self.tags))
        check_str("description", self.description, allow_empty=True)
        if self.training is not None:
            if not isinstance(self.training, TrainingRecipe):
                fail("training", f"must be a TrainingRecipe or None, got {type(self.training).__name__}")
            self.training._validate("training")
            if self.dataset not in TRAINABLE_DATASETS:
                fail("training", f"is only supported for datasets {list(TRAINABLE_DATASETS)}, not {self.dataset!r}")

    @staticmethod
    def _tuple_of(where: str, values: Any, cls: type) -> tuple:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            fail(where, f"must be a sequence of {cls.__name__}, got {type(values).__name__}")
        out = []
        for i, value in enumerate(values):
            if not isinstance(value, cls):
                fail(f"{where}[{i}]", f"must be a {cls.__name__}, got {type(value).__name__}")
            value._validate(f"{where}[{i}]")
            out.append(value)
        return tuple(out)

    # ----------------------------------------------------------------- helpers

    @property
    def trainable(self) -> bool:
        """True when the card has a :class:`TrainingRecipe` (``quantzoo train`` can rebuild it)."""
        return self.training is not None

    @property
    def recipes(self) -> tuple[str, ...]:
        """Sorted recipe names that have published results or artifacts."""
        return tuple(sorted({r.recipe for r in self.published} | {a.recipe for a in self.artifacts}))

    def published_result(self, recipe: str, metric: str = "top1") -> PublishedResult | None:
        """The first published result for ``recipe`` / ``metric``, or None."""
        for result in self.published:
            if result.recipe == recipe and result.metric == metric:
                return result
        return None

    def artifacts_for(self, recipe: str) -> tuple[PublishedArtifact, ...]:
        """The published artifacts of ``recipe`` (empty when none)."""
        return tuple(a for a in self.artifacts if a.recipe == recipe)

    def artifact_relative_path(self, artifact: PublishedArtifact) -> str:
        """``<model>/<recipe>/<filename>``: the path under ``hub_base_url`` and in the cache."""
        return f"{self.name}/{artifact.recipe}/{artifact.filename}"

    def artifact_url(self, artifact: PublishedArtifact) -> str:
        """``hub_base_url + <model>/<recipe>/<filename>``."""
        return self.hub_base_url + urllib.parse.quote(self.artifact_relative_path(artifact), safe="/")

    def weights_relative_path(self) -> str:
        """``weights/<model>/<filename>``: where url-sourced (and trained) weights live in the cache."""
        return f"weights/{self.name}/{self.weights.filename}"

    def with_weights(self, **changes: Any) -> ModelCard:
        """A copy whose :class:`WeightsSource` has ``changes`` applied (validated)."""
        return replace(self, weights=replace(self.weights, **changes))

    # ----------------------------------------------------------------- (de)serialization

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (for ``quantzoo show`` and run records)."""
        return {
            "name": self.name,
            "task": self.task,
            "architecture": self.architecture.to_dict(),
            "num_classes": self.num_classes,
            "input_size": list(self.input_size),
            "preprocessing": self.preprocessing.to_dict(),
            "weights": self.weights.to_dict(),
            "dataset": self.dataset,
            "license": self.license,
            "training_dataset": self.training_dataset,
            "published": [r.to_dict() for r in self.published],
            "artifacts": [a.to_dict() for a in self.artifacts],
            "hub_base_url": self.hub_base_url,
            "tags": list(self.tags),
            "description": self.description,
            "training": None if self.training is None else self.training.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Rebuild a card from :meth:`to_dict` output; errors name the card and field."""
        if not isinstance(data, Mapping):
            raise CardError(f"a model card must be a mapping, got {type(data).__name__}")
        name = data.get("name", "<unnamed>")
        try:
            kwargs = dict(data)
            for key, part_cls in _PARTS:
                if key in kwargs:
                    kwargs[key] = from_mapping(part_cls, kwargs[key], key)
            if kwargs.get("training") is not None:
                kwargs["training"] = from_mapping(TrainingRecipe, kwargs["training"], "training")
            for key, part_cls in (("published", PublishedResult), ("artifacts", PublishedArtifact)):
                if key in kwargs:
                    values = kwargs[key]
                    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
                        fail(key, f"must be a list, got {type(values).__name__}")
                    kwargs[key] = tuple(
                        from_mapping(part_cls, v, f"{key}[{i}]") for i, v in enumerate(values)
                    )
            card = from_mapping(cls, kwargs, "model card")
        except CardError as exc:
            message = str(exc)
            prefix = f"card {name}: "
            raise CardError(message if message.startswith(prefix) else prefix + message) from None
        return card
