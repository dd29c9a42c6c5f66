"""Shared vocabulary for validating model-card fields.

Every card dataclass (see :mod:`zoo.card`) validates its fields with these
helpers. Each ``check_*`` takes ``where`` -- the dotted field name used in the
message, e.g. ``"weights.sha256"`` -- and the value; it returns the value
(normalized where noted: sha256 lowercased, numbers as ``float``) or raises
:class:`CardError` naming ``where`` and what was expected. :func:`from_mapping`
builds a card dataclass from a plain mapping and refuses unknown keys.

Nothing here holds state; this module imports only the standard library.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import PurePosixPath
from typing import Any

__all__ = [
    "NAME_RE",
    "CardError",
    "check_choice",
    "check_filename",
    "check_int",
    "check_number",
    "check_relative_posix",
    "check_sha256",
    "check_sha_tag",
    "check_str",
    "check_url",
    "fail",
    "float_tuple",
    "from_mapping",
    "jsonable",
    "set_field",
    "str_tuple",
]

_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_SHA_TAG_RE = re.compile(r"-([0-9a-f]{8})((?:\.[A-Za-z0-9_]+)+)$")
#: a card or recipe name: lowercase letters, digits, '_', '.', '-', starting with a letter or digit.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_URL_SCHEMES = ("http", "https", "file")


class CardError(ValueError):
    """A model card (or one of its parts) is invalid; the message names the field."""


def fail(where: str, message: str) -> None:
    raise CardError(f"{where} {message}" if where else message)


def check_str(where: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        fail(where, f"must be a non-empty string, got {value!r}")
    return value


def check_choice(where: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        fail(where, f"must be one of {list(choices)}, got {value!r}")
    return value


def check_int(where: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(where, f"must be an integer >= {minimum}, got {value!r}")
    return value


def check_number(where: str, value: Any, *, positive: bool = False, non_negative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(where, f"must be a finite number, got {value!r}")
    if positive and value <= 0:
        fail(where, f"must be > 0, got {value!r}")
    if non_negative and value < 0:
        fail(where, f"must be >= 0, got {value!r}")
    return float(value)


def check_sha256(where: str, value: Any) -> str:
    if not isinstance(value, str) or not _SHA256_RE.match(value):
        fail(where, f"must be 64 hex characters, got {value!r}")
    return value.lower()


def check_filename(where: str, value: Any, *, extensions: Sequence[str] | None = None) -> str:
    check_str(where, value)
    if "/" in value or "\\" in value or value in (".", "..") or value.startswith("."):
        fail(where, f"must be a plain file name (no folders, not hidden), got {value!r}")
    if extensions is not None and not value.lower().endswith(tuple(extensions)):
        fail(where, f"must end with one of {list(extensions)}, got {value!r}")
    return value


def check_sha_tag(where: str, filename: str, sha256: str) -> None:
    """A torchvision-style tag ``<stem>-<8 hex>.<ext>`` must be the sha256 prefix."""
    match = _SHA_TAG_RE.search(filename)
    if match is not None and not sha256.startswith(match.group(1)):
        fail(
            where,
            f"{filename!r} is tagged {match.group(1)} but sha256 starts with {sha256[:8]}; "
            "the file name and checksum must agree",
        )


def check_relative_posix(where: str, value: Any) -> PurePosixPath:
    check_str(where, value)
    rel = PurePosixPath(value)
    if rel.is_absolute() or ".." in rel.parts or "\\" in value or not rel.parts or value.endswith("/"):
        fail(where, f"must be a relative POSIX path without '..', got {value!r}")
    return rel


def check_url(where: str, value: Any) -> str:
    check_str(where, value)
    parts = urllib.parse.urlsplit(value)
    if parts.scheme.lower() not in _URL_SCHEMES or (parts.scheme.lower() != "file" and not parts.netloc):
        fail(where, f"must be an http://, https:// or file:// URL, got {value!r}")
    return value


def float_tuple(where: str, values: Any) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        fail(where, f"must be a sequence of numbers, got {values!r}")
    return tuple(check_number(f"{where}[{i}]", v) for i, v in enumerate(values))


def str_tuple(where: str, values: Any) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        fail(where, f"must be a sequence of strings, got {values!r}")
    return tuple(check_str(f"{where}[{i}]", v) for i, v in enumerate(values))


def set_field(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def jsonable(value: Any) -> Any:
    """Plain JSON types for ``to_dict``: tuples become lists, mappings dicts."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def from_mapping(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are a CardError."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        fail(where, f"must be a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        fail(where, f"has unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = dict(data)
    for key in ("mean", "std", "published", "artifacts", "tags", "input_size"):
        if key in kwargs and isinstance(kwargs[key], list):
            kwargs[key] = tuple(kwargs[key])
    try:
        return cls(**kwargs)
    except TypeError as exc:  # missing required fields
        raise CardError(f"{where}: {exc}") from None
