"""One table row per run record: our numbers from the record, the published ones from the model card.

Nothing here is typed in by hand: every value is read from a run record (metrics, config, artifacts,
``cost``) or from the model card's :class:`~zoo.card.PublishedResult` entries. A published result
matches a row by the record's recipe name first, then by its bit-widths (``w8a8`` for 8-bit weights
and activations), which is how the AIMET model zoo names its columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zoo.card import ModelCard, PublishedResult

from .records import LoadedRecord


@dataclass(frozen=True)
class ResultRow:
    """The numbers of one run, in percent for accuracies; ``None`` where the record has no value.

    ``source`` is how the simulated model got its encodings: ``calibration`` (on
    ``num_calibration_samples`` images) or ``published_checkpoint`` (loaded; no calibration count).
    ``weight_bits``/``activation_bits`` are the recipe's, or None with ``mixed_precision`` true when
    a mixed-precision search left the model in formats other than the recipe's (see
    :func:`final_precision`).
    """

    dataset: str
    task: str
    model: str
    recipe: str
    weight_bits: int | None
    activation_bits: int | None
    mixed_precision: bool
    quant_config: str | None
    fp32_top1: float
    sim_top1: float
    sim_top1_ci95: tuple[float, float] | None
    ort_top1: float | None
    ort_top1_ci95: tuple[float, float] | None
    sim_top5: float | None
    ort_top5: float | None
    num_eval_samples: int
    num_calibration_samples: int | None
    source: str
    size_bytes: int | None
    onnx_bytes: int | None
    macs: int | None
    bitops: int | None
    weight_bytes: int | None
    published_fp32: PublishedResult | None
    published: PublishedResult | None
    git_sha: str | None
    git_dirty: bool | None
    run_id: str
    run_stamp: str
    record: str

    @property
    def bits_key(self) -> str | None:
        """``w<weight bits>a<activation bits>`` (``w8a8``), or None when the record lacks the bits."""
        if self.weight_bits is None or self.activation_bits is None:
            return None
        return f"w{self.weight_bits}a{self.activation_bits}"

    @property
    def sim_minus_fp32(self) -> float:
        return self.sim_top1 - self.fp32_top1

    @property
    def sim_minus_published(self) -> float | None:
        return None if self.published is None else self.sim_top1 - self.published.value

    @property
    def fp32_minus_published_fp32(self) -> float | None:
        return None if self.published_fp32 is None else self.fp32_top1 - self.published_fp32.value

    @property
    def published_minus_fp32(self) -> float | None:
        """The published quantized accuracy minus the published FP32 accuracy (its drop)."""
        if self.published is None or self.published_fp32 is None:
            return None
        return self.published.value - self.published_fp32.value


def _interval(metrics: dict[str, Any] | None) -> tuple[float, float] | None:
    ci = (metrics or {}).get("top1_ci95")
    return (float(ci[0]), float(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None


def _get(mapping: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(mapping, dict) or name not in mapping:
            return None
        mapping = mapping[name]
    return mapping


def _published(card: ModelCard | None, recipe: str, bits_key: str | None) -> PublishedResult | None:
    if card is None:
        return None
    result = card.published_result(recipe, "top1")
    if result is None and bits_key is not None:
        result = card.published_result(bits_key, "top1")
    return result


def _mixed_precision_summaries(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Summaries of the mixed-precision searches that shaped the model: ``mixed_precision`` steps and
    the kept ``mixed_precision`` rung of an AutoQuant step that applied it."""
    found = []
    for step in _get(record, "ptq", "steps") or []:
        summary = step.get("summary") or {}
        if step.get("name") == "mixed_precision":
            found.append(summary)
        elif step.get("name") == "autoquant" and "mixed_precision" in (summary.get("applied") or []):
            found.extend(t.get("summary") or {} for t in summary.get("trials", [])
                         if t.get("rung") == "mixed_precision" and t.get("kept"))
    return found


def final_precision(record: Mapping[str, Any]) -> tuple[int | None, int | None, bool]:
    """(weight bits, activation bits, mixed) of the model a record evaluated.

    The recipe's ``quant.weight_bits``/``activation_bits``, unless a mixed-precision search chose
    any other candidate for some layer group (``groups_per_candidate`` of its summary): then
    ``(None, None, True)``, because the model mixes formats (groups outside the search keep the
    recipe's bits).
    """
    quant = _get(record, "provenance", "config", "quant") or {}
    weight_bits, activation_bits = quant.get("weight_bits"), quant.get("activation_bits")
    recipe_key = None if weight_bits is None or activation_bits is None else f"w{weight_bits}a{activation_bits}"
    for summary in _mixed_precision_summaries(record):
        if set(summary.get("groups_per_candidate") or {}) - {recipe_key}:
            return None, None, True
    return weight_bits, activation_bits, False


def row_from_record(loaded: LoadedRecord, card: ModelCard | None) -> ResultRow:
    """Build the row of one run record; ``card`` (None for a model no longer in the zoo) adds published numbers."""
    r = loaded.data
    metrics = r["metrics"]
    quant = _get(r, "provenance", "config", "quant") or {}
    weight_bits, activation_bits, mixed = final_precision(r)
    bits_key = None if weight_bits is None or activation_bits is None else f"w{weight_bits}a{activation_bits}"
    ort = metrics.get("onnxruntime")
    cost = r.get("cost") or {}
    calibration_ids = _get(r, "provenance", "calibration_sample_ids")
    source = _get(r, "source", "kind") or "calibration"  # records before the source block always calibrated
    return ResultRow(
        dataset=r["dataset"],
        task=r["task"],
        model=r["model"],
        recipe=r["recipe"],
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        mixed_precision=mixed,
        quant_config=quant.get("config"),
        fp32_top1=float(metrics["fp32"]["top1"]),
        sim_top1=float(metrics["quantsim"]["top1"]),
        sim_top1_ci95=_interval(metrics["quantsim"]),
        ort_top1=None if ort is None else float(ort["top1"]),
        ort_top1_ci95=_interval(ort),
        sim_top5=metrics["quantsim"].get("top5"),
        ort_top5=None if ort is None else ort.get("top5"),
        num_eval_samples=int(metrics["quantsim"]["num_samples"]),
        num_calibration_samples=len(calibration_ids) if calibration_ids and source == "calibration" else None,
        source=source,
        size_bytes=_get(r, "artifacts", "weights", "bytes"),
        onnx_bytes=_get(r, "artifacts", "onnx", "bytes"),
        macs=cost.get("macs"),
        bitops=cost.get("bitops"),
        weight_bytes=cost.get("weight_bytes"),
        published_fp32=_published(card, "fp32", None),
        published=_published(card, r["recipe"], bits_key),
        git_sha=_get(r, "provenance", "git", "sha"),
        git_dirty=_get(r, "provenance", "git", "dirty"),
        run_id=r["run_id"],
        run_stamp=loaded.stamp,
        record=f"runs/{loaded.file_name}",
    )


def fp32_reference(rows: Sequence[ResultRow], model: str) -> float:
    """``model``'s FP32 top-1 from its newest row (every run evaluates FP32; the newest one speaks)."""
    return max((r for r in rows if r.model == model), key=lambda r: (r.run_stamp, r.run_id)).fp32_top1
