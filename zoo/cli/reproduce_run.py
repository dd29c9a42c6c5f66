"""Re-run a recorded run from the resolved config in its record, and compare the two runs.

The original record is looked up by run id or as the newest record of ``MODEL/RECIPE`` in
``<results_dir>/runs``. The re-run uses :func:`zoo.cli.run.execute` on that config, merged into
the current run schema, so a key the schema no longer has fails with a message naming it and a
key added since then takes its default value (the comparison lists it). The re-run's own record
is never written to ``results/runs``: it goes to a temporary folder and is then embedded in the
reproduction report ``<out_dir>/<new run id>.json``, next to the comparison. Its artifacts go
to ``<artifacts_dir>/<new run id>/``.

The re-run uses the original's torch intra-op thread count (``provenance.hardware.torch_threads``)
when the record has one: float reductions are summed in a thread-dependent order, so the thread
count is part of what makes two CPU runs bit-identical.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from quantlib.io import atomic_write_text
from quantlib.threads import torch_threads

from .records import RECORD_SCHEMA_VERSION
from .reproduce_compare import DEFAULT_TOLERANCE, Comparison, compare_records
from .run import execute
from .schema import RunConf

REPORT_KIND = "quantzoo.reproduction"
_RESERVED_OVERRIDES = {"results_dir": "--results-dir/--out", "artifacts_dir": "--artifacts-dir"}


class ReproduceError(ValueError):
    """A reproduce request cannot be carried out; the message names the argument and the fix."""


@dataclass(frozen=True)
class Reproduction:
    """What :func:`reproduce` returns: both records, the comparison and the report path."""

    original: dict[str, Any]
    reproduced: dict[str, Any]
    comparison: Comparison
    report_path: Path


def find_record(target: str, results_dir: str | Path = "results") -> Path:
    """The record file for ``target``: a run id, ``MODEL/RECIPE`` (newest record) or a .json path."""
    runs = Path(results_dir) / "runs"
    if target.endswith(".json"):
        path = Path(target)
    elif "/" in target:
        model, _, recipe = target.partition("/")
        paths = sorted(runs.glob(f"{model}__{recipe}__*.json"))
        if not paths:
            raise ReproduceError(f"no run record for {target} in {runs}; run `quantzoo run {target}` first "
                                 f"or pass --results-dir")
        return paths[-1]
    else:
        path = runs / f"{target}.json"
    if not path.is_file():
        raise ReproduceError(f"run record {path} does not exist; pass a run id from {runs}, MODEL/RECIPE "
                             f"or the path of a record")
    return path


def run_config(record: dict[str, Any], *, results_dir: str | Path, artifacts_dir: str | Path,
               overrides: Sequence[str] = ()) -> DictConfig:
    """The record's resolved config on the current schema, writing to the given folders.

    ``overrides`` are ``key=value`` strings (e.g. ``data.root=/data/imagenet-sample-1k``) applied
    last; ``results_dir`` and ``artifacts_dir`` cannot be overridden this way.
    """
    for item in overrides:
        key = item.partition("=")[0].strip()
        if "=" not in item:
            raise ReproduceError(f"override {item!r} is not key=value; e.g. data.root=/path/to/imagenet-sample-1k")
        if key in _RESERVED_OVERRIDES:
            raise ReproduceError(f"override {key}= is set by reproduce; use {_RESERVED_OVERRIDES[key]} instead")
    try:
        config = record["provenance"]["config"]
    except (KeyError, TypeError):
        raise ReproduceError(f"record {record.get('run_id', '?')} has no provenance.config; it cannot be reproduced") from None
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConf), config)
        cfg.results_dir = str(results_dir)
        cfg.artifacts_dir = str(artifacts_dir)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        message = str(err).splitlines()[0]
        raise ReproduceError(f"the record's config does not fit the current recipe schema ({message}); "
                             f"fix the key with an override or reproduce with the quantzoo version that wrote it") from None
    return cfg


def explain_artifact_difference(original_path: str | Path, reproduced_path: str | Path) -> str | None:
    """Why two artifact files differ when their content is the same; None when it cannot tell.

    safetensors: same header (as JSON) and same tensor bytes, so only the key order of the JSON
    header differs. ONNX: same graph once doc strings, producer fields and the exporter's debug
    metadata (source stack traces, which name the checkout's path) are cleared.
    """
    a, b = Path(original_path), Path(reproduced_path)
    if not (a.is_file() and b.is_file()):
        return None
    if a.suffix == ".safetensors":
        (ha, da), (hb, db) = _safetensors_parts(a), _safetensors_parts(b)
        if ha == hb and da == db:
            return (f"{b.name}: same tensors and metadata; only the key order of the safetensors JSON header "
                    f"differs (safetensors writes __metadata__ in hash-map order, which changes from call to call)")
    if a.suffix == ".onnx":
        if _onnx_without_doc(a) == _onnx_without_doc(b):
            return (f"{b.name}: same graph and weights; only ONNX doc strings, producer fields or the exporter's "
                    "debug metadata (source paths and line numbers) differ")
    return None


def _safetensors_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]), data[8 + size:]


def _onnx_without_doc(path: Path) -> bytes:
    import onnx

    from quantlib.export import strip_debug_metadata

    model = strip_debug_metadata(onnx.load(str(path)))
    model.producer_version = ""
    model.doc_string = ""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        graph.doc_string = ""
        for node in graph.node:
            node.doc_string = ""
            graphs += [attr.g for attr in node.attribute if attr.HasField("g")]
    return model.SerializeToString(deterministic=True)


def reproduce(record_path: str | Path, *, tolerance: float = DEFAULT_TOLERANCE, out_dir: str | Path = "results/reproduced",
              artifacts_dir: str | Path = "artifacts/reproduced", overrides: Sequence[str] = ()) -> Reproduction:
    """Re-run the record at ``record_path``, compare, and write the reproduction report.

    Returns the :class:`Reproduction`; ``comparison.passed`` is the verdict. Writes
    ``<out_dir>/<new run id>.json`` (atomically) and the new artifacts; nothing under
    ``results/runs`` is touched.
    """
    record_path = Path(record_path)
    original = json.loads(record_path.read_text())
    threads = original.get("provenance", {}).get("hardware", {}).get("torch_threads")
    threads = threads if isinstance(threads, int) and threads > 0 else None  # None: keep this process's count
    with tempfile.TemporaryDirectory(prefix="quantzoo-reproduce-") as tmp, torch_threads(threads):
        executed = execute(run_config(original, results_dir=tmp, artifacts_dir=artifacts_dir, overrides=overrides))
        reproduced = json.loads(Path(executed["record_path"]).read_text())
    comparison = compare_records(original, reproduced, tolerance=tolerance)
    for kind in sorted(set(original["artifacts"]) & set(reproduced["artifacts"])):
        if original["artifacts"][kind]["sha256"] != reproduced["artifacts"][kind]["sha256"]:
            reason = explain_artifact_difference(original["artifacts"][kind]["path"], reproduced["artifacts"][kind]["path"])
            if reason:
                comparison.notes.append(reason)
    report = {
        "schema_version": RECORD_SCHEMA_VERSION,
        "kind": REPORT_KIND,
        "original_record": str(record_path),
        "comparison": comparison.to_dict(),
        "record": reproduced,
    }
    path = atomic_write_text(Path(out_dir) / f"{reproduced['run_id']}.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    return Reproduction(original=original, reproduced=reproduced, comparison=comparison, report_path=path)
