"""The source parts of a model card: where the network and its fp32 weights come from.

* :class:`ArchitectureSource` -- how to build the randomly initialised network
  (``timm`` / ``torchvision`` by name, or a ``local`` ``"module.path:callable"``);
* :class:`WeightsSource` -- where the checkpoint lives (exactly one of a URL, a
  package resource or a path under ``zoo/weights/``) and its sha256.

Both are frozen, validate themselves on construction and raise
:class:`zoo.card_fields.CardError` naming the field. Building and loading
happen in :mod:`zoo.builder`; this module only describes.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from zoo.card_fields import (
    CardError,
    check_choice,
    check_filename,
    check_relative_posix,
    check_sha256,
    check_sha_tag,
    check_str,
    check_url,
    fail,
    jsonable,
    set_field,
)

__all__ = [
    "ARCHITECTURE_KINDS",
    "KEY_MAPPINGS",
    "WEIGHT_EXTENSIONS",
    "ArchitectureSource",
    "WeightsSource",
]

ARCHITECTURE_KINDS: tuple[str, ...] = ("local", "timm", "torchvision")
KEY_MAPPINGS: tuple[str, ...] = ("by_name", "in_order")
WEIGHT_EXTENSIONS: tuple[str, ...] = (".safetensors", ".pt", ".pth", ".bin")

_DOTTED_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_LOCAL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
# kwargs the builder passes itself; a card must not set them.
_RESERVED_ARCH_KWARGS = frozenset({"num_classes", "pretrained", "weights", "pretrained_cfg"})


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
        check_choice(f"{where}.kind", self.kind, ARCHITECTURE_KINDS)
        check_str(f"{where}.name", self.name)
        if self.kind == "local" and not _LOCAL_RE.match(self.name):
            fail(f"{where}.name", f"must be 'module.path:callable' for kind 'local', got {self.name!r}")
        if not isinstance(self.kwargs, Mapping):
            fail(f"{where}.kwargs", f"must be a mapping, got {type(self.kwargs).__name__}")
        bad = sorted(k for k in self.kwargs if not isinstance(k, str) or k in _RESERVED_ARCH_KWARGS)
        if bad:
            fail(f"{where}.kwargs", f"must not set {bad} (the builder passes num_classes itself)")
        try:
            frozen = json.loads(json.dumps(dict(self.kwargs), sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise CardError(f"{where}.kwargs must be JSON-serializable: {exc}") from None
        set_field(self, "kwargs", MappingProxyType(frozen))

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
        return {"kind": self.kind, "name": self.name, "kwargs": jsonable(self.kwargs)}


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
        set_field(self, "sha256", check_sha256(f"{where}.sha256", self.sha256))
        check_filename(f"{where}.filename", self.filename, extensions=WEIGHT_EXTENSIONS)
        check_sha_tag(f"{where}.filename", self.filename, self.sha256)
        check_choice(f"{where}.key_mapping", self.key_mapping, KEY_MAPPINGS)
        given = [n for n in ("url", "package_resource", "path") if getattr(self, n) is not None]
        if len(given) != 1:
            fail(
                where,
                f"must set exactly one of url / package_resource / path, got {given or 'none'}",
            )
        if self.url is not None:
            check_url(f"{where}.url", self.url)
            if urllib.parse.unquote(urllib.parse.urlsplit(self.url).path).rsplit("/", 1)[-1] != self.filename:
                fail(f"{where}.url", f"must end with '/{self.filename}' (the filename), got {self.url!r}")
        if self.package_resource is not None:
            module, sep, rel = self.package_resource.partition(":")
            if not sep or not _DOTTED_RE.match(module):
                fail(
                    f"{where}.package_resource",
                    f"must be 'importable_module:relative/path', got {self.package_resource!r}",
                )
            rel_path = check_relative_posix(f"{where}.package_resource", rel)
            if rel_path.name != self.filename:
                fail(f"{where}.package_resource", f"must name the file {self.filename!r}, got {rel!r}")
        if self.path is not None:
            rel_path = check_relative_posix(f"{where}.path", self.path)
            if rel_path.name != self.filename:
                fail(f"{where}.path", f"must name the file {self.filename!r}, got {self.path!r}")

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

