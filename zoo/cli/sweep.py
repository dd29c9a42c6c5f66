"""`quantzoo sweep`: one Hydra multirun over zoo models and recipes, on any Hydra launcher.

    quantzoo sweep 'digits_mlp/*' 'mnist_cnn/w8a8_*' hydra/launcher=joblib hydra.launcher.n_jobs=2
    quantzoo sweep '*/w8a8_per_channel' evaluator.batch_size=100 hydra/launcher=slurm
    quantzoo sweep mnist_cnn quant.activation_observer=minmax,percentile    # 4 recipes x 2 observers

A TARGET is ``MODEL/RECIPE`` with shell-style wildcards, or a bare ``MODEL`` pattern meaning all its
recipes; the targets expand, sorted, into one choice of the config group ``zoo``, whose options
are the recipe files (``zoo=digits_mlp/w8a8_per_channel`` composes ``recipes/digits_mlp/w8a8_per_channel.yaml``
exactly as ``quantzoo run`` does). Every ``key=value`` argument goes to Hydra unchanged, so
comma lists sweep further and ``hydra/launcher=...`` picks the launcher (``joblib``,
``submitit_local``, ``submitit_slurm``, or the example ``slurm`` in ``recipes/hydra/launcher/``).

``results_dir`` and ``artifacts_dir`` are made absolute before launch, so every worker, on this
machine or on a cluster node, writes its record into the same ``results/runs/``; records have unique
run ids and are written atomically, so parallel workers never clobber each other.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

SWEEP_CONFIG = "quantzoo_sweep"
GROUP = "zoo"
_PATH_KEYS = ("results_dir", "artifacts_dir")
_DEFAULT_PATHS = {"results_dir": "results", "artifacts_dir": "artifacts"}


class SweepError(ValueError):
    """A sweep argument is wrong; the message names it and the fix."""


class SweepJobError(RuntimeError):
    """One sweep job stopped on a user error (already printed); Hydra reports it after the other jobs ran."""


def expand_targets(patterns: list[str], recipes: dict[str, list[str]]) -> list[str]:
    """Sorted unique ``model/recipe`` names matching the patterns; SweepError for a pattern matching nothing."""
    known = [f"{model}/{recipe}" for model in sorted(recipes) for recipe in recipes[model]]
    chosen: set[str] = set()
    for pattern in patterns:
        full = pattern if "/" in pattern else f"{pattern}/*"
        matched = fnmatch.filter(known, full)
        if not matched:
            raise SweepError(f"target {pattern!r} matches no recipe; use MODEL/RECIPE (wildcards allowed), "
                             f"see `quantzoo list`")
        chosen.update(matched)
    return sorted(chosen)


def absolute_path_overrides(overrides: list[str], cwd: Path) -> list[str]:
    """``overrides`` with results_dir/artifacts_dir made absolute (added when missing)."""
    out, seen = [], set()
    for item in overrides:
        key, _, value = item.partition("=")
        if key in _PATH_KEYS:
            seen.add(key)
            if "," in value:
                raise SweepError(f"{key}={value} sweeps a folder; all workers must share one {key}, give a single path")
            item = f"{key}={(cwd / value).resolve()}"
        out.append(item)
    for key in _PATH_KEYS:
        if key not in seen:
            out.append(f"{key}={(cwd / _DEFAULT_PATHS[key]).resolve()}")
    return out


def hydra_arguments(targets: list[str], overrides: list[str]) -> list[str]:
    """The Hydra command line of the sweep (multirun over ``zoo``, then the overrides)."""
    return ["--multirun", f"{GROUP}={','.join(targets)}", *overrides]


def register_sweep_configs(recipes: dict[str, list[str]], default: str) -> None:
    """Register the ``zoo`` group (one option per recipe file) and the ``quantzoo_sweep`` primary config.

    ``default`` (a ``model/recipe``) is the primary config's ``zoo`` choice: Hydra composes the
    sweep-level config before expanding the sweep, and the overrides must apply to a real recipe.
    Idempotent: ConfigStore replaces entries stored under the same name.
    """
    from hydra.core.config_store import ConfigStore

    from .schema import register_schemas

    register_schemas()
    store = ConfigStore.instance()
    for model in sorted(recipes):
        for recipe in recipes[model]:
            # @package _global_, like the recipe file it includes: it adds no key of its own
            store.store(group=f"{GROUP}/{model}", name=recipe, node={"defaults": [f"/{model}/{recipe}"]}, package="_global_")
    store.store(name=SWEEP_CONFIG, node={"defaults": [{GROUP: default}, "_self_"]})


def run_job(cfg) -> str:
    """The Hydra task of one sweep job: run the recipe, print its summary; returns the record path."""
    from .run import execute, format_summary, wrap_errors

    try:
        record = execute(cfg)
    except Exception as error:  # noqa: BLE001 - known user errors become one line
        message = wrap_errors(error)
        if message is None:
            raise
        print(f"quantzoo: error: {cfg.model.name}/{cfg.recipe}: {message}", file=sys.stderr)
        raise SweepJobError(message) from None
    print(format_summary(record))
    return record["record_path"]



def _cmd_sweep(args: argparse.Namespace) -> int:
    import hydra

    from . import _recipes

    patterns = [item for item in args.items if "=" not in item]
    overrides = [item for item in args.items if "=" in item]
    try:
        if not patterns:
            raise SweepError("give at least one MODEL/RECIPE target, e.g. quantzoo sweep 'digits_mlp/*'")
        if any(item.partition("=")[0].lstrip("+~") == GROUP for item in overrides):
            raise SweepError(f"{GROUP}= is set by the targets; list MODEL/RECIPE patterns instead")
        recipes = _recipes()
        targets = expand_targets(patterns, recipes)
        overrides = absolute_path_overrides(overrides, Path.cwd())
    except SweepError as error:
        print(f"quantzoo: error: {error}", file=sys.stderr)
        return 2
    arguments = hydra_arguments(targets, overrides)
    if args.dry_run:
        print(f"{len(targets)} recipe(s): {' '.join(targets)}")
        print("hydra arguments: " + " ".join(arguments))
        return 0
    register_sweep_configs(recipes, default=targets[0])
    app = hydra.main(config_path="pkg://recipes", config_name=SWEEP_CONFIG, version_base="1.3")(run_job)
    saved = sys.argv
    sys.argv = ["quantzoo sweep", *arguments]
    try:
        app()
    finally:
        sys.argv = saved
    return 0


def register(subparsers) -> None:
    """Add `quantzoo sweep TARGET... [key=value ...] [--dry-run]`."""
    p = subparsers.add_parser(
        "sweep", help="one Hydra multirun over MODEL/RECIPE patterns (any launcher: joblib, submitit, slurm)",
        description="Targets are MODEL/RECIPE patterns ('digits_mlp/*', '*/w4a8') or MODEL patterns (all recipes); "
                    "key=value arguments are Hydra overrides for every job (comma lists sweep further, "
                    "hydra/launcher=joblib|submitit_local|submitit_slurm|slurm picks the launcher).")
    p.add_argument("items", nargs="+", metavar="TARGET|key=value")
    p.add_argument("--dry-run", action="store_true", help="print the expanded recipes and Hydra arguments; run nothing")
    p.set_defaults(func=_cmd_sweep)
