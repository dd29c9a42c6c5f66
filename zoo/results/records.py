"""Reading run records for the tables: load, check the fields tables use, keep the newest per key.

A run record is the JSON file ``quantzoo run`` writes to ``results/runs/<run_id>.json`` (see
``zoo/cli/records.py``). The run id is ``<model>__<recipe>__<UTC stamp>__<8 hex>``; the stamp
orders records in time, and the whole run id breaks ties, so "the newest" is deterministic even
for runs started in the same second.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_SCHEMA_VERSIONS = (1,)
_RUN_ID_RE = re.compile(r"^(?P<model>.+)__(?P<recipe>.+)__(?P<stamp>\d{8}T\d{6}Z)__(?P<tag>[0-9a-f]{8})$")
_REQUIRED = ("run_id", "model", "recipe", "task", "dataset", "metrics", "artifacts", "provenance")


class RecordError(ValueError):
    """A run record cannot be tabulated; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class LoadedRecord:
    """One run record and the file it came from (``file_name`` is relative to the runs folder)."""

    file_name: str
    data: dict[str, Any]

    @property
    def key(self) -> tuple[str, str, str]:
        """``(dataset, model, recipe)``: the rows a table has."""
        return (self.data["dataset"], self.data["model"], self.data["recipe"])

    @property
    def stamp(self) -> str:
        """The UTC timestamp of the run id, ``YYYYmmddTHHMMSSZ``."""
        return _RUN_ID_RE.match(self.data["run_id"]).group("stamp")

    @property
    def order(self) -> tuple[str, str]:
        """Sort key: newer records sort later; equal stamps fall back to the run id."""
        return (self.stamp, self.data["run_id"])


def check_record(data: Any, file_name: str) -> dict[str, Any]:
    """Return ``data`` if it has what tables read, else raise :class:`RecordError` naming the field."""
    if not isinstance(data, dict):
        raise RecordError(f"{file_name}: a run record must be a JSON object; delete it or re-run `quantzoo run`")
    version = data.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise RecordError(f"{file_name}: schema_version={version!r} is not supported (supported: "
                          f"{list(SUPPORTED_SCHEMA_VERSIONS)}); upgrade quantzoo or re-run the recipe")
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise RecordError(f"{file_name}: missing field(s) {missing}; re-run `quantzoo run` to write a complete record")
    match = _RUN_ID_RE.match(str(data["run_id"]))
    if match is None or (match.group("model"), match.group("recipe")) != (data["model"], data["recipe"]):
        raise RecordError(f"{file_name}: run_id={data['run_id']!r} must be <model>__<recipe>__<YYYYmmddTHHMMSSZ>__<8 hex> "
                          "naming the record's model and recipe")
    if Path(file_name).stem != data["run_id"]:
        raise RecordError(f"{file_name}: file name does not match run_id={data['run_id']!r}; rename it to {data['run_id']}.json")
    for backend in ("fp32", "quantsim"):
        metrics = data["metrics"].get(backend)
        if not isinstance(metrics, dict) or not {"top1", "num_samples"} <= set(metrics):
            raise RecordError(f"{file_name}: metrics.{backend} needs top1 and num_samples; re-run the recipe")
    return data


def load_records(runs_dir: Path) -> list[LoadedRecord]:
    """Every ``*.json`` record in ``runs_dir``, checked, in file-name order (empty if the folder is missing)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    records = []
    for path in sorted(runs_dir.glob("*.json"), key=lambda p: p.name):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RecordError(f"{path.name}: not valid JSON ({err.msg} at line {err.lineno}); delete it or re-run the recipe") from None
        records.append(LoadedRecord(path.name, check_record(data, path.name)))
    return records


def newest_per_key(records: list[LoadedRecord]) -> list[LoadedRecord]:
    """The newest record of each ``(dataset, model, recipe)``, sorted by that key."""
    newest: dict[tuple[str, str, str], LoadedRecord] = {}
    for record in records:
        current = newest.get(record.key)
        if current is None or record.order > current.order:
            newest[record.key] = record
    return [newest[key] for key in sorted(newest)]


def superseded(records: list[LoadedRecord]) -> list[LoadedRecord]:
    """The records :func:`newest_per_key` leaves out (an older run of the same dataset, model and
    recipe), in file-name order."""
    kept = {record.file_name for record in newest_per_key(records)}
    return [record for record in records if record.file_name not in kept]
