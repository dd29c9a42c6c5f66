"""Speed of the simulation against FP32, and of ONNX Runtime int8 against FP32, in one run.

Prints, for one zoo model on its calibration images (default: efficientnet_lite0, 250 images):
  - simulated eval time / FP32 eval time        (target <= 1.25), for float and integer arithmetic
  - minmax calibration time / FP32 eval time    (target <= 1.25), over the same samples
  - ONNX Runtime FP32 and int8 (QDQ) batch-1 latency, and their ratio
Both sides of each ratio are measured in this process, interleaved, median of --repeats.

    python scripts/bench_quantsim.py [--model efficientnet_lite0] [--samples 250] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from evaluators import build_dataset
from quantlib.config import load_config
from quantlib.export import export
from quantlib.quantsim import QuantSim
from zoo.builder import build_fp32_model
from zoo.cli.run import _preprocessing
from zoo.registry import default_registry


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--config", default="per_channel")
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-runs", type=int, default=50)
    args = parser.parse_args()

    card = default_registry().get(args.model)
    data = build_dataset(card.dataset, "calibration", root=None, preprocessing=_preprocessing(card), num_samples=args.samples)
    batches = [x for x, _ in torch.utils.data.DataLoader(data, batch_size=args.batch_size)]
    fp32 = build_fp32_model(card)
    config = load_config(args.config)
    sim = QuantSim(fp32, batches[0][:1], dataclasses.replace(config, arithmetic="float"))
    integer_sim = QuantSim(fp32, batches[0][:1], dataclasses.replace(config, arithmetic="integer"))

    def run(model):
        with torch.inference_mode():
            for x in batches:
                model(x)

    sim.calibrate(batches[:1], progress=False)  # warm-up, and encodings for the timed eval
    integer_sim.calibrate(batches[:1], progress=False)
    run(fp32)
    run(sim.model)
    run(integer_sim.model)
    fp32_t, sim_t, int_t, cal_t = [], [], [], []
    for _ in range(args.repeats):
        fp32_t.append(_timed(lambda: run(fp32)))
        sim_t.append(_timed(lambda: run(sim.model)))
        int_t.append(_timed(lambda: run(integer_sim.model)))
        cal_t.append(_timed(lambda: sim.calibrate(batches, progress=False)))
    fp32_m, sim_m, int_m, cal_m = (statistics.median(v) for v in (fp32_t, sim_t, int_t, cal_t))
    print(f"model={args.model} config={args.config} samples={len(data)} threads={torch.get_num_threads()} "
          f"load_avg_1m={os.getloadavg()[0]:.2f}")
    print(f"torch fp32 eval        {fp32_m:8.2f} s  (min {min(fp32_t):.2f}, max {max(fp32_t):.2f})")
    print(f"torch quantsim eval    {sim_m:8.2f} s  ratio {sim_m / fp32_m:.2f}x FP32 (target <= 1.25; arithmetic=float)")
    print(f"torch quantsim eval    {int_m:8.2f} s  ratio {int_m / fp32_m:.2f}x FP32 (arithmetic=integer, ORT's int8 kernels)")
    print(f"minmax calibration     {cal_m:8.2f} s  ratio {cal_m / fp32_m:.2f}x FP32 (target <= 1.25)")

    with tempfile.TemporaryDirectory() as tmp:
        int8 = export(sim, tmp, "int8", batches[0][:1]).onnx
        fp32_path = Path(tmp) / "fp32.onnx"
        torch.onnx.export(fp32, (batches[0][:1],), str(fp32_path), dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
        x1 = batches[0][:1].numpy()
        lat = {}
        for name, path in (("fp32", fp32_path), ("int8", int8)):
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for _ in range(5):
                session.run(None, {"input": x1})
            times = [_timed(lambda: session.run(None, {"input": x1})) for _ in range(args.latency_runs)]
            lat[name] = (statistics.median(times) * 1000, min(times) * 1000, max(times) * 1000)
            print(f"onnxruntime {name} batch-1 latency {lat[name][0]:7.2f} ms (min {lat[name][1]:.2f}, max {lat[name][2]:.2f})")
        print(f"onnxruntime int8 / fp32 latency ratio {lat['int8'][0] / lat['fp32'][0]:.2f}x (aim <= 0.6)")


if __name__ == "__main__":
    main()
