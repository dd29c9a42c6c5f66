"""`quantzoo run MODEL/RECIPE`: FP32, simulated and ONNX Runtime accuracy side by side.

This is where zoo, quantlib and evaluators meet. Stages (each timed):
    build_fp32 -> eval_fp32 -> [compress -> eval_compressed] -> prepare (model-level PTQ steps,
    QuantSim) -> calibrate -> [ptq_<step> for each sim-level PTQ step] -> [qat] -> eval_quantsim ->
    export -> eval_onnxruntime -> record.
The bracketed stages run when the recipe's ``compress.steps``, ``ptq.steps`` or ``qat.enabled``
ask for them (:mod:`zoo.cli.compress_stage`, :mod:`zoo.cli.quantize_stage`,
:mod:`zoo.cli.qat_stage`). Calibration, PTQ searches and QAT use the calibration split only;
evaluation uses the eval split only.

With ``checkpoint=download`` or ``checkpoint=<published folder>`` the run starts from published
artifacts instead: fetch_checkpoint -> (check they fit the recipe) -> prepare ->
load_checkpoint (integer weights and encodings, no calibration) -> eval_quantsim ->
eval_onnxruntime on the *published* ONNX file. ``calibrate`` and ``export`` are listed in the
record's ``skipped_stages``, ``source`` says where the model came from, and the provenance holds
the artifacts' sha256. The same artifacts and eval data give the same metrics and predictions as
the run that published them (``predictions_sha256`` in each metrics entry shows it).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from evaluators import (
    EvaluatorConfigError,
    OnnxRuntimeBackend,
    Preprocessing,
    TorchBackend,
    build_dataset,
    evaluate_classification,
    prediction_agreement,
)
from evaluators.datasets.mirrored import with_mirrored
from quantlib.config import ARITHMETIC_MODES, load_config
from quantlib.export import export
from quantlib.cost import model_cost
from quantlib.ptq.pipeline import parse_steps
from quantlib.qat.distributed import is_primary_process
from zoo.builder import build_fp32_model, weights_sha256
from zoo.card import ModelCard
from zoo.hub import sha256_file
from zoo.registry import default_registry

from .distribution import DOWNLOAD, fetch_published
from .errors import RunConfigError
from .published_checkpoint import check_published_recipe, load_published_checkpoint
from .quantize_stage import calibrated_quantsim, stage_seconds, uncalibrated_quantsim
from .records import new_run_id, predictions_sha256, provenance, publish_run_folder, staging_folder, write_record

__all__ = ["RunConfigError", "execute", "format_summary", "load_published_checkpoint", "quant_config",
           "recipe_datasets", "resolve_config", "wrap_errors"]


@dataclass
class StageTimer:
    """Seconds per named stage, in execution order."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


def resolve_config(cfg: DictConfig) -> dict[str, Any]:
    """The fully resolved recipe as a plain dict; a missing env variable becomes a one-line error."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except InterpolationResolutionError as err:
        if "QUANTZOO_DATA_DIR" in str(err):
            raise RunConfigError(
                "data.root needs QUANTZOO_DATA_DIR; set QUANTZOO_DATA_DIR to the folder holding "
                "imagenet-sample-1k (e.g. export QUANTZOO_DATA_DIR=../shared/data) or pass data.root=/path"
            ) from None
        raise RunConfigError(f"recipe setting could not be resolved: {err}") from None


def _preprocessing(card: ModelCard) -> Preprocessing:
    return Preprocessing(**card.preprocessing.as_kwargs())


def recipe_datasets(card: ModelCard, data: dict[str, Any]):
    """(calibration, evaluation) datasets of the recipe's ``data`` group for ``card``; disjoint by construction."""
    if data["name"] != card.dataset and not (card.dataset == "imagenet_sample" and data["name"] == "imagefolder"):
        raise RunConfigError(f"data.name={data['name']} does not match model {card.name}, which is evaluated on {card.dataset}")
    pre = _preprocessing(card)
    common = {"root": data.get("root"), "preprocessing": pre, "seed": data.get("seed", 0)}
    calibration = build_dataset(data["name"], data["calibration_split"], num_samples=data.get("num_calibration_samples"), **common)
    evaluation = build_dataset(data["name"], data["eval_split"], num_samples=data.get("num_eval_samples"), **common)
    overlap = set(calibration.sample_ids) & set(evaluation.sample_ids)
    if overlap:
        raise RunConfigError(f"calibration and eval splits share {len(overlap)} samples; choose disjoint data.calibration_split/eval_split")
    return calibration, evaluation


def quant_config(quant: dict[str, Any]):
    """quantlib config from the recipe's quant group."""
    config = load_config(quant["config"]).with_defaults(
        weight={"bitwidth": quant["weight_bits"], "observer": {"name": quant["weight_observer"]}},
        activation={"bitwidth": quant["activation_bits"], "observer": {"name": quant["activation_observer"]}},
    )
    if quant.get("modules"):
        config = config.with_module_rules(list(quant["modules"]))
    arithmetic = quant.get("arithmetic")
    if arithmetic is not None:
        if arithmetic not in ARITHMETIC_MODES:
            raise RunConfigError(f"quant.arithmetic={arithmetic!r} is not valid; use one of {', '.join(ARITHMETIC_MODES)} (or null)")
        config = dataclasses.replace(config, arithmetic=arithmetic)
    return config


def execute(cfg: DictConfig) -> dict[str, Any]:
    """Run one recipe end to end and write its record; returns the record.

    ``checkpoint`` (see :mod:`zoo.cli.schema`) null calibrates; ``download`` or a published
    folder loads the published artifacts instead (module docstring). Plots and logs of the
    PTQ, QAT and compression stages go to ``<results_dir>/runs/<run_id>/`` (staged in
    ``runs/.partial/<run_id>/`` until the record is written, so a killed run leaves no run folder).
    """
    resolved = resolve_config(cfg)
    config, steps = quant_config(resolved["quant"]), resolved["ptq"]["steps"]
    parse_steps(steps)  # a bad step list fails here, before any work, naming ptq.steps[i]
    torch.manual_seed(resolved["seed"])
    ev = resolved["evaluator"]
    source = resolved.get("checkpoint")
    card = default_registry().get(resolved["model"]["name"])
    run_id = new_run_id(card.name, resolved["recipe"])
    runs_dir = Path(resolved["results_dir"]) / "runs"
    record_dir = staging_folder(runs_dir, run_id)  # moved to runs/<run_id>/ when the record lands
    timer = StageTimer()
    metrics: dict[str, Any] = {}

    def evaluate(backend, name: str, dataset=None):
        with timer.stage(f"eval_{name}"):
            result = evaluate_classification(backend, dataset or evaluation, batch_size=ev["batch_size"],
                                             num_workers=ev["num_workers"], desc=name, progress=ev["progress"])
        metrics[name] = {**result.to_dict(), "predictions_sha256": predictions_sha256(result.predictions)}
        return result

    published = None
    if source is not None:
        if resolved["qat"]["enabled"]:
            raise RunConfigError(f"qat.enabled=true with checkpoint={source}: a published checkpoint is loaded as it is; "
                                 "drop checkpoint= to train, or set qat=none")
        if not str(source).strip():
            raise RunConfigError(f"checkpoint={source!r} is empty; use checkpoint={DOWNLOAD}, a published folder, or null to calibrate")
        with timer.stage("fetch_checkpoint"):
            published = fetch_published(card, resolved["recipe"], str(source))
        check_published_recipe(published, card, resolved)
        if ev["onnxruntime"] and "onnx" not in published.paths:
            raise RunConfigError(f"checkpoint={source} has no onnx artifact to evaluate; set evaluator.onnxruntime=false")

    with timer.stage("build_fp32"):
        fp32 = build_fp32_model(card)
        calibration, evaluation = recipe_datasets(card, resolved["data"])
    fp32_backend = TorchBackend(fp32, ev["device"])
    device = fp32_backend.device
    fp32_result = evaluate(fp32_backend, "fp32")
    example = calibration[0][0].unsqueeze(0).to(device)
    loader = torch.utils.data.DataLoader(calibration, batch_size=resolved["data"]["calibration_batch_size"], shuffle=False)

    scoring = with_mirrored(calibration) if resolved["data"]["score_mirrored"] else calibration

    def calibration_top1(model: torch.nn.Module) -> float:
        """Searching PTQ and compression steps score on labelled calibration data (with its mirror
        images when ``data.score_mirrored``), never on the eval split."""
        return evaluate_classification(TorchBackend(model, device), scoring, batch_size=ev["batch_size"],
                                       num_workers=ev["num_workers"], progress=False).top1

    base, compress_summary = fp32, None
    if resolved["compress"]["steps"]:
        from .compress_stage import quantized_structure, run_compression

        with timer.stage("compress"):
            base, compress_summary = run_compression(copy.deepcopy(fp32), resolved, calibration, example, record_dir,
                                                     device, ev["progress"])
        evaluate(TorchBackend(base, device), "compressed")

    if published is None:
        sim, ptq_report = calibrated_quantsim(base, example, config, steps, loader, score_fn=calibration_top1,
                                              plots_dir=record_dir, progress=ev["progress"])
        timer.seconds.update(stage_seconds(ptq_report))
    else:
        with timer.stage("prepare"):
            sim, ptq_report = uncalibrated_quantsim(base, example, config, steps, loader)
        with timer.stage("load_checkpoint"):
            load_published_checkpoint(sim, published, str(source))
    sim.model.to(device)
    qat_summary = None
    if resolved["qat"]["enabled"]:
        from .qat_stage import run_qat

        with timer.stage("qat"):
            qat_summary = run_qat(sim, fp32, resolved, calibration, record_dir, device, ev["progress"])
    if not is_primary_process():
        # A torchrun worker (RANK > 0) trained its shard of every batch; rank 0 holds the same
        # weights and alone evaluates, exports and writes the record, so nothing is written twice.
        return {"run_id": None, "rank_skipped": True}
    sim_result = evaluate(TorchBackend(sim.model, device), "quantsim")
    if compress_summary is not None:
        compress_summary["quantized"] = quantized_structure(sim, compress_summary)

    if published is None:
        artifacts_dir = Path(resolved["artifacts_dir"]) / run_id
        with timer.stage("export"):
            exported = export(sim, artifacts_dir, f"{card.name}-{resolved['recipe']}", example)
        sim.model.to(device)
        files = exported.as_dict()
    else:
        files = published.paths  # the published ONNX is what a user deploys, so that is what ORT evaluates
    artifacts = {kind: {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
                 for kind, path in sorted(files.items())}
    agreement = {}
    if ev["onnxruntime"]:
        ort_result = evaluate(OnnxRuntimeBackend(str(files["onnx"]), device=ev["device"]), "onnxruntime")
        agreement["quantsim_vs_onnxruntime_top1"] = prediction_agreement(sim_result, ort_result)
    agreement["fp32_vs_quantsim_top1"] = prediction_agreement(fp32_result, sim_result)

    if published is None:
        run_source = {"kind": "calibration"}
        skipped: dict[str, str] = {}
        fingerprints = {"calibration": calibration.fingerprint(), "eval": evaluation.fingerprint()}
        calibration_ids = list(calibration.sample_ids)
    else:
        manifest = published.manifest or {}
        run_source = {"kind": "published_checkpoint", "checkpoint": str(source), "location": published.location,
                      "published_run_id": manifest.get("run_id"), "sha256": dict(sorted(published.sha256.items()))}
        skipped = {"calibrate": "encodings and integer weights loaded from the published checkpoint",
                   "export": "the published artifacts are evaluated as they are"}
        if len(ptq_report.steps) < len(steps):
            skipped["ptq_sim_steps"] = "sim-level PTQ steps: their effect is in the published integer weights and encodings"
        fingerprints = {"eval": evaluation.fingerprint()}
        calibration_ids = []
    record = {
        "run_id": run_id,
        "model": card.name,
        "recipe": resolved["recipe"],
        "task": card.task,
        "dataset": resolved["data"]["name"],
        "source": run_source,
        "metrics": metrics,
        "agreement": agreement,
        "quantsim": sim.summary(),
        "cost": model_cost(sim).summary(),
        "ptq": ptq_report.to_dict(),
        "compress": compress_summary,
        "qat": qat_summary,
        "timings": timer.seconds,
        "skipped_stages": skipped,
        "artifacts": artifacts,
        "provenance": provenance(
            resolved, seed=resolved["seed"], dataset_fingerprints=fingerprints,
            calibration_sample_ids=calibration_ids, checkpoint_sha256=weights_sha256(card),
            quantized_checkpoint_sha256=None if published is None else dict(sorted(published.sha256.items())),
        ),
    }
    record = publish_run_folder(record, runs_dir)
    path = write_record(record, runs_dir)
    record["record_path"] = str(path)
    return record


def format_summary(record: dict[str, Any]) -> str:
    """A small table: FP32, simulated and ORT accuracy side by side."""
    rows = [f"{record['model']}/{record['recipe']}  ({record['dataset']}, run {record['run_id']})",
            f"{'backend':<14}{'top1':>8}{'top5':>8}{'loss':>8}{'samples':>9}{'seconds':>9}"]
    for name, m in record["metrics"].items():
        rows.append(f"{name:<14}{m['top1']:>8.2f}{m['top5']:>8.2f}{m['loss']:>8.3f}{m['num_samples']:>9}{m['seconds']:>9.1f}")
    for name, value in record["agreement"].items():
        rows.append(f"agreement {name}: {value:.2f}%")
    rows.append(f"record: {record['record_path']}")
    return "\n".join(rows)


def wrap_errors(error: Exception) -> str | None:
    """A one-line message for known user errors, None for bugs (which keep their traceback)."""
    from quantlib.ptq.registry import PTQConfigError
    from quantlib.spec import QuantSpecError
    from zoo.hub import HubError
    from zoo.registry import UnknownModelError

    if isinstance(error, (RunConfigError, EvaluatorConfigError, QuantSpecError, PTQConfigError, HubError, UnknownModelError)):
        return str(error)
    return None
