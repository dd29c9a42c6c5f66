"""The `quantzoo` command line: list, show, run, train.

`run` hands its arguments to Hydra (`quantzoo run MODEL/RECIPE key=value ... [-m]`), so every
Hydra feature works: overrides, multirun sweeps and launcher plugins.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from importlib import import_module
from pathlib import Path

# Subcommands that live in their own module `zoo.cli.<name>`; each module defines
# `register(subparsers)`, which adds its parser and sets `func` to a callable(args) -> int.
PLUGIN_COMMANDS: tuple[str, ...] = ("table", "sweep", "reproduce", "bench")
_TRAILING_POSITIONALS = ("overrides", "items")  # list arguments of subcommands that take key=value


def _recipes() -> dict[str, list[str]]:
    root = resources.files("recipes")
    groups = {"model", "data", "quant", "ptq", "qat", "compress", "evaluator", "hydra", "zoo", "__pycache__"}
    found = {}
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        if folder.is_dir() and folder.name not in groups:
            found[folder.name] = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
    return found


def _cmd_list(args) -> int:
    from zoo.registry import default_registry

    recipes = _recipes()
    registry = default_registry()
    names = registry.list(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}; run `quantzoo list` to see all", file=sys.stderr)
        return 1
    for name in names:
        card = registry.get(name)
        print(f"{name:<24}{card.dataset:<18}{', '.join(recipes.get(name, [])) or '(no recipes)'}")
    return 0


def _cmd_show(args) -> int:
    from zoo.registry import default_registry

    card = default_registry().get(args.model)
    data = card.to_dict()
    data["recipes"] = _recipes().get(card.name, [])
    print(json.dumps(data, indent=2, sort_keys=True))
    return 0


def _cmd_train(args) -> int:
    from zoo.registry import default_registry
    from zoo.training import train_model

    result = train_model(default_registry().get(args.model), seed=args.seed, progress=True)
    print(f"{args.model}: {result.path} sha256={result.sha256} test top1={result.top1_test:.2f} ({result.seconds:.0f}s)")
    return 0


def _cmd_publish(args) -> int:
    from .distribution import newest_record, publish

    model, _, recipe = args.target.partition("/")
    folder = publish(newest_record(Path(args.results_dir), model, recipe), Path(args.to))
    print(f"published {args.target} to {folder}")
    return 0


def _cmd_download(args) -> int:
    from zoo.registry import default_registry

    from .distribution import download

    model, _, recipe = args.target.partition("/")
    paths = download(default_registry().get(model), recipe, to=Path(args.to) if args.to else None,
                     mirror=args.mirror, offline=True if args.offline else None)
    for kind, path in paths.items():
        print(f"{kind:<10} {path}")
    return 0


def _run_hydra(target: str, overrides: list[str]) -> int:
    import hydra
    from omegaconf import DictConfig

    from .run import execute, format_summary, wrap_errors
    from .schema import register_schemas

    model, _, recipe = target.partition("/")
    recipes = _recipes()
    if model not in recipes or recipe not in recipes[model]:
        known = ", ".join(f"{m}/{r}" for m, rs in recipes.items() for r in rs)
        raise SystemExit(f"quantzoo run: unknown recipe {target!r}; choose MODEL/RECIPE from: {known}")
    register_schemas()

    def task(cfg: DictConfig) -> None:
        try:
            record = execute(cfg)
        except Exception as error:  # noqa: BLE001 - known user errors become one line
            message = wrap_errors(error)
            if message is None:
                raise
            print(f"quantzoo: error: {message}", file=sys.stderr)
            raise SystemExit(2) from None
        if not record.get("rank_skipped"):
            print(format_summary(record))

    app = hydra.main(config_path="pkg://recipes", config_name=f"{model}/{recipe}", version_base="1.3")(task)
    sys.argv = ["quantzoo run", *overrides]
    app()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":  # Hydra parses the rest
        if len(argv) < 2 or argv[1].startswith("-"):
            raise SystemExit("usage: quantzoo run MODEL/RECIPE [key=value ...] [-m]")
        return _guarded(lambda: _run_hydra(argv[1], argv[2:]))

    parser = argparse.ArgumentParser(prog="quantzoo", description="Quantized model zoo and benchmark harness.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list zoo models and their recipes")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("show", help="print a model card")
    p.add_argument("model")
    p.set_defaults(func=_cmd_show)
    p = sub.add_parser("train", help="train a zoo model's FP32 checkpoint deterministically on the CPU")
    p.add_argument("model")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("publish", help="write a run's artifacts in the hub layout (sha256 in file names)")
    p.add_argument("target", metavar="MODEL/RECIPE")
    p.add_argument("--to", required=True, help="destination folder, served by any static file server")
    p.add_argument("--results-dir", default="results")
    p.set_defaults(func=_cmd_publish)
    p = sub.add_parser("download", help="fetch and verify a recipe's optimized artifacts (weights, encodings, ONNX)")
    p.add_argument("target", metavar="MODEL/RECIPE")
    p.add_argument("--to", default=None, help="also copy the verified files here")
    p.add_argument("--mirror", default=None, help="base URL replacing the card's hub URL (or QUANTZOO_MIRROR)")
    p.add_argument("--offline", action="store_true", help="use the cache only (or QUANTZOO_OFFLINE=1)")
    p.set_defaults(func=_cmd_download)
    for name in PLUGIN_COMMANDS:
        import_module(f"{__name__}.{name}").register(sub)
    sub.add_parser("run", help="quantzoo run MODEL/RECIPE [hydra overrides] [-m]: FP32 vs simulated vs ONNX Runtime")
    args, extras = parser.parse_known_args(argv)
    # key=value overrides may follow options (`reproduce ID --out X key=value`), which argparse
    # does not intermix with a trailing positional list on its own
    trailing = next((name for name in _TRAILING_POSITIONALS if hasattr(args, name)), None)
    if extras and (trailing is None or any(extra.startswith("-") for extra in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if extras:
        setattr(args, trailing, [*getattr(args, trailing), *extras])
    return _guarded(lambda: args.func(args))


def _guarded(fn) -> int:
    """Run ``fn``; known user errors print one line and exit 2 instead of a traceback."""
    from .run import wrap_errors

    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - filtered below
        message = wrap_errors(error) or wrap_errors(error.__cause__ or error)
        if message is None:
            raise
        print(f"quantzoo: error: {message}", file=sys.stderr)
        return 2
