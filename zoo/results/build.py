"""Everything ``quantzoo table`` writes, rendered in memory from the run records and model cards.

:func:`render_results` returns file name -> bytes (names relative to the results folder): one
``<dataset>.csv`` and two charts per dataset, and ``README.md``. Writing them (atomically) is the
caller's job, so a failure while rendering leaves every file on disk as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from zoo.card import ModelCard

from . import plots
from .markdown import chart_names, render_readme
from .records import load_records, newest_per_key
from .rows import ResultRow, row_from_record
from .tables import render_csv

README = "README.md"


def result_rows(runs_dir: Path, cards: Mapping[str, ModelCard]) -> tuple[list[ResultRow], int]:
    """The rows of the newest record per (dataset, model, recipe) in ``runs_dir``, and the record count."""
    records = load_records(runs_dir)
    rows = [row_from_record(record, cards.get(record.data["model"])) for record in newest_per_key(records)]
    return rows, len(records)


def render_results(runs_dir: Path, cards: Mapping[str, ModelCard]) -> dict[str, bytes]:
    """File name -> content of every generated file, in a fixed order (CSVs and charts by dataset, then README)."""
    rows, num_records = result_rows(runs_dir, cards)
    files: dict[str, bytes] = {}
    for dataset in sorted({r.dataset for r in rows}):
        mine = [r for r in rows if r.dataset == dataset]
        size_png, bitops_png = chart_names(dataset)
        files[f"{dataset}.csv"] = render_csv(mine).encode("utf-8")
        files[size_png] = plots.accuracy_vs_size(mine, dataset)
        files[bitops_png] = plots.accuracy_vs_bitops(mine, dataset)
    files[README] = render_readme(rows, cards, num_records=num_records).encode("utf-8")
    return files
