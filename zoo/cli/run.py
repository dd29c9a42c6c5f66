"""`quantzoo run MODEL/RECIPE`: FP32, simulated and ONNX Runtime accuracy side by side.

This is where zoo, quantlib and evaluators meet. Stages (each timed):
    build_fp32 -> eval_fp32 -> prepare (QuantSim) -> calibrate -> eval_quantsim -> export ->
    eval_onnxruntime -> record.
Calibration data comes from the calibration split only; evaluation from the eval split only.

With ``checkpoint=download`` or ``checkpoint=<published folder>`` the run starts from published
artifacts instead: fetch_checkpoint -> (check they fit the recipe) -> prepare ->
load_checkpoint (integer weights and encodings, no calibration) -> eval_quantsim ->
eval_onnxruntime on the *published* ONNX file. ``calibrate`` and ``export`` are listed in the
record's ``skipped_stages``, ``source`` says where the model came from, and the provenance holds
the artifacts' sha256. The same artifacts and eval data give the same metrics and predictions as
the run that published them (``predictions_sha256`` in each metrics entry shows it).
"""

from __future__ import annotations

import json
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
from quantlib.checkpoint import load_quantized_state_dict
from quantlib.config import load_config
from quantlib.export import export
from quantlib.quantsim import QuantSim
from zoo.builder import build_fp32_model, weights_sha256
from zoo.card import ModelCard
from zoo.hub import sha256_file
from zoo.registry import default_registry

from .distribution import DOWNLOAD, PublishedArtifacts, fetch_published
from .records import new_run_id, predictions_sha256, provenance, write_record


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
    return config


# (quantizer kind, spec field) -> the recipe setting that decides it; other fields come from quant.config
_SPEC_SETTINGS = {("weight", "bitwidth"): "quant.weight_bits", ("weight", "observer"): "quant.weight_observer",
                  ("activation", "bitwidth"): "quant.activation_bits", ("activation", "observer"): "quant.activation_observer"}


def check_published_recipe(published: PublishedArtifacts, card: ModelCard, resolved: dict[str, Any]) -> None:
    """RunConfigError naming the first setting where the published manifest differs from this run.

    Checks model and recipe, every ``quant.*`` and ``ptq.*`` setting, and the FP32 weights the
    artifacts were made from. Without a manifest (card-listed artifacts) only the encodings check
    of :func:`load_published_checkpoint` applies.
    """
    manifest, source = published.manifest, resolved["checkpoint"]
    if manifest is None:
        return
    model, recipe = manifest.get("model"), manifest.get("recipe")
    if (model, recipe) != (card.name, resolved["recipe"]):
        raise RunConfigError(
            f"checkpoint={source} holds {model}/{recipe} artifacts but this run is {card.name}/{resolved['recipe']}; "
            f"run `quantzoo run {model}/{recipe} checkpoint={source}` or point checkpoint at {card.name}/{resolved['recipe']} artifacts")
    for group in ("quant", "ptq"):
        theirs, ours = manifest.get("config", {}).get(group), resolved[group]
        if theirs is None:
            continue  # manifests written before settings were recorded: the encodings check still applies
        for key in sorted(set(theirs) | set(ours)):
            if theirs.get(key) != ours.get(key):
                raise RunConfigError(
                    f"{group}.{key}={ours.get(key)!r} but checkpoint={source} was published with "
                    f"{group}.{key}={theirs.get(key)!r}; drop the override or publish a run made with it")
    fp32 = manifest.get("fp32_sha256")
    if fp32 is not None and fp32 != weights_sha256(card):
        raise RunConfigError(
            f"checkpoint={source} was made from FP32 weights sha256 {fp32} but model card {card.name} has "
            f"weights.sha256 {weights_sha256(card)}; publish a run made with this card's weights")


def _canonical(data: Any) -> Any:
    return json.loads(json.dumps(data, sort_keys=True))


def load_published_checkpoint(sim: QuantSim, published: PublishedArtifacts, source: str) -> None:
    """Install the published integer weights and encodings into ``sim`` (mutated) instead of calibrating.

    First every quantizer's spec in the encodings' ``quantizer_args`` must equal the one this
    recipe builds (else RunConfigError naming the ``quant.*`` setting); then the integer
    checkpoint is loaded (:func:`quantlib.checkpoint.load_quantized_state_dict`: weights rebuilt
    on their grid, bit for bit); last, the encodings ``sim`` now has must equal the published
    encodings file, so the two artifacts are proven to describe one model.
    """
    from safetensors import SafetensorError, safe_open

    path = published.paths["encodings"]
    try:
        encodings = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunConfigError(f"checkpoint={source}: {path.name} is not an encodings JSON file ({err})") from None
    published_args = encodings.get("quantizer_args") if isinstance(encodings, dict) else None
    if not isinstance(published_args, dict) or not all(isinstance(v, dict) for v in published_args.values()):
        raise RunConfigError(f"checkpoint={source}: {path.name} has no quantizer_args table; it was not written by quantlib's save_encodings")
    params = set(sim.param_quantizers())
    for name, quantizer in sim.quantizers().items():
        if name not in published_args:
            raise RunConfigError(
                f"checkpoint={source} has no quantizer {name!r}; the artifacts were published for another model or quant.config")
        ours, theirs = _canonical(quantizer.spec.to_dict()), published_args[name]
        for key in ours:
            if ours[key] != theirs.get(key):
                setting = _SPEC_SETTINGS.get(("weight" if name in params else "activation", key), "quant.config")
                raise RunConfigError(
                    f"{setting} gives quantizer {name} {key}={ours[key]!r} but checkpoint={source} was published with "
                    f"{key}={theirs.get(key)!r}; set {setting} to match the artifacts or use their recipe")
    extra = sorted(set(published_args) - set(sim.quantizers()))
    if extra:
        raise RunConfigError(
            f"checkpoint={source} quantizes {extra[0]!r}, which this model does not have; the artifacts were published for another model or quant.config")
    weights = published.paths["weights"]
    try:
        with safe_open(str(weights), "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        load_quantized_state_dict(sim, tensors, metadata)
    except (SafetensorError, KeyError, ValueError, RuntimeError) as err:
        raise RunConfigError(f"checkpoint={source}: {weights.name} does not load into this model: {err}") from None
    if _canonical(sim.encodings()) != _canonical(encodings):
        raise RunConfigError(
            f"checkpoint={source}: {weights.name} and {path.name} give different encodings; they are not from one run, publish them again")


def execute(cfg: DictConfig) -> dict[str, Any]:
    """Run one recipe end to end and write its record; returns the record.

    ``checkpoint`` (see :mod:`zoo.cli.schema`) null calibrates; ``download`` or a published
    folder loads the published artifacts instead (module docstring).
    """
    resolved = resolve_config(cfg)
    if resolved["ptq"]["steps"]:
        raise RunConfigError(
            f"ptq.steps={resolved['ptq']['steps']} names PTQ passes this version does not have; use ptq=none (ptq.steps=[])"
        )
    torch.manual_seed(resolved["seed"])
    ev = resolved["evaluator"]
    source = resolved.get("checkpoint")
    card = default_registry().get(resolved["model"]["name"])
    run_id = new_run_id(card.name, resolved["recipe"])
    timer = StageTimer()
    metrics: dict[str, Any] = {}

    def evaluate(backend, name: str):
        with timer.stage(f"eval_{name}"):
            result = evaluate_classification(backend, evaluation, batch_size=ev["batch_size"],
                                             num_workers=ev["num_workers"], desc=name, progress=ev["progress"])
        metrics[name] = {**result.to_dict(), "predictions_sha256": predictions_sha256(result.predictions)}
        return result

    published = None
    if source is not None:
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
    fp32_result = evaluate(TorchBackend(fp32, ev["device"]), "fp32")

    example = calibration[0][0].unsqueeze(0)
    with timer.stage("prepare"):
        sim = QuantSim(fp32, example, quant_config(resolved["quant"]))
    if published is not None:
        with timer.stage("load_checkpoint"):
            load_published_checkpoint(sim, published, str(source))
    device = TorchBackend(sim.model, ev["device"]).device
    sim.model.to(device)
    if published is None:
        loader = torch.utils.data.DataLoader(calibration, batch_size=resolved["data"]["calibration_batch_size"], shuffle=False)
        with timer.stage("calibrate"):
            sim.calibrate(loader, progress=ev["progress"])
    sim_result = evaluate(TorchBackend(sim.model, device), "quantsim")

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
        "timings": timer.seconds,
        "skipped_stages": skipped,
        "artifacts": artifacts,
        "provenance": provenance(
            resolved, seed=resolved["seed"], dataset_fingerprints=fingerprints,
            calibration_sample_ids=calibration_ids, checkpoint_sha256=weights_sha256(card),
            quantized_checkpoint_sha256=None if published is None else dict(sorted(published.sha256.items())),
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
