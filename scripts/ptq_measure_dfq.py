"""Measure PTQ pipelines (naive minmax vs BN fold + CLE + bias correction, ...) on a zoo model.

Calibration uses the dataset's calibration split and evaluation its eval split (for
``imagenet_sample``: i % 4 == 0 -> 250 calibration images, the other 750 for eval), as
``quantzoo run`` does. Every variant starts from the same FP32 model and calibration data.

    QUANTZOO_DATA_DIR=../shared/data python scripts/ptq_measure_dfq.py \\
        --model efficientnet_lite0 --config per_tensor --variants naive,dfq --fp32 --out dfq.json
    python scripts/ptq_measure_dfq.py --variants cle,cle_relu --prepared-fp32 --no-quantsim

Variants: ``naive`` (no step), ``bias_correction`` / ``analytical_bias_correction`` alone,
``cle`` (BN fold + CLE, ReLU6 bounds rescaled per channel), ``cle_hba``, ``dfq`` (+ empirical
bias correction), ``dfq_hba``, ``dfq_data_free`` (+ high-bias absorption + analytical bias
correction), and ``cle_relu`` / ``dfq_relu`` / ``cle_skip_relu6`` / ``dfq_skip_relu6`` with the
other ways of handling ReLU6. ``--fp32`` evaluates the FP32 model too, ``--prepared-fp32`` the
FP32 model after each variant's model-level steps (it shows what ReLU6 -> ReLU costs).

Prints one row per variant (top-1, top-5, seconds) and writes the rows, the step reports and
the settings as JSON (atomically) when ``--out`` is given. The run records of the same
combinations come from ``quantzoo run <model>/w8a8_per_tensor_<variant>``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from evaluators import Preprocessing, TorchBackend, build_dataset, evaluate_classification
from quantlib.io import atomic_write_text
from quantlib.ptq.pipeline import parse_steps, prepare_fp32_model, prepare_quantsim
from zoo.builder import build_fp32_model
from zoo.registry import default_registry

CLE = [{"name": "bn_fold"}, {"name": "cle", "relu6": "per_channel_clip"}]
CLE_RELU = [{"name": "bn_fold"}, {"name": "cle", "relu6": "relu"}]
CLE_SKIP = [{"name": "bn_fold"}, {"name": "cle", "relu6": "skip"}]
EMPIRICAL = [{"name": "bias_correction", "kind": "empirical"}]
VARIANTS: dict[str, list[dict]] = {
    "naive": [],
    "bn_fold": [{"name": "bn_fold"}],
    "bias_correction": EMPIRICAL,
    "analytical_bias_correction": [{"name": "bias_correction", "kind": "analytical"}],
    "cle": CLE,
    "cle_hba": CLE + [{"name": "high_bias_absorption"}],
    "dfq": CLE + EMPIRICAL,
    "dfq_hba": CLE + [{"name": "high_bias_absorption"}] + EMPIRICAL,
    "dfq_data_free": CLE + [{"name": "high_bias_absorption"}, {"name": "bias_correction", "kind": "analytical"}],
    "cle_relu": CLE_RELU,
    "dfq_relu": CLE_RELU + EMPIRICAL,
    "cle_skip_relu6": CLE_SKIP,
    "dfq_skip_relu6": CLE_SKIP + EMPIRICAL,
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--config", default="per_tensor", help="quantlib preset or YAML path")
    parser.add_argument("--variants", default="naive,dfq", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--fp32", action="store_true", help="also evaluate the FP32 model")
    parser.add_argument("--prepared-fp32", action="store_true",
                        help="also evaluate the FP32 model after each variant's model-level steps (e.g. ReLU6 -> ReLU)")
    parser.add_argument("--no-quantsim", action="store_true", help="skip the QuantSim evaluation of each variant")
    parser.add_argument("--num-eval", type=int, default=None, help="first N eval samples (default: all)")
    parser.add_argument("--num-calibration", type=int, default=None, help="first N calibration samples (default: all)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--plots-dir", default=None)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        print(f"--variants: unknown {unknown[0]!r}; use {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    progress = not args.no_progress
    card = default_registry().get(args.model)
    pre = Preprocessing(**card.preprocessing.as_kwargs())
    calibration = build_dataset(card.dataset, "calibration", root=None, preprocessing=pre, num_samples=args.num_calibration)
    evaluation = build_dataset(card.dataset, "eval", root=None, preprocessing=pre, num_samples=args.num_eval)
    loader = torch.utils.data.DataLoader(calibration, batch_size=args.batch_size, shuffle=False)
    example = calibration[0][0].unsqueeze(0)
    model = build_fp32_model(card).eval()

    def evaluate(module, name):
        metrics = evaluate_classification(TorchBackend(module, "cpu"), evaluation, batch_size=args.batch_size,
                                          desc=name, progress=progress)
        return {"top1": round(metrics.top1, 2), "top5": round(metrics.top5, 2), "seconds": round(metrics.seconds, 1)}

    rows = []
    if args.fp32:
        rows.append({"variant": "fp32", "backend": "fp32", **evaluate(model, "fp32")})
        print(rows[-1], flush=True)
    for name in args.variants.split(","):
        steps = VARIANTS[name]
        plots = Path(args.plots_dir) / name if args.plots_dir else None
        model_steps = [entry for entry, item in zip(steps, parse_steps(steps)) if item.step.phase == "model"]
        if args.prepared_fp32 and model_steps:
            context, _ = prepare_fp32_model(model, example, model_steps, loader, config=args.config, progress=progress)
            rows.append({"variant": name, "backend": "fp32_prepared", **evaluate(context.model, f"{name} fp32")})
            print(rows[-1], flush=True)
        if args.no_quantsim:
            continue
        start = time.perf_counter()
        sim, report = prepare_quantsim(model, example, args.config, steps, loader, progress=progress, plots_dir=plots)
        prepare_seconds = round(time.perf_counter() - start, 1)
        print(report.format(), flush=True)
        rows.append({"variant": name, "backend": "quantsim", **evaluate(sim.model, name),
                     "prepare_seconds": prepare_seconds, "steps": steps, "report": report.to_dict()})
        print({k: v for k, v in rows[-1].items() if k not in ("report", "steps")}, flush=True)
    print(f"\n{args.model} {args.config}: {len(calibration)} calibration / {len(evaluation)} eval samples")
    print(f"{'variant':<22}{'backend':<15}{'top1':>8}{'top5':>8}")
    for row in rows:
        print(f"{row['variant']:<22}{row['backend']:<15}{row['top1']:>8.2f}{row['top5']:>8.2f}")
    if args.out:
        payload = {"model": args.model, "config": args.config, "num_calibration": len(calibration),
                   "num_eval": len(evaluation), "torch": torch.__version__, "machine": platform.platform(),
                   "rows": rows}
        atomic_write_text(Path(args.out), json.dumps(payload, indent=1, sort_keys=True))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
