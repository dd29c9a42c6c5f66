"""`quantzoo run MODEL/RECIPE`: FP32, simulated and ONNX Runtime accuracy side by side.

This is where zoo, quantlib and evaluators meet. Stages (each timed):
    build_fp32 -> eval_fp32 -> prepare (QuantSim) -> calibrate -> eval_quantsim -> export ->
    eval_onnxruntime -> record.
Calibration data comes from the calibration split only; evaluation from the eval split only.
"""

from __future__ import annotations

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
from quantlib.config import load_config
from quantlib.export import export
from quantlib.quantsim import QuantSim
from zoo.builder import build_fp32_model, weights_sha256
from zoo.card import ModelCard
from zoo.hub import sha256_file
from zoo.registry import default_registry

from .records import new_run_id, provenance, write_record


class RunConfigError(ValueError):
    """A recipe setting is wrong; the message names the setting and the fix."""


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


def _datasets(card: ModelCard, data: dict[str, Any]):
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
    return config


def execute(cfg: DictConfig) -> dict[str, Any]:
    """Run one recipe end to end and write its record; returns the record."""
    resolved = resolve_config(cfg)
    if resolved["ptq"]["steps"]:
        raise RunConfigError(
            f"ptq.steps={resolved['ptq']['steps']} names PTQ passes this version does not have; use ptq=none (ptq.steps=[])"
        )
    torch.manual_seed(resolved["seed"])
    ev = resolved["evaluator"]
    card = default_registry().get(resolved["model"]["name"])
    run_id = new_run_id(card.name, resolved["recipe"])
    timer = StageTimer()
    metrics: dict[str, Any] = {}

    def evaluate(backend, name: str):
        with timer.stage(f"eval_{name}"):
            result = evaluate_classification(backend, evaluation, batch_size=ev["batch_size"],
                                             num_workers=ev["num_workers"], desc=name, progress=ev["progress"])
        metrics[name] = result.to_dict()
        return result

    with timer.stage("build_fp32"):
        fp32 = build_fp32_model(card)
        calibration, evaluation = _datasets(card, resolved["data"])
    fp32_result = evaluate(TorchBackend(fp32, ev["device"]), "fp32")

    loader = torch.utils.data.DataLoader(calibration, batch_size=resolved["data"]["calibration_batch_size"], shuffle=False)
    example = calibration[0][0].unsqueeze(0)
    with timer.stage("prepare"):
        sim = QuantSim(fp32, example, quant_config(resolved["quant"]))
    device = TorchBackend(sim.model, ev["device"]).device
    sim.model.to(device)
    with timer.stage("calibrate"):
        sim.calibrate(loader, progress=ev["progress"])
    sim_result = evaluate(TorchBackend(sim.model, device), "quantsim")

    artifacts_dir = Path(resolved["artifacts_dir"]) / run_id
    with timer.stage("export"):
        exported = export(sim, artifacts_dir, f"{card.name}-{resolved['recipe']}", example)
    sim.model.to(device)
    artifacts = {kind: {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
                 for kind, path in exported.as_dict().items()}
    agreement = {}
    if ev["onnxruntime"]:
        ort_result = evaluate(OnnxRuntimeBackend(str(exported.onnx), device=ev["device"]), "onnxruntime")
        agreement["quantsim_vs_onnxruntime_top1"] = prediction_agreement(sim_result, ort_result)
    agreement["fp32_vs_quantsim_top1"] = prediction_agreement(fp32_result, sim_result)

    record = {
        "run_id": run_id,
        "model": card.name,
        "recipe": resolved["recipe"],
        "task": card.task,
        "dataset": resolved["data"]["name"],
        "metrics": metrics,
        "agreement": agreement,
        "quantsim": sim.summary(),
        "timings": timer.seconds,
        "artifacts": artifacts,
        "provenance": provenance(
            resolved, seed=resolved["seed"],
            dataset_fingerprints={"calibration": calibration.fingerprint(), "eval": evaluation.fingerprint()},
            calibration_sample_ids=list(calibration.sample_ids), checkpoint_sha256=weights_sha256(card),
        ),
    }
    path = write_record(record, Path(resolved["results_dir"]) / "runs")
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
    from quantlib.spec import QuantSpecError
    from zoo.hub import HubError
    from zoo.registry import UnknownModelError

    if isinstance(error, (RunConfigError, EvaluatorConfigError, QuantSpecError, HubError, UnknownModelError)):
        return str(error)
    return None
