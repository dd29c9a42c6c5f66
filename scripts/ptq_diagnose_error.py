"""Where a W4A8 AdaRound recipe's remaining error lies, measured on calibration images alone.

The recipe's sim is built and calibrated on the first ``--fit`` calibration images (the
calibration split of ``quantzoo run``); its AdaRound step runs on those images only. The other
calibration images are held out and score the logits KL(FP32 || quantized) and the top-1
agreement with FP32:

* ``nearest``: round-to-nearest (before AdaRound);
* ``adaround``: after AdaRound and recalibration;
* ``bias_tuning``: after the recipe's ``bias_tuning`` step, when it has one after AdaRound
  (trained on the same fitted images);
* ``weights_only``: activation quantizers off (the weights' share);
* ``grid_weights_activations_only``: weight quantizers off, activation quantizers on; the weights
  stay on AdaRound's grid values, since AdaRound wrote them into the layers;
* ``per_block_float`` (``--per-block``): one block or layer at a time put back to its float
  weights, the rest as AdaRounded.

The eval split is never read, so a variant can be judged without it. Writes a JSON report
(atomically) and prints it.

    QUANTZOO_DATA_DIR=../shared/data python scripts/ptq_diagnose_error.py \\
        efficientnet_lite0/w4a8_adaround_ends8_blocks_reg1 --fit 160 --per-block \\
        --out results/diagnostics/efficientnet_lite0__w4a8_adaround_ends8_blocks_reg1.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator, Sequence

import torch

from evaluators.classification import prediction_agreement
from quantlib.io import atomic_write_text
from quantlib.ptq.pass_config import PassConfigError
from quantlib.ptq.adaround import apply_adaround
from quantlib.ptq.bias_tuning import apply_bias_tuning
from quantlib.ptq.quantizer_groups import fp32_reference, only_enabled
from quantlib.qat.losses import distillation_loss
from quantlib.quantsim import QuantSim
from zoo.builder import build_fp32_model
from zoo.cli.bench_run import compose_recipe
from zoo.cli.bench_torch import BenchConfigError
from zoo.cli.errors import RunConfigError
from zoo.cli.records import git_state
from zoo.cli.run import quant_config, recipe_datasets
from zoo.registry import default_registry


@torch.no_grad()
def model_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 30) -> torch.Tensor:
    return torch.cat([model(batch) for batch in images.split(batch_size)])


def held_out_scores(model: torch.nn.Module, images: torch.Tensor, reference_logits: torch.Tensor) -> dict[str, float]:
    """KL(FP32 || model) of the logits (batch mean) and top-1 agreement with FP32 in percent."""
    logits = model_logits(model, images)
    kl = distillation_loss(logits, reference_logits, temperature=1.0)
    agreement = prediction_agreement(logits.argmax(1).tolist(), reference_logits.argmax(1).tolist())
    return {"kl": round(float(kl), 4), "agreement": round(agreement, 1)}


@contextlib.contextmanager
def float_weights(sim: QuantSim, layers: Sequence[str]) -> Iterator[None]:
    """Within the block, ``layers`` run with their float weights (kept by AdaRound's freeze) and
    their weight quantizers off; restored on exit."""
    modules = sim.weight_modules()
    saved = {name: modules[name].weight.detach().clone() for name in layers}
    off = {f"{name}.weight" for name in layers}
    try:
        with torch.no_grad():
            for name in layers:
                modules[name].weight.copy_(modules[name].weight_quantizer.float_weight)
        with only_enabled(sim, [q for q in sim.quantizers() if q not in off]):
            yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                modules[name].weight.copy_(weight)


def diagnose(target: str, fit: int, *, mirror: bool, per_block: bool, overrides: Sequence[str] = (),
             batch_size: int = 16) -> dict:
    recipe = compose_recipe(target, overrides)
    steps = recipe["ptq"]["steps"]
    names = [s["name"] for s in steps]
    if names not in (["adaround"], ["adaround", "bias_tuning"]):
        raise SystemExit(f"{target}: the diagnosis runs an adaround step, optionally followed by bias_tuning; "
                         f"this recipe has {names}")
    card = default_registry().get(recipe["model"]["name"])
    calibration, _ = recipe_datasets(card, recipe["data"])
    images = torch.cat([batch[0] for batch in torch.utils.data.DataLoader(calibration, batch_size=25)])
    if not 0 < fit < len(images):
        raise SystemExit(f"--fit {fit} must leave held-out images: the calibration split has {len(images)}")
    fitted, held_out = images[:fit], images[fit:]
    fit_batches = list(fitted.split(batch_size))
    torch.manual_seed(0)
    sim = QuantSim(build_fp32_model(card).eval(), images[:1], quant_config(recipe["quant"]))
    sim.calibrate(fit_batches, progress=False)
    reference_logits = model_logits(fp32_reference(sim), held_out)

    def score() -> dict[str, float]:
        return held_out_scores(sim.model, held_out, reference_logits)

    report = {"recipe": target, "overrides": list(overrides), "git": git_state(), "fit_images": fit,
              "held_out_images": len(held_out),
              "mirror": mirror, "nearest": score()}
    step = {key: value for key, value in steps[0].items() if key not in ("name", "recalibrate")}
    step.update(num_samples=fit, mirror=mirror, holdout_chunks=0, holdout_checkpoints=0)
    start = time.perf_counter()
    result = apply_adaround(sim, fit_batches, step, progress=False)
    sim.calibrate(fit_batches, progress=False)
    report["adaround_seconds"] = round(time.perf_counter() - start, 1)
    report["adaround"] = score()
    if len(steps) == 2:
        tuning = {key: value for key, value in steps[1].items() if key not in ("name", "recalibrate")}
        tuning.update(num_samples=fit)
        tuned = apply_bias_tuning(sim, fit_batches, tuning)
        if steps[1].get("recalibrate", False):
            sim.calibrate(fit_batches, progress=False)
        report["bias_tuning_seconds"] = round(tuned.seconds, 1)
        report["bias_tuning_history"] = tuned.history
        report["bias_tuning"] = score()
    weights = [name for name in sim.quantizers() if name.endswith(".weight")]
    with only_enabled(sim, weights):
        report["weights_only"] = score()
    with only_enabled(sim, [name for name in sim.quantizers() if name not in weights]):
        report["grid_weights_activations_only"] = score()
    if per_block:
        report["per_block_float"] = {}
        for entry in result.layers:
            with float_weights(sim, entry.layers or [entry.name]):
                report["per_block_float"][entry.name] = score()
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="MODEL/RECIPE whose PTQ steps are adaround, optionally then bias_tuning")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the recipe, e.g. ptq.steps.0.seed=1")
    parser.add_argument("--fit", type=int, default=160, help="calibration images AdaRound fits on (the rest are held out)")
    parser.add_argument("--mirror", action="store_true", help="also cache the fitted images mirrored")
    parser.add_argument("--per-block", action="store_true", help="put each block back to float, one at a time")
    parser.add_argument("--out", required=True, help="JSON report path")
    args = parser.parse_args(argv)
    try:
        report = diagnose(args.recipe, args.fit, mirror=args.mirror, per_block=args.per_block, overrides=args.overrides)
    except (BenchConfigError, RunConfigError, PassConfigError) as err:
        raise SystemExit(f"ptq_diagnose_error: error: {err}") from None
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
