"""The model registry: model cards by name, with optional custom builders.

:func:`default_registry` builds a fresh :class:`ModelRegistry` from the
``CARDS`` tuples of the modules in :mod:`zoo.models` (imported in sorted
order with :mod:`pkgutil`). There is no module-level mutable state: each call
returns a new registry; callers may cache it.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any

from zoo.card import CardError, ModelCard

__all__ = [
    "DuplicateModelError",
    "ModelBuilder",
    "ModelRegistry",
    "UnknownModelError",
    "default_registry",
]

#: ``builder(card, *, offline=None, mirror=None) -> torch.nn.Module`` (fp32, eval mode).
ModelBuilder = Callable[..., Any]


class DuplicateModelError(ValueError):
    """A card with the same name is already registered."""


class UnknownModelError(LookupError):
    """No card has the requested name; the message lists close matches."""

    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        if not close:
            close = [k for k in known if name and (name.lower() in k or k in name.lower())][:3]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        super().__init__(f"unknown model {name!r}; {hint}run `quantzoo list` to see the {len(known)} available models")


class ModelRegistry:
    """Cards by name, each with an optional custom builder.

    ``register(card, builder=None)``; ``get(name) -> ModelCard``;
    ``builder(name)`` -> the custom builder or None; ``list(pattern)`` -> sorted
    names matching an fnmatch pattern; ``cards(pattern)`` -> their cards;
    ``name in registry``; iteration yields names in sorted order.
    """

    def __init__(self) -> None:
        self._cards: dict[str, ModelCard] = {}
        self._builders: dict[str, ModelBuilder | None] = {}

    def register(self, card: ModelCard, builder: ModelBuilder | None = None) -> ModelCard:
        """Add ``card`` (and its custom builder); DuplicateModelError if the name is taken."""
        if not isinstance(card, ModelCard):
            raise TypeError(f"register() needs a ModelCard, got {type(card).__name__}")
        if builder is not None and not callable(builder):
            raise TypeError(f"builder for {card.name} must be callable, got {type(builder).__name__}")
        if card.name in self._cards:
            raise DuplicateModelError(f"model {card.name!r} is already registered; model names must be unique")
        self._cards[card.name] = card
        self._builders[card.name] = builder
        return card

    def get(self, name: str) -> ModelCard:
        """The card called ``name``; UnknownModelError (listing close matches) otherwise."""
        try:
            return self._cards[name]
        except (KeyError, TypeError):
            raise UnknownModelError(str(name), sorted(self._cards)) from None

    def builder(self, name: str) -> ModelBuilder | None:
        """The custom builder registered with ``name`` (None: use :func:`zoo.builder.build_fp32_model`)."""
        self.get(name)
        return self._builders[name]

    def build(self, name: str, *, offline: bool | None = None, mirror: str | None = None) -> Any:
        """The fp32 model of ``name``: its custom builder, else :func:`zoo.builder.build_fp32_model`."""
        card = self.get(name)
        builder = self._builders[name]
        if builder is None:
            from zoo.builder import build_fp32_model

            builder = build_fp32_model
        return builder(card, offline=offline, mirror=mirror)

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted names matching the fnmatch ``pattern`` (case-sensitive, e.g. ``"mnist_*"``)."""
        return sorted(n for n in self._cards if fnmatch.fnmatchcase(n, pattern))

    def cards(self, pattern: str = "*") -> list[ModelCard]:
        """The cards of :meth:`list` (same order)."""
        return [self._cards[n] for n in self.list(pattern)]

    def __contains__(self, name: object) -> bool:
        return name in self._cards

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._cards))

    def __len__(self) -> int:
        return len(self._cards)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} models)"


def default_registry() -> ModelRegistry:
    """A new registry holding every card of every public module in :mod:`zoo.models`."""
    import zoo.models as package

    registry = ModelRegistry()
    infos = sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name)
    for info in infos:
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        cards = getattr(module, "CARDS", None)
        if not isinstance(cards, tuple) or not all(isinstance(c, ModelCard) for c in cards):
            raise CardError(
                f"{module.__name__} must define CARDS: tuple[ModelCard, ...] "
                f"(got {type(cards).__name__})"
            )
        for card in cards:
            registry.register(card)
    return registry
