"""`quantzoo table`: regenerate results/<dataset>.csv, the charts and results/README.md from the run records.

Every file is rendered in memory first, then each is written atomically (temporary file, fsync,
rename; :mod:`quantlib.io`), so a killed or failing `quantzoo table` leaves each table either as it
was or fully regenerated, never half-written. ``--check`` writes nothing and exits 1 when a
committed file differs from what the records give (for CI).

``--prune-superseded`` first deletes every record that is not the newest of its dataset, model and
recipe (the tables show only the newest), each record's JSON before its run folder: git history
keeps them, and ``results/runs/`` keeps exactly the records behind the published numbers, the ones
``quantzoo reproduce`` is held to.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from quantlib.io import atomic_write_bytes


def stale_files(results_dir: Path, files: dict[str, bytes]) -> list[str]:
    """Names in ``files`` whose copy in ``results_dir`` is missing or different."""
    return [name for name, data in files.items()
            if not (results_dir / name).is_file() or (results_dir / name).read_bytes() != data]


def write_files(results_dir: Path, files: dict[str, bytes]) -> list[Path]:
    """Write every file atomically, in order; returns the paths."""
    return [atomic_write_bytes(results_dir / name, data) for name, data in files.items()]


def prune_superseded(runs_dir: Path) -> list[str]:
    """Delete the records of ``runs_dir`` that a newer run of the same key supersedes (the JSON
    first, so a kill never leaves a record without its run folder); returns their run ids."""
    from zoo.results import load_records, superseded

    pruned = []
    for record in superseded(load_records(runs_dir)):
        run_id = record.data["run_id"]
        (runs_dir / record.file_name).unlink()
        shutil.rmtree(runs_dir / run_id, ignore_errors=True)
        pruned.append(run_id)
    return pruned


def _cmd_table(args: argparse.Namespace) -> int:
    from zoo.registry import default_registry
    from zoo.results import RecordError, render_results

    if args.check and args.prune_superseded:
        print("quantzoo: error: --check writes nothing; run `quantzoo table --prune-superseded` without --check",
              file=sys.stderr)
        return 2
    results_dir = Path(args.results_dir)
    registry = default_registry()
    cards = {name: registry.get(name) for name in registry.list()}
    try:
        if args.prune_superseded:
            for run_id in prune_superseded(results_dir / "runs"):
                print(f"pruned superseded record {run_id}")
        files = render_results(results_dir / "runs", cards)
    except RecordError as error:
        print(f"quantzoo: error: {error}", file=sys.stderr)
        return 2
    if args.check:
        stale = stale_files(results_dir, files)
        for name in stale:
            print(f"stale: {results_dir / name} (run `quantzoo table` and commit it)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_files(results_dir, files):
        print(path)
    return 0


def register(subparsers) -> None:
    """Add `quantzoo table [--results-dir DIR] [--check] [--prune-superseded]`."""
    p = subparsers.add_parser("table", help="regenerate results/*.csv, charts and results/README.md from the run records")
    p.add_argument("--results-dir", default="results", help="folder holding runs/ (read) and the tables (written)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is missing or stale")
    p.add_argument("--prune-superseded", action="store_true",
                   help="first delete records that a newer run of the same dataset/model/recipe supersedes")
    p.set_defaults(func=_cmd_table)
