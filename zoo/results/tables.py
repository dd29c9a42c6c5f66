"""``results/<dataset>.csv``: one row per (model, recipe), snake_case columns, as timm's results CSVs.

Accuracies are percentages with two decimals; differences are signed percentage points; sizes are
bytes; an empty cell means the record has no such value (e.g. ``bitops`` for records written
before run records carried a ``cost`` block). Rows come sorted by model, then recipe.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from typing import Any

from .rows import ResultRow


def fmt_pct(value: float | None) -> str:
    """Two decimals, '' for None."""
    return "" if value is None else f"{value:.2f}"


def fmt_delta(value: float | None) -> str:
    """Signed, two decimals (``+0.25``, ``-1.10``), '' for None."""
    return "" if value is None else f"{value:+.2f}"


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _ci(row: ResultRow, name: str, end: int) -> str:
    interval = getattr(row, name)
    return "" if interval is None else fmt_pct(interval[end])


# (column, value) in output order; every column is snake_case.
COLUMNS: tuple[tuple[str, Callable[[ResultRow], str]], ...] = (
    ("dataset", lambda r: r.dataset),
    ("task", lambda r: r.task),
    ("model", lambda r: r.model),
    ("recipe", lambda r: r.recipe),
    ("weight_bits", lambda r: _plain(r.weight_bits)),
    ("activation_bits", lambda r: _plain(r.activation_bits)),
    ("mixed_precision", lambda r: _plain(r.mixed_precision)),
    ("quant_config", lambda r: _plain(r.quant_config)),
    ("fp32_top1", lambda r: fmt_pct(r.fp32_top1)),
    ("sim_top1", lambda r: fmt_pct(r.sim_top1)),
    ("sim_top1_ci95_low", lambda r: _ci(r, "sim_top1_ci95", 0)),
    ("sim_top1_ci95_high", lambda r: _ci(r, "sim_top1_ci95", 1)),
    ("ort_top1", lambda r: fmt_pct(r.ort_top1)),
    ("ort_top1_ci95_low", lambda r: _ci(r, "ort_top1_ci95", 0)),
    ("ort_top1_ci95_high", lambda r: _ci(r, "ort_top1_ci95", 1)),
    ("sim_top5", lambda r: fmt_pct(r.sim_top5)),
    ("ort_top5", lambda r: fmt_pct(r.ort_top5)),
    ("num_eval_samples", lambda r: _plain(r.num_eval_samples)),
    ("num_calibration_samples", lambda r: _plain(r.num_calibration_samples)),
    ("source", lambda r: r.source),
    ("sim_minus_fp32", lambda r: fmt_delta(r.sim_minus_fp32)),
    ("published_fp32_top1", lambda r: fmt_pct(r.published_fp32.value if r.published_fp32 else None)),
    ("published_top1", lambda r: fmt_pct(r.published.value if r.published else None)),
    ("published_recipe", lambda r: r.published.recipe if r.published else ""),
    ("published_dataset", lambda r: (r.published or r.published_fp32).dataset if (r.published or r.published_fp32) else ""),
    ("fp32_minus_published_fp32", lambda r: fmt_delta(r.fp32_minus_published_fp32)),
    ("sim_minus_published", lambda r: fmt_delta(r.sim_minus_published)),
    ("published_minus_published_fp32", lambda r: fmt_delta(r.published_minus_fp32)),
    ("size_bytes", lambda r: _plain(r.size_bytes)),
    ("onnx_bytes", lambda r: _plain(r.onnx_bytes)),
    ("macs", lambda r: _plain(r.macs)),
    ("bitops", lambda r: _plain(r.bitops)),
    ("weight_bytes", lambda r: _plain(r.weight_bytes)),
    ("git_sha", lambda r: _plain(r.git_sha)),
    ("git_dirty", lambda r: _plain(r.git_dirty)),
    ("run_id", lambda r: r.run_id),
    ("record", lambda r: r.record),
)


def render_csv(rows: Sequence[ResultRow]) -> str:
    """The CSV text (header + one line per row, ``\\n`` line ends) for rows of one dataset."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name for name, _ in COLUMNS])
    for row in sorted(rows, key=lambda r: (r.model, r.recipe)):
        writer.writerow([value(row) for _, value in COLUMNS])
    return buffer.getvalue()
