"""Validation shared by the PTQ pass configs (AdaRound, AdaQuant, sensitivity, mixed precision).

Every pass takes a frozen dataclass. :func:`config_from_mapping` builds one from a plain mapping
(a recipe section, a JSON file) and refuses unknown keys with a one-line message that names the
bad key and lists the valid ones; value checks live in each dataclass's ``__post_init__`` and
raise :class:`PassConfigError` naming the field and the accepted values.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

from ..spec import QuantSpecError

T = TypeVar("T")


class PassConfigError(QuantSpecError):
    """A PTQ pass setting is invalid; the message names the setting and the fix.

    A subclass of :class:`~quantlib.spec.QuantSpecError`, so front ends that print quantizer
    setting errors as one line do the same for pass settings.
    """


def config_from_mapping(cls: type[T], values: Mapping[str, Any] | T | None, where: str) -> T:
    """Build the dataclass ``cls`` from ``values`` (a mapping, an instance of ``cls`` or None).

    ``where`` prefixes error messages (e.g. ``"adaround"`` gives ``adaround.num_iteratons is not
    ...``). Lists are turned into tuples for tuple-typed fields, so YAML/JSON input works.
    """
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise PassConfigError(f"{where} must be a mapping of settings or a {cls.__name__}, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PassConfigError(f"{where}.{unknown[0]} is not a {cls.__name__} setting; valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    converted = {key: _tupled(value, hints.get(key)) for key, value in values.items()}
    try:
        return cls(**converted)
    except PassConfigError as err:
        raise PassConfigError(f"{where}.{err}") from None


def _tupled(value: Any, hint: Any) -> Any:
    if isinstance(value, list) and "tuple" in str(hint):
        return tuple(_tupled(v, None if not isinstance(v, list) else "tuple") for v in value)
    return value


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise :class:`PassConfigError` unless ``value`` > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PassConfigError(f"{name}={value!r} must be a number")
    if value < 0 or (value == 0 and not allow_zero):
        raise PassConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise :class:`PassConfigError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise PassConfigError(f"{name}={value!r} is not supported; use one of {', '.join(choices)}")


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise :class:`PassConfigError` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PassConfigError(f"{name}={value!r} must be an integer >= {minimum}")
