"""Compare a reproduced run record with the original one: what differs, and whether it passes.

Pure functions over two run-record dicts (see :mod:`zoo.cli.records`); nothing is read or written.

The verdict depends on whether the two runs had the same environment, that is the same
package versions, Python, platform, hardware (CPU, core count, torch threads, GPU) and code
(git sha and dirty flag):

* ``exact`` (same environment): every metric (top-1, top-5, loss, counts; not the seconds), every
  top-1 agreement and every exported artifact sha256 must be identical.
* ``tolerance`` (anything in the environment differs): each backend's top-1 may move by at
  most ``tolerance`` points; differing artifact hashes are listed but do not fail.

In both modes the run inputs (dataset fingerprints, calibration sample ids, checkpoint sha256)
must match, every backend of the original must be present and sample counts must agree, since
without these it is a different experiment rather than a reproduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

DEFAULT_TOLERANCE = 0.5  # top-1 points: a few predictions on a few hundred samples
ABSENT = "<absent>"

# Fields `quantzoo reproduce` sets itself (it writes outside results/runs on purpose).
OVERRIDDEN_FIELDS = ("config.results_dir", "config.artifacts_dir")
# Provenance that decides the numbers besides the inputs; equal everywhere means "exact" mode.
ENVIRONMENT_PREFIXES = ("packages.", "python", "platform", "hardware.", "git.sha", "git.dirty")
# Provenance that defines the experiment's inputs.
INPUT_PREFIXES = ("dataset_fingerprint.", "calibration_sample_ids", "checkpoint_sha256", "quantized_checkpoint_sha256")
# Metric fields compared when the original has them; "seconds" is a timing and "top1_ci95"
# follows from the counts.
METRIC_FIELDS = ("top1", "top5", "loss", "num_samples", "num_correct_top1", "num_correct_top5", "topk",
                 "predictions_sha256", "backend")
_LONG_LIST = 8


@dataclass(frozen=True)
class FieldDifference:
    """One dotted field whose value differs; long lists are summarised."""

    field: str
    original: Any
    reproduced: Any

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "original": self.original, "reproduced": self.reproduced}


@dataclass(frozen=True)
class MetricDelta:
    """One metric of one backend in both runs; ``delta`` is reproduced - original (numbers only)."""

    backend: str
    metric: str
    original: Any
    reproduced: Any

    @property
    def delta(self) -> float | None:
        if _is_number(self.original) and _is_number(self.reproduced):
            return float(self.reproduced) - float(self.original)
        return None

    @property
    def changed(self) -> bool:
        return self.original != self.reproduced

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "metric": self.metric, "original": self.original,
                "reproduced": self.reproduced, "delta": self.delta}


@dataclass
class Comparison:
    """The outcome of :func:`compare_records`; ``passed`` is the verdict."""

    original_run_id: str
    reproduced_run_id: str
    mode: str  # "exact" | "tolerance"
    tolerance: float
    provenance: list[FieldDifference] = field(default_factory=list)
    metrics: list[MetricDelta] = field(default_factory=list)
    agreement: list[MetricDelta] = field(default_factory=list)
    artifacts: list[FieldDifference] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def identical(self) -> bool:
        """Every compared metric, agreement and artifact hash is the same."""
        return not self.artifacts and not any(m.changed for m in (*self.metrics, *self.agreement))

    def to_dict(self) -> dict[str, Any]:
        return {
            "original_run_id": self.original_run_id,
            "reproduced_run_id": self.reproduced_run_id,
            "mode": self.mode,
            "tolerance_top1_points": self.tolerance,
            "passed": self.passed,
            "identical": self.identical,
            "failures": list(self.failures),
            "notes": list(self.notes),
            "provenance_differences": [d.to_dict() for d in self.provenance],
            "metrics": [m.to_dict() for m in self.metrics],
            "agreement": [m.to_dict() for m in self.agreement],
            "artifact_differences": [d.to_dict() for d in self.artifacts],
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key in sorted(data):
        value = data[key]
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _summarise(value: Any, other: Any) -> Any:
    if isinstance(value, list) and len(value) > _LONG_LIST:
        if isinstance(other, list):
            differ = sum(a != b for a, b in zip(value, other)) + abs(len(value) - len(other))
            return f"[{len(value)} items; {differ} differ from the other run]"
        return f"[{len(value)} items]"
    return value


def provenance_differences(original: dict[str, Any], reproduced: dict[str, Any]) -> list[FieldDifference]:
    """Dotted provenance fields whose values differ, sorted.

    Fields reproduce sets itself are skipped, and a field one record lacks counts as equal to a
    null in the other (a setting added to the schema later, at its null default).
    """
    old, new = dict(_flatten(original)), dict(_flatten(reproduced))
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in OVERRIDDEN_FIELDS:
            continue
        a, b = old.get(key, ABSENT), new.get(key, ABSENT)
        if a != b and not ((a is None and b == ABSENT) or (b is None and a == ABSENT)):
            diffs.append(FieldDifference(key, _summarise(a, b), _summarise(b, a)))
    return diffs


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p) for p in prefixes)


def _metric_deltas(original: dict[str, Any], reproduced: dict[str, Any], failures: list[str]) -> list[MetricDelta]:
    deltas = []
    for backend in sorted(original):
        if backend not in reproduced:
            failures.append(f"metrics.{backend} is missing from the reproduced run")
            continue
        for metric in METRIC_FIELDS:
            if metric in original[backend]:
                deltas.append(MetricDelta(backend, metric, original[backend].get(metric, ABSENT),
                                          reproduced[backend].get(metric, ABSENT)))
    return deltas


def compare_records(original: dict[str, Any], reproduced: dict[str, Any], *,
                    tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    """Compare two run records of the same recipe; see the module docstring for the rules.

    ``tolerance`` is in top-1 percentage points and must be finite and >= 0.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"--tolerance={tolerance!r} must be a number of top-1 points >= 0, e.g. 0.5")
    provenance = provenance_differences(original["provenance"], reproduced["provenance"])
    environment = [d for d in provenance if _matches(d.field, ENVIRONMENT_PREFIXES)]
    inputs = [d for d in provenance if _matches(d.field, INPUT_PREFIXES)]
    mode = "tolerance" if environment else "exact"
    failures: list[str] = []
    notes: list[str] = []
    if environment:
        notes.append("environment differs (" + ", ".join(d.field for d in environment)
                     + f"): top-1 may move by up to {tolerance:g} points and artifact hashes may differ")
    elif original["provenance"].get("git", {}).get("dirty"):
        notes.append("both runs come from a dirty working tree at the same commit; code identity is assumed")
    for diff in inputs:
        failures.append(f"{diff.field} differs ({diff.original} -> {diff.reproduced}): the inputs are not the same")

    metrics = _metric_deltas(original["metrics"], reproduced["metrics"], failures)
    agreement = [MetricDelta("agreement", key, original.get("agreement", {}).get(key, ABSENT),
                             reproduced.get("agreement", {}).get(key, ABSENT))
                 for key in sorted(set(original.get("agreement", {})) | set(reproduced.get("agreement", {})))]
    artifacts = []
    for kind in sorted(set(original.get("artifacts", {})) | set(reproduced.get("artifacts", {}))):
        a = original.get("artifacts", {}).get(kind, {}).get("sha256", ABSENT)
        b = reproduced.get("artifacts", {}).get(kind, {}).get("sha256", ABSENT)
        if a != b:
            artifacts.append(FieldDifference(f"artifacts.{kind}.sha256", a, b))

    for m in metrics:
        if m.metric == "num_samples" and m.changed:
            failures.append(f"metrics.{m.backend}.num_samples {m.original} -> {m.reproduced}: a different evaluation set")
    if mode == "exact":
        for m in (*metrics, *agreement):
            if m.changed and m.metric != "num_samples":
                failures.append(f"{'' if m.backend == 'agreement' else 'metrics.'}{m.backend}.{m.metric} "
                                f"{m.original} -> {m.reproduced}: the same environment must give identical metrics")
        for diff in artifacts:
            failures.append(f"{diff.field} {diff.original} -> {diff.reproduced}: "
                            f"the same environment must export identical files")
    else:
        for m in metrics:
            if m.metric == "top1" and (m.delta is None or abs(m.delta) > tolerance):
                failures.append(f"metrics.{m.backend}.top1 {m.original} -> {m.reproduced} moved more than "
                                f"--tolerance={tolerance:g} points")
        if artifacts:
            notes.append(f"{len(artifacts)} artifact hash(es) differ; expected when the environment differs")
    return Comparison(
        original_run_id=original["run_id"], reproduced_run_id=reproduced["run_id"], mode=mode,
        tolerance=float(tolerance), provenance=provenance, metrics=metrics, agreement=agreement,
        artifacts=artifacts, failures=failures, notes=notes,
    )


def format_comparison(comparison: Comparison) -> str:
    """A human-readable report: verdict, top-1 per backend, other changed metrics, differences."""
    c = comparison
    verdict = "PASS" if c.passed else "FAIL"
    what = "identical" if c.identical else "not identical"
    lines = [f"reproduce {c.original_run_id} -> {c.reproduced_run_id}: {verdict} "
             f"({c.mode} mode, tolerance {c.tolerance:g} top-1 points; results {what})",
             f"{'backend':<14}{'top1 original':>15}{'reproduced':>12}{'delta':>9}"]
    for m in c.metrics:
        if m.metric == "top1":
            delta = "n/a" if m.delta is None else f"{m.delta:+.3f}"
            lines.append(f"{m.backend:<14}{_fmt(m.original):>15}{_fmt(m.reproduced):>12}{delta:>9}")
    changed = [m for m in (*c.metrics, *c.agreement) if m.changed and m.metric != "top1"]
    if changed:
        lines.append("other metrics that changed:")
        lines += [f"  {m.backend}.{m.metric}: {_fmt(m.original)} -> {_fmt(m.reproduced)}" for m in changed]
    if c.provenance:
        lines.append("provenance that differs:")
        lines += [f"  {d.field}: {d.original} -> {d.reproduced}" for d in c.provenance]
    if c.artifacts:
        lines.append("artifacts that differ:")
        lines += [f"  {d.field}: {d.original} -> {d.reproduced}" for d in c.artifacts]
    lines += [f"note: {n}" for n in c.notes]
    lines += [f"failure: {f}" for f in c.failures]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
