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
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any

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
INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear", "nearest")
ARCHITECTURE_KINDS: tuple[str, ...] = ("local", "timm", "torchvision")
KEY_MAPPINGS: tuple[str, ...] = ("by_name", "in_order")
ARTIFACT_KINDS: tuple[str, ...] = ("encodings", "onnx", "weights")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
WEIGHT_EXTENSIONS: tuple[str, ...] = (".safetensors", ".pt", ".pth", ".bin")
DEFAULT_HUB_BASE_URL = "https://huggingface.co/quantzoo/zoo/resolve/main/"

_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_SHA_TAG_RE = re.compile(r"-([0-9a-f]{8})((?:\.[A-Za-z0-9_]+)+)$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_DOTTED_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_LOCAL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_URL_SCHEMES = ("http", "https", "file")
# kwargs the builder passes itself; a card must not set them.
_RESERVED_ARCH_KWARGS = frozenset({"num_classes", "pretrained", "weights", "pretrained_cfg"})


class CardError(ValueError):
    """A model card (or one of its parts) is invalid; the message names the field."""


# --------------------------------------------------------------------------- helpers


def _fail(where: str, message: str) -> None:
    raise CardError(f"{where} {message}" if where else message)


def _check_str(where: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        _fail(where, f"must be a non-empty string, got {value!r}")
    return value


def _check_choice(where: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        _fail(where, f"must be one of {list(choices)}, got {value!r}")
    return value


def _check_int(where: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(where, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _check_number(where: str, value: Any, *, positive: bool = False, non_negative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(where, f"must be a finite number, got {value!r}")
    if positive and value <= 0:
        _fail(where, f"must be > 0, got {value!r}")
    if non_negative and value < 0:
        _fail(where, f"must be >= 0, got {value!r}")
    return float(value)


def _check_sha256(where: str, value: Any) -> str:
    if not isinstance(value, str) or not _SHA256_RE.match(value):
        _fail(where, f"must be 64 hex characters, got {value!r}")
    return value.lower()


def _check_filename(where: str, value: Any, *, extensions: Sequence[str] | None = None) -> str:
    _check_str(where, value)
    if "/" in value or "\\" in value or value in (".", "..") or value.startswith("."):
        _fail(where, f"must be a plain file name (no folders, not hidden), got {value!r}")
    if extensions is not None and not value.lower().endswith(tuple(extensions)):
        _fail(where, f"must end with one of {list(extensions)}, got {value!r}")
    return value


def _check_sha_tag(where: str, filename: str, sha256: str) -> None:
    """A torchvision-style tag ``<stem>-<8 hex>.<ext>`` must be the sha256 prefix."""
    match = _SHA_TAG_RE.search(filename)
    if match is not None and not sha256.startswith(match.group(1)):
        _fail(
            where,
            f"{filename!r} is tagged {match.group(1)} but sha256 starts with {sha256[:8]}; "
            "the file name and checksum must agree",
        )


def _check_relative_posix(where: str, value: Any) -> PurePosixPath:
    _check_str(where, value)
    rel = PurePosixPath(value)
    if rel.is_absolute() or ".." in rel.parts or "\\" in value or not rel.parts or value.endswith("/"):
        _fail(where, f"must be a relative POSIX path without '..', got {value!r}")
    return rel


def _check_url(where: str, value: Any) -> str:
    _check_str(where, value)
    parts = urllib.parse.urlsplit(value)
    if parts.scheme.lower() not in _URL_SCHEMES or (parts.scheme.lower() != "file" and not parts.netloc):
        _fail(where, f"must be an http://, https:// or file:// URL, got {value!r}")
    return value


def _float_tuple(where: str, values: Any) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        _fail(where, f"must be a sequence of numbers, got {values!r}")
    return tuple(_check_number(f"{where}[{i}]", v) for i, v in enumerate(values))


def _str_tuple(where: str, values: Any) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        _fail(where, f"must be a sequence of strings, got {values!r}")
    return tuple(_check_str(f"{where}[{i}]", v) for i, v in enumerate(values))


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _jsonable(value: Any) -> Any:
    """Plain JSON types for ``to_dict``: tuples become lists, mappings dicts."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _from_mapping(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are a CardError."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        _fail(where, f"must be a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        _fail(where, f"has unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = dict(data)
    for key in ("mean", "std", "published", "artifacts", "tags", "input_size"):
        if key in kwargs and isinstance(kwargs[key], list):
            kwargs[key] = tuple(kwargs[key])
    try:
        return cls(**kwargs)
    except TypeError as exc:  # missing required fields
        raise CardError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class PreprocessingSpec:
    """How an image becomes the model input (same semantics as ``evaluators.Preprocessing``).

    ``resize``: short-side size or ``None``; ``crop``: center-crop side or
    ``None``; ``interpolation``: bilinear / bicubic / nearest; ``mean`` /
    ``std``: one value per channel; ``in_chans``: 1 or 3.
    """

    resize: int | None
    crop: int | None
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int

    def __post_init__(self) -> None:
        self._validate("preprocessing")

    def _validate(self, where: str) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None:
                _check_int(f"{where}.{name}", value, minimum=1)
        _check_choice(f"{where}.interpolation", self.interpolation, INTERPOLATIONS)
        if self.in_chans not in (1, 3) or isinstance(self.in_chans, bool):
            _fail(f"{where}.in_chans", f"must be 1 or 3, got {self.in_chans!r}")
        mean = _float_tuple(f"{where}.mean", self.mean)
        std = _float_tuple(f"{where}.std", self.std)
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            _fail(
                f"{where}.mean/std",
                f"must have in_chans={self.in_chans} entries each, got {len(mean)} and {len(std)}",
            )
        if any(s <= 0 for s in std):
            _fail(f"{where}.std", f"entries must be > 0, got {list(std)}")
        _set(self, "mean", mean)
        _set(self, "std", std)

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``evaluators.Preprocessing(**spec.as_kwargs())``."""
        return {
            "resize": self.resize,
            "crop": self.crop,
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
            "in_chans": self.in_chans,
        }

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(self.as_kwargs())


@dataclass(frozen=True)
class ArchitectureSource:
    """How to build the randomly initialised network.

    ``kind="timm"``: ``timm.create_model(name, pretrained=False, num_classes=..., **kwargs)``;
    ``kind="torchvision"``: ``torchvision.models.get_model(name, weights=None, num_classes=..., **kwargs)``;
    ``kind="local"``: ``name`` is ``"module.path:callable"``, called as
    ``callable(num_classes=..., **kwargs)``. ``kwargs`` must be JSON-serializable
    and must not set ``num_classes`` / ``pretrained`` / ``weights``.
    """

    kind: str
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate("architecture")

    def _validate(self, where: str) -> None:
        _check_choice(f"{where}.kind", self.kind, ARCHITECTURE_KINDS)
        _check_str(f"{where}.name", self.name)
        if self.kind == "local" and not _LOCAL_RE.match(self.name):
            _fail(f"{where}.name", f"must be 'module.path:callable' for kind 'local', got {self.name!r}")
        if not isinstance(self.kwargs, Mapping):
            _fail(f"{where}.kwargs", f"must be a mapping, got {type(self.kwargs).__name__}")
        bad = sorted(k for k in self.kwargs if not isinstance(k, str) or k in _RESERVED_ARCH_KWARGS)
        if bad:
            _fail(f"{where}.kwargs", f"must not set {bad} (the builder passes num_classes itself)")
        try:
            frozen = json.loads(json.dumps(dict(self.kwargs), sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise CardError(f"{where}.kwargs must be JSON-serializable: {exc}") from None
        _set(self, "kwargs", MappingProxyType(frozen))

    def __hash__(self) -> int:
        return hash((self.kind, self.name, json.dumps(dict(self.kwargs), sort_keys=True)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ArchitectureSource):
            return NotImplemented
        return (self.kind, self.name, dict(self.kwargs)) == (other.kind, other.name, dict(other.kwargs))

    @property
    def module_and_attr(self) -> tuple[str, str]:
        """``("module.path", "callable")`` of a local architecture (ValueError otherwise)."""
        if self.kind != "local":
            raise ValueError(f"architecture kind {self.kind!r} has no module path")
        module, attr = self.name.split(":")
        return module, attr

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "kwargs": _jsonable(self.kwargs)}


@dataclass(frozen=True)
class WeightsSource:
    """Where the fp32 checkpoint lives; exactly one of ``url`` / ``package_resource`` / ``path``.

    * ``url``: full URL of the file (must end with ``/<filename>``); fetched
      into ``<cache>/weights/<card name>/<filename>``;
    * ``package_resource``: ``"importable_module:relative/path"`` inside an
      installed distribution (resolved with :mod:`importlib.resources`);
    * ``path``: relative to the ``zoo/weights/`` folder shipped with quantzoo.

    ``sha256`` (64 hex) is verified on every load. ``key_mapping="in_order"``
    maps the checkpoint's tensors, in file order, onto the architecture's
    ``state_dict`` keys (shapes are checked one by one); ``"by_name"`` loads
    by key, strictly.
    """

    sha256: str
    filename: str
    url: str | None = None
    package_resource: str | None = None
    path: str | None = None
    key_mapping: str = "by_name"

    def __post_init__(self) -> None:
        self._validate("weights")

    def _validate(self, where: str) -> None:
        _set(self, "sha256", _check_sha256(f"{where}.sha256", self.sha256))
        _check_filename(f"{where}.filename", self.filename, extensions=WEIGHT_EXTENSIONS)
        _check_sha_tag(f"{where}.filename", self.filename, self.sha256)
        _check_choice(f"{where}.key_mapping", self.key_mapping, KEY_MAPPINGS)
        given = [n for n in ("url", "package_resource", "path") if getattr(self, n) is not None]
        if len(given) != 1:
            _fail(
                where,
                f"must set exactly one of url / package_resource / path, got {given or 'none'}",
            )
        if self.url is not None:
            _check_url(f"{where}.url", self.url)
            if urllib.parse.unquote(urllib.parse.urlsplit(self.url).path).rsplit("/", 1)[-1] != self.filename:
                _fail(f"{where}.url", f"must end with '/{self.filename}' (the filename), got {self.url!r}")
        if self.package_resource is not None:
            module, sep, rel = self.package_resource.partition(":")
            if not sep or not _DOTTED_RE.match(module):
                _fail(
                    f"{where}.package_resource",
                    f"must be 'importable_module:relative/path', got {self.package_resource!r}",
                )
            rel_path = _check_relative_posix(f"{where}.package_resource", rel)
            if rel_path.name != self.filename:
                _fail(f"{where}.package_resource", f"must name the file {self.filename!r}, got {rel!r}")
        if self.path is not None:
            rel_path = _check_relative_posix(f"{where}.path", self.path)
            if rel_path.name != self.filename:
                _fail(f"{where}.path", f"must name the file {self.filename!r}, got {self.path!r}")

    @property
    def source_kind(self) -> str:
        """``"url"``, ``"package_resource"`` or ``"path"``."""
        for name in ("url", "package_resource", "path"):
            if getattr(self, name) is not None:
                return name
        raise AssertionError("unreachable: validated in __post_init__")

    @property
    def base_url(self) -> str | None:
        """The URL without the file name (ends with '/'), or None for non-URL sources."""
        if self.url is None:
            return None
        return self.url[: self.url.rstrip("/").rfind("/") + 1]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PublishedResult:
    """A reference number for a recipe, e.g. ``("w8a8", "top1", 75.36, "imagenet-val-50k", "AIMET ...")``.

    ``value`` is in percent for ``top1`` / ``top5`` (0..100); ``source`` is a
    citation or URL and is required.
    """

    recipe: str
    metric: str
    value: float
    dataset: str
    source: str

    def __post_init__(self) -> None:
        self._validate("published")

    def _validate(self, where: str) -> None:
        _check_str(f"{where}.recipe", self.recipe)
        _check_str(f"{where}.metric", self.metric)
        value = _check_number(f"{where}.value", self.value)
        if self.metric in ("top1", "top5") and not 0.0 <= value <= 100.0:
            _fail(f"{where}.value", f"must be a percentage in [0, 100] for {self.metric}, got {value}")
        _set(self, "value", value)
        _check_str(f"{where}.dataset", self.dataset)
        _check_str(f"{where}.source", self.source)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PublishedArtifact:
    """An optimized artifact fetched by ``quantzoo download MODEL/RECIPE``.

    It lives at ``<card.hub_base_url><model>/<recipe>/<filename>``
    (see :meth:`ModelCard.artifact_url`).
    """

    recipe: str
    kind: str
    filename: str
    sha256: str

    def __post_init__(self) -> None:
        self._validate("artifacts")

    def _validate(self, where: str) -> None:
        _check_str(f"{where}.recipe", self.recipe)
        if not _NAME_RE.match(self.recipe):
            _fail(f"{where}.recipe", f"must be a simple name like 'w8a8', got {self.recipe!r}")
        _check_choice(f"{where}.kind", self.kind, ARTIFACT_KINDS)
        _check_filename(f"{where}.filename", self.filename)
        _set(self, "sha256", _check_sha256(f"{where}.sha256", self.sha256))
        _check_sha_tag(f"{where}.filename", self.filename, self.sha256)

    @property
    def relative_path(self) -> str:
        """Path under the hub base URL (and the cache), without the model name."""
        return f"{self.recipe}/{self.filename}"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TrainingRecipe:
    """How ``quantzoo train`` reproduces the card's weights on the CPU.

    Fixed parts of the procedure (see :mod:`zoo.training`): cross-entropy loss,
    per-step cosine learning-rate decay after a linear warm-up, SGD with
    Nesterov momentum 0.9 or AdamW. ``translate`` is the largest random shift
    (pixels, zero padded) applied to training images; ``num_train_samples``
    uses only the first N samples of the train split (``None``: all).
    """

    seed: int
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    num_train_samples: int | None = None
    translate: int = 0
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        self._validate("training")

    def _validate(self, where: str) -> None:
        _check_int(f"{where}.seed", self.seed, minimum=0)
        _check_int(f"{where}.epochs", self.epochs, minimum=1)
        _check_int(f"{where}.batch_size", self.batch_size, minimum=1)
        _set(self, "lr", _check_number(f"{where}.lr", self.lr, positive=True))
        _check_choice(f"{where}.optimizer", self.optimizer, OPTIMIZERS)
        _set(self, "weight_decay", _check_number(f"{where}.weight_decay", self.weight_decay, non_negative=True))
        if self.num_train_samples is not None:
            _check_int(f"{where}.num_train_samples", self.num_train_samples, minimum=1)
        _check_int(f"{where}.translate", self.translate, minimum=0)
        warmup = _check_number(f"{where}.warmup_epochs", self.warmup_epochs, non_negative=True)
        if warmup > self.epochs:
            _fail(f"{where}.warmup_epochs", f"must be <= epochs={self.epochs}, got {warmup}")
        _set(self, "warmup_epochs", warmup)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------- card


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
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise CardError(
                f"card {self.name!r}: name must be lowercase letters, digits, '_', '.', '-' "
                "(starting with a letter or digit)"
            )
        try:
            self._validate()
        except CardError as exc:
            raise CardError(f"card {self.name}: {exc}") from None

    def _validate(self) -> None:
        _check_choice("task", self.task, TASKS)
        for name, cls in _PARTS:
            part = getattr(self, name)
            if not isinstance(part, cls):
                _fail(name, f"must be a {cls.__name__}, got {type(part).__name__}")
            part._validate(name)
        _check_int("num_classes", self.num_classes, minimum=2)
        size = self.input_size
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size)
        ):
            _fail("input_size", f"must be (C, H, W) positive integers, got {size!r}")
        _set(self, "input_size", tuple(size))
        pre = self.preprocessing
        if self.input_size[0] != pre.in_chans:
            _fail(
                "input_size",
                f"has {self.input_size[0]} channel(s) but preprocessing.in_chans is {pre.in_chans}",
            )
        if pre.crop is not None and self.input_size[1:] != (pre.crop, pre.crop):
            _fail("input_size", f"{self.input_size} does not match preprocessing.crop={pre.crop}")
        _check_choice("dataset", self.dataset, DATASETS)
        native = NATIVE_INPUT_SIZES.get(self.dataset)
        if native is not None and pre.resize is None and pre.crop is None and self.input_size != native:
            _fail(
                "input_size",
                f"{self.input_size} does not match the native {self.dataset} size {native} "
                "(set preprocessing.resize/crop to change it)",
            )
        if native is None and pre.crop is None:
            _fail("preprocessing.crop", f"must be set for {self.dataset} (images have varying sizes)")
        _check_str("license", self.license)
        _check_str("training_dataset", self.training_dataset)
        _set(self, "published", self._tuple_of("published", self.published, PublishedResult))
        _set(self, "artifacts", self._tuple_of("artifacts", self.artifacts, PublishedArtifact))
        seen: set[tuple[str, str, str]] = set()
        for result in self.published:
            key = (result.recipe, result.metric, result.dataset)
            if key in seen:
                _fail("published", f"lists {key} twice")
            seen.add(key)
        names: set[tuple[str, str]] = set()
        for artifact in self.artifacts:
            if (artifact.recipe, artifact.filename) in names:
                _fail("artifacts", f"lists {artifact.recipe}/{artifact.filename} twice")
            names.add((artifact.recipe, artifact.filename))
        _check_url("hub_base_url", self.hub_base_url)
        if not self.hub_base_url.endswith("/"):
            _set(self, "hub_base_url", self.hub_base_url + "/")
        _set(self, "tags", _str_tuple("tags", self.tags))
        _check_str("description", self.description, allow_empty=True)
        if self.training is not None:
            if not isinstance(self.training, TrainingRecipe):
                _fail("training", f"must be a TrainingRecipe or None, got {type(self.training).__name__}")
            self.training._validate("training")
            if self.dataset not in TRAINABLE_DATASETS:
                _fail("training", f"is only supported for datasets {list(TRAINABLE_DATASETS)}, not {self.dataset!r}")

    @staticmethod
    def _tuple_of(where: str, values: Any, cls: type) -> tuple:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            _fail(where, f"must be a sequence of {cls.__name__}, got {type(values).__name__}")
        out = []
        for i, value in enumerate(values):
            if not isinstance(value, cls):
                _fail(f"{where}[{i}]", f"must be a {cls.__name__}, got {type(value).__name__}")
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
                    kwargs[key] = _from_mapping(part_cls, kwargs[key], key)
            if kwargs.get("training") is not None:
                kwargs["training"] = _from_mapping(TrainingRecipe, kwargs["training"], "training")
            for key, part_cls in (("published", PublishedResult), ("artifacts", PublishedArtifact)):
                if key in kwargs:
                    values = kwargs[key]
                    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
                        _fail(key, f"must be a list, got {type(values).__name__}")
                    kwargs[key] = tuple(
                        _from_mapping(part_cls, v, f"{key}[{i}]") for i, v in enumerate(values)
                    )
            card = _from_mapping(cls, kwargs, "model card")
        except CardError as exc:
            message = str(exc)
            prefix = f"card {name}: "
            raise CardError(message if message.startswith(prefix) else prefix + message) from None
        return card
