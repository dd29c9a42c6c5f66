"""`quantzoo bench MODEL/RECIPE [key=value ...]`: speed, memory and size of every stage of a recipe.

Appends its rows to ``<out>/<machine>.csv`` (default ``results/bench/``; the machine is a slug
of the CPU model, core count and GPU), re-renders ``<out>/<machine>.md`` from it and prints a
table. What is measured: see :mod:`zoo.cli.bench_run`. ``--peer`` also runs ONNX Runtime's
``quantize_static`` (MinMax, Entropy, Percentile) on the same FP32 ONNX model and calibration
images and puts its accuracy and quantization time next to ours. Exit status: 0 when measured (or when every requested device is
missing: skipped with a note), 2 for a request that cannot be measured.
"""

from __future__ import annotations

import argparse
import sys


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def register(subparsers) -> None:
    """Add the ``bench`` subcommand to ``subparsers``; its ``func(args)`` returns the exit status."""
    p = subparsers.add_parser(
        "bench", help="measure speed, memory and size of every stage of a recipe (torch and ONNX Runtime)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="MODEL/RECIPE")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides of the recipe, as for quantzoo run")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement, after a warm-up (default 3)")
    p.add_argument("--samples", type=int, default=128,
                   help="eval images per torch throughput pass (default 128); the first 32 feed ONNX Runtime")
    p.add_argument("--devices", type=_csv_list, default=["cpu", "cuda"],
                   help="comma list of cpu, cuda (default cpu,cuda: cuda is skipped with a note when it is not there)")
    p.add_argument("--out", default="results/bench", help="folder of the per-machine CSV files (default results/bench)")
    p.add_argument("--peer", action="store_true",
                   help="also quantize the same FP32 ONNX model with onnxruntime.quantization.quantize_static and "
                        "compare accuracy (whole eval split) and quantization time with ours")
    p.add_argument("--peer-methods", type=_csv_list, default=None,
                   help="comma list of calibrate methods for --peer (default MinMax,Entropy,Percentile)")
    p.add_argument("--peer-repeats", type=int, default=1,
                   help="timed quantize_static runs per method for --peer (default 1; one run takes seconds to minutes)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from .bench_ort import OrtBenchError
    from .bench_peer import PEER_METHODS
    from .bench_report import BenchCsvError
    from .bench_run import bench
    from .bench_torch import BenchConfigError

    try:
        result = bench(args.target, overrides=args.overrides, repeats=args.repeats, samples=args.samples,
                       devices=args.devices, out_dir=args.out,
                       peer_methods=(args.peer_methods or list(PEER_METHODS)) if args.peer else None, peer_repeats=args.peer_repeats)
    except (BenchConfigError, BenchCsvError, OrtBenchError) as error:
        print(f"quantzoo bench: error: {error}", file=sys.stderr)
        return 2
    print(result.table())
    return 0
