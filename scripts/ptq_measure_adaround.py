"""W4A8 per-channel round-to-nearest vs AdaRound on a zoo model, FP32 alongside, in one process.

The data and the QuantSim are built the way ``quantzoo run MODEL/w4a8`` builds them: the
calibration split (ImageNet sample: i % 4 == 0, 250 images) calibrates the sim and feeds AdaRound,
the eval split (750 images) is only evaluated. Writes a JSON summary (atomically) and prints it.

    QUANTZOO_DATA_DIR=../shared/data python scripts/ptq_measure_adaround.py \\
        [--model efficientnet_lite0] [--iterations 500] [--learning-rate 0.01] [--reg-weight 0.1] [--crop 8] [--onnx]

The AdaRound time printed and recorded (``adaround_seconds``) covers caching and optimizing every
layer; the machine's load average is recorded next to it (``loadavg_before``/``loadavg_after``),
since timings on a shared machine are only comparable at similar load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml

from evaluators import OnnxRuntimeBackend, TorchBackend, build_dataset, evaluate_classification
from quantlib.export import export
from quantlib.io import atomic_write_text
from quantlib.ptq.adaround import apply_adaround
from quantlib.quantsim import QuantSim
from zoo.builder import build_fp32_model
from zoo.cli.run import _preprocessing, quant_config
from zoo.cli.schema import QuantConf
from zoo.registry import default_registry

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_quant_config(name: str, *, weight_observer: str | None = None):
    """The quantlib config of ``recipes/quant/<name>.yaml`` (schema defaults filled in), and the
    ``quant`` section it came from; ``weight_observer`` overrides ``quant.weight_observer``."""
    quant = {**dataclasses.asdict(QuantConf()), **yaml.safe_load((RECIPES / "quant" / f"{name}.yaml").read_text())}
    if weight_observer is not None:
        quant["weight_observer"] = weight_observer
    return quant_config(quant), quant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--quant", default="w4a8", help="a recipes/quant/*.yaml name")
    parser.add_argument("--weight-observer", default=None, help="override quant.weight_observer (e.g. mse)")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--reg-weight", type=float, default=0.1)
    parser.add_argument("--crop", type=int, default=8, help="output window side for conv layers (0: whole maps)")
    parser.add_argument("--batch-size", type=int, default=16, help="cached chunk / mini-batch size")
    parser.add_argument("--num-samples", type=int, default=250)
    parser.add_argument("--max-cache-mb", type=float, default=4096.0)
    parser.add_argument("--no-recalibrate", action="store_true",
                        help="keep the activation encodings from before AdaRound (the adaround step recalibrates)")
    parser.add_argument("--onnx", action="store_true", help="also export the AdaRounded sim and evaluate it in ONNX Runtime")
    parser.add_argument("--skip-fp32", action="store_true", help="do not evaluate the FP32 model")
    parser.add_argument("--out", default="artifacts/ptq_measure/adaround.json")
    args = parser.parse_args()

    card = default_registry().get(args.model)
    pre = _preprocessing(card)
    calibration = build_dataset(card.dataset, "calibration", root=None, preprocessing=pre)
    evaluation = build_dataset(card.dataset, "eval", root=None, preprocessing=pre)
    if set(calibration.sample_ids) & set(evaluation.sample_ids):
        raise SystemExit("calibration and eval splits overlap")
    loader = torch.utils.data.DataLoader(calibration, batch_size=50, shuffle=False)
    config, quant = recipe_quant_config(args.quant, weight_observer=args.weight_observer)
    fp32 = build_fp32_model(card)
    example = calibration[0][0].unsqueeze(0)
    summary: dict = {"model": card.name, "quant": quant, "num_calibration": len(calibration),
                     "num_eval": len(evaluation), "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}

    def top1(model: torch.nn.Module, name: str) -> float:
        start = time.perf_counter()
        result = evaluate_classification(TorchBackend(model, "cpu"), evaluation, batch_size=50, progress=False)
        summary[f"eval_{name}_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name:<10} top1 {result.top1:6.2f}  ({summary[f'eval_{name}_seconds']} s)", flush=True)
        return result.top1

    if not args.skip_fp32:
        summary["fp32_top1"] = top1(fp32, "fp32")
    sim = QuantSim(fp32, example, config)
    sim.calibrate(loader, progress=False)
    summary["nearest_top1"] = top1(sim.model, "nearest")

    adaround_config = {"num_iterations": args.iterations, "learning_rate": args.learning_rate,
                       "reg_weight": args.reg_weight, "crop": args.crop or None, "batch_size": args.batch_size,
                       "num_samples": args.num_samples, "max_cache_mb": args.max_cache_mb}
    summary["loadavg_before"] = os.getloadavg()
    start = time.perf_counter()
    result = apply_adaround(sim, loader, adaround_config, progress=True)
    summary["adaround_seconds"] = round(time.perf_counter() - start, 1)
    summary["loadavg_after"] = os.getloadavg()
    if not args.no_recalibrate:
        start = time.perf_counter()
        sim.calibrate(loader, progress=False)
        summary["recalibrate_seconds"] = round(time.perf_counter() - start, 1)
    summary["recalibrated"] = not args.no_recalibrate
    print(f"adaround   {summary['adaround_seconds']} s for {len(result.layers)} layers", flush=True)
    summary["adaround_top1"] = top1(sim.model, "adaround")
    summary["adaround"] = result.to_dict()
    if args.onnx:
        with tempfile.TemporaryDirectory() as tmp:
            exported = export(sim, tmp, "adaround", example)
            start = time.perf_counter()
            ort = evaluate_classification(OnnxRuntimeBackend(str(exported.onnx)), evaluation, batch_size=50, progress=False)
            summary["adaround_onnxruntime_top1"] = ort.top1
            print(f"{'ort':<10} top1 {ort.top1:6.2f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    atomic_write_text(Path(args.out), json.dumps(summary, indent=1, sort_keys=True))
    compact = {k: v for k, v in summary.items() if k != "adaround"}
    compact["adaround_layers"] = {k: v for k, v in result.summary().items() if k != "per_layer"}
    print(json.dumps(compact, indent=1, sort_keys=True))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
