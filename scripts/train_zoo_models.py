#!/usr/bin/env python
"""Train every zoo card that has a training recipe; print name, sha256, test top-1, seconds.

Usage::

    python scripts/train_zoo_models.py                 # all trainable cards, into the cache
    python scripts/train_zoo_models.py mnist_cnn digits_mlp --ship

Weights go to ``<cache>/weights/<name>/`` (``$QUANTZOO_HOME`` or
``~/.cache/quantzoo``), where ``quantzoo run`` finds them, or to ``--out-dir``.
``--ship`` also copies the files of ``path``-sourced cards into ``zoo/weights/``
(the small checkpoints committed with the code). A sha256 that differs from
the card's is flagged: update the card (and the shipped / hub file) then.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zoo.builder import WEIGHTS_DIR
from zoo.hub import atomic_copy
from zoo.registry import default_registry
from zoo.training import train_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="card names (default: every card with a training recipe)")
    parser.add_argument("--out-dir", type=Path, default=None, help="write here instead of the cache")
    parser.add_argument("--seed", type=int, default=None, help="override the recipes' seeds")
    parser.add_argument("--ship", action="store_true", help="copy path-sourced results into zoo/weights/")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch log")
    args = parser.parse_args(argv)

    registry = default_registry()
    names = args.models or [c.name for c in registry.cards() if c.training is not None]
    cards = [registry.get(n) for n in names]
    untrainable = [c.name for c in cards if c.training is None]
    if untrainable:
        parser.error(f"no training recipe: {', '.join(untrainable)}")

    print(f"{'model':<24} {'sha256':<64} {'top1':>7} {'seconds':>8}  card")
    mismatches = 0
    for card in cards:
        out_dir = args.out_dir / card.name if args.out_dir is not None else None
        result = train_model(card, out_dir=out_dir, seed=args.seed, progress=not args.quiet)
        status = "matches" if result.matches_card else "DIFFERS from the card"
        mismatches += not result.matches_card
        print(f"{card.name:<24} {result.sha256} {result.top1_test:7.2f} {result.seconds:8.1f}  {status}", flush=True)
        if args.ship and card.weights.source_kind == "path":
            dest = WEIGHTS_DIR / result.path.name
            atomic_copy(result.path, dest)
            print(f"  shipped -> {dest}", flush=True)
    return 1 if mismatches and args.seed is None else 0


if __name__ == "__main__":
    sys.exit(main())
