"""ONNX Runtime speed and memory of one model, measured in a fresh process (run as a script).

    python bench_ort_worker.py MODEL.onnx INPUTS.npy --provider CPUExecutionProvider --repeats 3

``INPUTS.npy`` holds at least one input image batch (N, C, H, W) float32; batch 1 uses its first
image and batch 32 its first 32 images (repeated when it has fewer). For each batch size the
worker makes ``warmup`` untimed calls, picks the number of calls per timed block so a block
lasts about ``--block-seconds``, and times ``--repeats`` blocks. It prints one JSON object:
``latency_b1_ms`` and ``throughput_b32`` (one value per block), ``session_seconds``,
``baseline_rss_mib`` (after imports, before the session) and ``peak_rss_mib`` (the process's
peak resident memory, session and both batch sizes included).

It imports only numpy and onnxruntime (not torch, not quantzoo), so the memory it reports is
what an ONNX Runtime process serving the model takes.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mib() -> float:
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _blocks(run, *, repeats: int, warmup: int, block_seconds: float, max_calls: int) -> tuple[list[float], int]:
    """Seconds per call in each of ``repeats`` timed blocks, and the calls per block."""
    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        run()
    per_call = (time.perf_counter() - start) / max(1, warmup)
    calls = int(min(max_calls, max(1, block_seconds / max(per_call, 1e-9))))
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        values.append((time.perf_counter() - start) / calls)
    return values, calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("--provider", default="CPUExecutionProvider")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block-seconds", type=float, default=0.2)
    parser.add_argument("--max-calls", type=int, default=10000)
    parser.add_argument("--throughput-batch", type=int, default=32)
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime as ort

    baseline = _status_mib("VmRSS") or _peak_rss_mib()
    images = np.load(args.inputs).astype(np.float32, copy=False)
    start = time.perf_counter()
    providers = [args.provider] + (["CPUExecutionProvider"] if args.provider != "CPUExecutionProvider" else [])
    session = ort.InferenceSession(args.model, providers=providers)
    session_seconds = time.perf_counter() - start
    if session.get_providers()[0] != args.provider:
        print(json.dumps({"error": f"onnxruntime did not use {args.provider} (got {session.get_providers()})"}))
        return 3
    name = session.get_inputs()[0].name
    reps = -(-args.throughput_batch // images.shape[0])
    big = np.ascontiguousarray(np.concatenate([images] * reps)[: args.throughput_batch])
    one = np.ascontiguousarray(images[:1])

    latency, calls_b1 = _blocks(lambda: session.run(None, {name: one}), repeats=args.repeats, warmup=args.warmup,
                                block_seconds=args.block_seconds, max_calls=args.max_calls)
    batch, calls_b32 = _blocks(lambda: session.run(None, {name: big}), repeats=args.repeats, warmup=1,
                               block_seconds=args.block_seconds, max_calls=args.max_calls)
    print(json.dumps({
        "provider": session.get_providers()[0],
        "session_seconds": session_seconds,
        "latency_b1_ms": [1000.0 * v for v in latency],
        "throughput_b32": [args.throughput_batch / v for v in batch],
        "calls_per_block": {"b1": calls_b1, "b32": calls_b32},
        "baseline_rss_mib": baseline,
        "peak_rss_mib": _peak_rss_mib(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
