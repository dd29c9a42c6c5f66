"""`quantzoo reproduce RUN_ID | MODEL/RECIPE [key=value ...]`: re-run a recorded run and compare.

Exit status: 0 when the reproduction passes, 1 when it fails (metrics or hashes outside the
rules of :mod:`zoo.cli.reproduce_compare`), 2 for a request that cannot be carried out.
The comparison is printed; the reproduced record and the comparison are written to
``<out>/<new run id>.json`` (default ``results/reproduced/``), never to ``results/runs``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .reproduce_compare import DEFAULT_TOLERANCE


def register(subparsers) -> None:
    """Add the ``reproduce`` subcommand to ``subparsers``."""
    p = subparsers.add_parser(
        "reproduce", help="re-run a recorded run from its resolved config and compare metrics, hashes and provenance",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="RUN_ID|MODEL/RECIPE", help="a run id in <results-dir>/runs, or MODEL/RECIPE for the newest one")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config changes for the re-run, e.g. data.root=/data/imagenet-sample-1k")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"top-1 points a backend may move when the environment differs (default {DEFAULT_TOLERANCE})")
    p.add_argument("--results-dir", default="results", help="where the original records are (<results-dir>/runs)")
    p.add_argument("--out", default=None, help="folder for the reproduction report (default <results-dir>/reproduced)")
    p.add_argument("--artifacts-dir", default="artifacts/reproduced", help="folder for the re-run's exported artifacts")
    p.set_defaults(func=_cmd_reproduce)


def _cmd_reproduce(args) -> int:
    from .reproduce_compare import format_comparison
    from .reproduce_run import ReproduceError, find_record, reproduce

    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        print(f"quantzoo reproduce: error: --tolerance={args.tolerance} must be top-1 points >= 0, e.g. 0.5", file=sys.stderr)
        return 2
    try:
        path = find_record(args.target, args.results_dir)
        result = reproduce(path, tolerance=args.tolerance, out_dir=Path(args.out or Path(args.results_dir) / "reproduced"),
                           artifacts_dir=args.artifacts_dir, overrides=args.overrides)
    except ReproduceError as error:
        print(f"quantzoo reproduce: error: {error}", file=sys.stderr)
        return 2
    print(format_comparison(result.comparison))
    print(f"report: {result.report_path}")
    return 0 if result.comparison.passed else 1
