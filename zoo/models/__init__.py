"""The zoo's model cards, one module per model family.

Contract: every public (not ``_``-prefixed) module of this package exposes
``CARDS: tuple[ModelCard, ...]``. :func:`zoo.registry.default_registry`
imports the modules in sorted order with :mod:`pkgutil` and registers every
card, so adding a model means adding one card (or one module). Modules may
also define the ``local`` architecture callables their cards name
(``"zoo.models.<module>:<callable>"``); heavy imports (timm) stay inside those
callables so that listing the zoo stays cheap.
"""
