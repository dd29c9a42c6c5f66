"""The published parts of a model card: cited reference numbers and downloadable artifacts.

* :class:`PublishedResult` -- a reference metric for a recipe, with its source;
* :class:`PublishedArtifact` -- an optimized artifact that ``quantzoo download
  MODEL/RECIPE`` fetches from ``<hub_base_url><model>/<recipe>/<filename>``
  (the URL itself is built by :meth:`zoo.card.ModelCard.artifact_url`).

Both are frozen, validate themselves on construction and raise
:class:`zoo.card_fields.CardError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from zoo.card_fields import (
    NAME_RE,
    check_choice,
    check_filename,
    check_number,
    check_sha256,
    check_sha_tag,
    check_str,
    fail,
    set_field,
)

__all__ = ["ARTIFACT_KINDS", "PublishedArtifact", "PublishedResult"]

ARTIFACT_KINDS: tuple[str, ...] = ("encodings", "onnx", "weights")


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
        check_str(f"{where}.recipe", self.recipe)
        check_str(f"{where}.metric", self.metric)
        value = check_number(f"{where}.value", self.value)
        if self.metric in ("top1", "top5") and not 0.0 <= value <= 100.0:
            fail(f"{where}.value", f"must be a percentage in [0, 100] for {self.metric}, got {value}")
        set_field(self, "value", value)
        check_str(f"{where}.dataset", self.dataset)
        check_str(f"{where}.source", self.source)

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
        check_str(f"{where}.recipe", self.recipe)
        if not NAME_RE.match(self.recipe):
            fail(f"{where}.recipe", f"must be a simple name like 'w8a8', got {self.recipe!r}")
        check_choice(f"{where}.kind", self.kind, ARTIFACT_KINDS)
        check_filename(f"{where}.filename", self.filename)
        set_field(self, "sha256", check_sha256(f"{where}.sha256", self.sha256))
        check_sha_tag(f"{where}.filename", self.filename, self.sha256)

    @property
    def relative_path(self) -> str:
        """Path under the hub base URL (and the cache), without the model name."""
        return f"{self.recipe}/{self.filename}"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

