"""`quantzoo bench MODEL/RECIPE`: speed, memory and size of every stage of one recipe.

For one recipe (composed like `quantzoo run`, Hydra overrides allowed) it measures, taking the
median, min and max of ``repeats`` timed repeats after a warm-up:

* torch, on each requested device that is there (:mod:`zoo.cli.bench_torch`): the quantize
  stage (QuantSim build, calibration time per sample, the seconds of each PTQ step, peak
  memory), FP32 and simulated eval throughput and their time ratio, and export time;
* ONNX Runtime, on each device with a provider (:mod:`zoo.cli.bench_ort`): batch-1 latency,
  batch-32 throughput and the peak resident memory of a fresh process serving the FP32 model
  and quantzoo's int8 QDQ model;
* the file sizes of the FP32 ONNX, int8 ONNX, integer-weight safetensors and encodings files;
* with ``peer_methods`` (`quantzoo bench --peer`): ONNX Runtime's own ``quantize_static`` on the
  same FP32 ONNX model and calibration images, one model per calibrate method
  (:mod:`zoo.cli.bench_peer`), scored by the same evaluator on the recipe's whole eval split next
  to quantzoo's int8 model and the FP32 model, with each one's quantization time.

Rows are appended to ``<out_dir>/<machine slug>.csv`` (:mod:`zoo.cli.bench_report`), and
``<out_dir>/<machine slug>.md`` is re-rendered from the whole CSV (:mod:`zoo.cli.bench_summary`). A device
that is not there (no CUDA, or no CUDA provider in onnxruntime) is skipped and the reason is
returned; when no requested device is there, nothing is measured or written.
"""

from __future__ import annotations

import datetime as _dt
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from quantlib.io import atomic_write_text
from zoo.builder import build_fp32_model
from zoo.registry import default_registry

from .bench_machine import machine_info
from .bench_measure import Stat
from .bench_ort import export_fp32_onnx, measure_ort, ort_provider, save_inputs
from .bench_peer import PeerSettings, accuracy_rows, check_methods, onnx_accuracy, run_peers
from .bench_report import BenchRow, append_csv, format_table, row_dicts
from .bench_summary import parse_csv, peer_section, render_summary
from .bench_torch import BenchConfigError, TorchBench
from .run import quant_config, recipe_datasets, resolve_config

DEVICES = ("cpu", "cuda")
THROUGHPUT_BATCH = 32


@dataclass
class BenchResult:
    """What :func:`bench` measured and where it wrote it."""

    model: str
    recipe: str
    rows: list[BenchRow]
    machine: dict[str, Any]
    csv_path: Path | None  # None when every device was skipped and nothing was written
    bench_id: str | None = None
    skipped: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The printed summary: machine, torch stages, ONNX Runtime FP32 vs int8, the peer comparison, skips, CSV path."""
        m = self.machine
        title = (f"{self.model}/{self.recipe} on {m['machine']} ({m['cpu']}, {m['cpu_count']} cores, "
                 f"{m['torch_threads']} torch threads, load average {m.get('load_avg_1m')} at start)")
        lines = [format_table(self.rows, title=title)]
        if self.csv_path is not None:
            as_csv = row_dicts(self.rows, model=self.model, recipe=self.recipe, machine=self.machine,
                               bench_id=self.bench_id or "", measured_at="")
            peer = peer_section(as_csv, self.recipe)
            lines += ["", *peer] if peer else []
        lines += [f"skipped: {reason}" for reason in self.skipped]
        lines.append(f"csv: {self.csv_path} (bench_id {self.bench_id})" if self.csv_path
                     else "nothing measured; no csv written")
        return "\n".join(lines)


def compose_recipe(target: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved config of ``MODEL/RECIPE`` with Hydra ``overrides``, as `quantzoo run` composes it."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    from . import _recipes
    from .schema import register_schemas

    model, _, recipe = target.partition("/")
    recipes = _recipes()
    if model not in recipes or recipe not in recipes[model]:
        known = ", ".join(f"{m}/{r}" for m, rs in recipes.items() for r in rs)
        raise BenchConfigError(f"unknown recipe {target!r}; choose MODEL/RECIPE from: {known}")
    register_schemas()
    try:
        with initialize_config_module(config_module="recipes", version_base="1.3"):
            cfg = compose(config_name=f"{model}/{recipe}", overrides=list(overrides))
    except HydraException as err:
        cause = err.__cause__ or err
        raise BenchConfigError(f"override rejected: {str(cause).splitlines()[0]}") from None
    return resolve_config(cfg)


def check_request(resolved: dict[str, Any], devices: Sequence[str], repeats: int, samples: int) -> list[str]:
    """The devices deduplicated; BenchConfigError naming the setting for anything bench cannot measure."""
    bad = [d for d in devices if d not in DEVICES]
    if bad or not devices:
        raise BenchConfigError(f"--devices={','.join(devices)} is not valid; use a comma list of {','.join(DEVICES)}")
    if repeats < 1 or samples < 1:
        raise BenchConfigError(f"--repeats={repeats} and --samples={samples} must both be >= 1")
    if resolved.get("checkpoint") is not None:
        raise BenchConfigError(f"checkpoint={resolved['checkpoint']}: bench measures calibration and export, "
                               f"so it starts from the FP32 model; drop checkpoint=")
    if (resolved.get("compress") or {}).get("steps"):
        raise BenchConfigError("compress.steps is not benchmarked yet (quantzoo run records its seconds under "
                               "timings.compress); bench with compress.steps=[]")
    if (resolved.get("qat") or {}).get("enabled"):
        raise BenchConfigError("qat.enabled=true is not benchmarked yet (quantzoo run records its seconds under "
                               "timings.qat); bench with qat.enabled=false")
    return list(dict.fromkeys(devices))


def _loaded(dataset, batch_size: int, limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of ``dataset`` (its first ``limit`` samples) decoded into memory."""
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return list(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False))


def _size_rows(files: dict[str, Path]) -> list[BenchRow]:
    return [BenchRow("cpu", stage, "file_size", "bytes", Stat.single(path.stat().st_size), note=path.name)
            for stage, path in files.items()]


def _quantize_time(rows: Sequence[BenchRow], device: str) -> BenchRow | None:
    """quantzoo's own quantization time on ``device``: the torch quantize and export stages added up."""
    parts = [next((r for r in rows if (r.device, r.stage, r.metric) == (device, stage, "seconds")), None)
             for stage in ("torch_quantize", "torch_export")]
    if None in parts:
        return None
    total = Stat(*(sum(getattr(p.stat, f) for p in parts) for f in ("median", "min", "max")),
                 min(p.stat.repeats for p in parts))
    return BenchRow("cpu", "onnx_int8", "quantize_time", "s", total, samples=parts[0].samples,
                    note=f"torch_quantize + torch_export on {device} (QuantSim build, calibration, PTQ steps, "
                         f"QDQ ONNX export), each the median of its repeats after a warm-up")


def _peer_rows(rows: Sequence[BenchRow], models: dict[str, Path], cal_batches, evaluation, *, settings: PeerSettings,
               methods: Sequence[str], repeats: int, ev: dict[str, Any], device: str, work: Path) -> list[BenchRow]:
    """Accuracy of the FP32 and quantzoo int8 ONNX models, quantzoo's quantization time, and each peer's rows."""
    out = []
    for stage, path in models.items():
        out += accuracy_rows(stage, onnx_accuracy(path, evaluation, batch_size=ev["batch_size"],
                                                  num_workers=ev["num_workers"]))
    ours = _quantize_time(rows, device)
    if ours is not None:
        out.append(ours)
    return out + run_peers(models["onnx_fp32"], [images for images, _ in cal_batches], evaluation, settings=settings,
                           methods=methods, repeats=repeats, eval_batch_size=ev["batch_size"], work=work,
                           num_workers=ev["num_workers"])


def _ort_rows(models: dict[str, Path], inputs: Path, device: str, provider: str, repeats: int) -> list[BenchRow]:
    rows = []
    for stage, path in models.items():
        speed = measure_ort(path, inputs, provider=provider, repeats=repeats)
        rows += [
            BenchRow(device, stage, "latency_b1", "ms", speed["latency_b1_ms"], samples=1),
            BenchRow(device, stage, "throughput_b32", "img/s", speed["throughput_b32"], samples=THROUGHPUT_BATCH),
            BenchRow(device, stage, "peak_rss", "MiB", Stat.single(speed["peak_rss_mib"]),
                     note=f"fresh onnxruntime process; {speed['baseline_rss_mib']:.0f} MiB before the session"),
            BenchRow(device, stage, "session_init", "s", Stat.single(speed["session_seconds"])),
        ]
    return rows


def bench(target: str, *, overrides: Sequence[str] = (), repeats: int = 3, samples: int = 128,
          devices: Sequence[str] = DEVICES, out_dir: str | Path = "results/bench",
          peer_methods: Sequence[str] | None = None, peer_repeats: int = 1) -> BenchResult:
    """Benchmark ``MODEL/RECIPE``; appends its rows to ``<out_dir>/<machine>.csv`` and returns them.

    ``samples``: eval images per torch throughput pass (the first ones of the eval split; the
    first 32 of them feed ONNX Runtime). The calibration split is the recipe's, whole.
    ``peer_methods`` (None: no peer) lists the ``quantize_static`` calibrate methods to compare
    with, each timed ``peer_repeats`` times; accuracy is over the recipe's whole eval split.
    """
    resolved = compose_recipe(target, overrides)
    devices = check_request(resolved, devices, repeats, samples)
    settings = None
    if peer_methods is not None:
        peer_methods = check_methods(peer_methods)
        if peer_repeats < 1:
            raise BenchConfigError(f"--peer-repeats={peer_repeats} must be >= 1")
        settings = PeerSettings.from_quant_config(quant_config(resolved["quant"]))
    card = default_registry().get(resolved["model"]["name"])
    machine = machine_info()
    available = [d for d in devices if d != "cuda" or torch.cuda.is_available()]
    skipped = [f"{d}: torch.cuda.is_available() is False on this machine" for d in devices if d not in available]
    if not available:
        return BenchResult(card.name, resolved["recipe"], [], machine, None, None, skipped)
    torch.manual_seed(resolved["seed"])
    data, ev = resolved["data"], resolved["evaluator"]
    calibration, evaluation = recipe_datasets(card, data)
    cal_batches = _loaded(calibration, data["calibration_batch_size"])
    eval_batches = [images for images, _ in _loaded(evaluation, ev["batch_size"], samples)]
    fp32 = build_fp32_model(card).eval()
    qconfig = quant_config(resolved["quant"])
    rows: list[BenchRow] = []

    with tempfile.TemporaryDirectory(prefix="quantzoo-bench-") as tmp:
        work = Path(tmp)
        artifacts = None
        for device in available:
            tb = TorchBench(fp32, qconfig, cal_batches, eval_batches, torch.device(device), repeats,
                            calibration_set=calibration, eval_batch_size=ev["batch_size"])
            sim = tb.quantize(list(resolved["ptq"]["steps"]))
            tb.evaluate(sim)
            if artifacts is None:  # the ONNX files are made once, from the first device's sim
                artifacts = tb.export(sim, work / "quantzoo", f"{card.name}-{resolved['recipe']}")
            rows += tb.rows
        fp32_onnx = export_fp32_onnx(fp32, cal_batches[0][0][:1], work / f"{card.name}-fp32.onnx")
        models = {"onnx_fp32": fp32_onnx, "onnx_int8": artifacts.onnx}
        rows += _size_rows(models)
        inputs = save_inputs(torch.cat(eval_batches)[:THROUGHPUT_BATCH], work / "inputs.npy")
        for device in available:
            provider, reason = ort_provider(device)
            if provider is None:
                skipped.append(f"onnxruntime on {device}: {reason}")
            else:
                rows += _ort_rows(models, inputs, device, provider, repeats)
        if settings is not None:
            rows += _peer_rows(rows, models, cal_batches, evaluation, settings=settings, methods=peer_methods,
                               repeats=peer_repeats, ev=ev, device=available[0], work=work)

    now = _dt.datetime.now(_dt.timezone.utc)
    bench_id = f"{now:%Y%m%dT%H%M%SZ}__{uuid.uuid4().hex[:8]}"
    summary = Path(out_dir) / f"{machine['machine']}.md"
    csv_path = append_csv(Path(out_dir) / f"{machine['machine']}.csv",
                          row_dicts(rows, model=card.name, recipe=resolved["recipe"], machine=machine,
                                    bench_id=bench_id, measured_at=f"{now:%Y-%m-%dT%H:%M:%SZ}"),
                          then=lambda text: atomic_write_text(summary, render_summary(parse_csv(text), machine["machine"])))
    return BenchResult(card.name, resolved["recipe"], rows, machine, csv_path, bench_id, skipped)
