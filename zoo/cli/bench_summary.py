"""The bench summary: ``results/bench/<machine>.md``, a Markdown view of ``<machine>.csv``.

`quantzoo bench` rewrites it from the whole CSV every time it appends (under the CSV's lock, see
:func:`zoo.cli.bench_report.append_csv`), so nobody types a figure into it. For each
``model/recipe`` in sorted order it shows, from the newest bench that measured them:

* ONNX Runtime: FP32 next to quantzoo's int8 QDQ model (file size, batch-1 latency and its ratio
  to FP32, batch-32 throughput, peak RSS), per device;
* torch: the simulated/FP32 eval time ratio, calibration time per sample, quantize and export
  seconds;
* the peer side by side (benches run with ``--peer``): ONNX Runtime ``quantize_static`` with
  each calibrate method next to quantzoo's recipe, all scored by the same evaluator on the same
  eval images, with their quantization times, and a verdict line that says plainly whether
  ours is at least as good as the peer's best.

The rendering is a pure function of the CSV rows, so the same CSV always gives the same bytes.
"""

from __future__ import annotations

import csv
import io
from typing import Iterable, Sequence

from .bench_peer import PEER_METHODS, PEER_STAGE_PREFIX, peer_stage

Row = dict[str, str]
MIB = 1024 * 1024


def _method(stage: str) -> str:
    """The calibrate method of a peer stage, spelled as ONNX Runtime spells it (``peer_ort_minmax`` -> MinMax)."""
    return {peer_stage(m): m for m in PEER_METHODS}.get(stage, stage[len(PEER_STAGE_PREFIX):])


def parse_csv(text: str) -> list[Row]:
    """The rows of a bench CSV given as text, in file order."""
    return list(csv.DictReader(io.StringIO(text)))


def _newest_bench(rows: Sequence[Row], wanted) -> list[Row]:
    """Rows of the newest bench (by ``measured_at``, then file order) having a row that ``wanted`` accepts."""
    order = {r["bench_id"]: (r["measured_at"], i) for i, r in enumerate(rows)}
    ids = {r["bench_id"] for r in rows if wanted(r)}
    if not ids:
        return []
    newest = max(ids, key=lambda b: order[b])
    return [r for r in rows if r["bench_id"] == newest]


def _get(rows: Sequence[Row], device: str, stage: str, metric: str) -> Row | None:
    return next((r for r in rows if (r["device"], r["stage"], r["metric"]) == (device, stage, metric)), None)


def _value(row: Row | None) -> float | None:
    return None if row is None else float(row["median"])


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _spread(row: Row | None, spec: str) -> str:
    if row is None:
        return "-"
    text = format(float(row["median"]), spec)
    if row["repeats"] != "1":
        text += f" ({format(float(row['min']), spec)}..{format(float(row['max']), spec)}, n={row['repeats']})"
    return text


def _provenance(rows: Sequence[Row]) -> str:
    r = rows[0]
    dirty = " (dirty)" if r["git_dirty"] == "True" else ""
    return (f"bench `{r['bench_id']}` at {r['measured_at']}; {r['cpu']}, {r['cpu_count']} cores, "
            f"{r['torch_threads']} torch threads, load average {r['load_avg_1m']} at start; torch {r['torch']}, "
            f"onnxruntime {r['onnxruntime']}, git {r['git_sha'][:12]}{dirty}")


def speed_section(rows: Sequence[Row]) -> list[str]:
    """ONNX Runtime FP32 vs int8 and the torch stage figures of one bench, per device."""
    lines: list[str] = []
    for device in dict.fromkeys(r["device"] for r in rows):
        fp32_latency = _value(_get(rows, device, "onnx_fp32", "latency_b1"))
        stages = [s for s in ("onnx_fp32", "onnx_int8") if _get(rows, device, s, "latency_b1")]
        if stages:
            lines += [f"ONNX Runtime on {device} (median of repeats):", "",
                      "| model | file MiB | batch-1 latency ms | vs FP32 | batch-32 img/s | peak RSS MiB |",
                      "|---|---:|---:|---:|---:|---:|"]
            for stage in stages:
                latency = _value(_get(rows, device, stage, "latency_b1"))
                ratio = "-" if latency is None or not fp32_latency else f"{latency / fp32_latency:.2f}x"
                size = _value(_get(rows, "cpu", stage, "file_size"))
                lines.append(f"| {stage} | {_fmt(size, '.2f', 1 / MIB)} | {_spread(_get(rows, device, stage, 'latency_b1'), '.2f')} "
                             f"| {ratio} | {_fmt(_value(_get(rows, device, stage, 'throughput_b32')), '.1f')} "
                             f"| {_fmt(_value(_get(rows, device, stage, 'peak_rss')), '.0f')} |")
            lines.append("")
        torch_keys = [("torch_quantsim_eval", "time_ratio_to_fp32", "simulated eval time / FP32 eval time"),
                      ("torch_fp32_eval", "throughput", "FP32 eval throughput"),
                      ("torch_quantsim_eval", "throughput", "simulated eval throughput"),
                      ("torch_calibrate", "time_per_sample", "calibration per sample"),
                      ("torch_quantize", "seconds", "quantize stage (calibration and PTQ steps)"),
                      ("torch_export", "seconds", "export (QDQ ONNX, encodings, safetensors)")]
        found = [(label, row) for stage, metric, label in torch_keys if (row := _get(rows, device, stage, metric))]
        if found:
            lines += [f"torch on {device}:", "", "| quantity | median (min..max, repeats) | unit |", "|---|---:|---|"]
            lines += [f"| {label} | {_spread(row, '.4g')} | {row['unit']} |" for label, row in found]
            lines.append("")
    return lines


def peer_section(rows: Sequence[Row], recipe: str) -> list[str]:
    """Ours next to ONNX Runtime ``quantize_static`` (each calibrate method), with a plain verdict."""
    ours = _get(rows, "cpu", "onnx_int8", "top1")
    peers = [s for s in dict.fromkeys(r["stage"] for r in rows) if s.startswith(PEER_STAGE_PREFIX)]
    if ours is None or not peers:
        return []
    entries = [("FP32 (reference)", "onnx_fp32")] if _get(rows, "cpu", "onnx_fp32", "top1") else []
    entries.append((f"quantzoo `{recipe}`", "onnx_int8"))
    entries += [(f"ORT quantize_static, {_method(s)}", s) for s in peers]
    calibration = _get(rows, "cpu", peers[0], "quantize_time")["samples"]
    lines = [f"Accuracy next to ONNX Runtime's `quantize_static` (same FP32 ONNX model, same "
             f"{calibration} calibration images, "
             f"same evaluator on the same {ours['samples']} eval images, all run by ONNX Runtime on the CPU):", "",
             "| model | top-1 % | top-1 95% CI | top-5 % | quantization s | file MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, stage in entries:
        top1 = _get(rows, "cpu", stage, "top1")
        ci = top1["note"].split(";")[0].removeprefix("95% CI ") if top1 else "-"
        size = _value(_get(rows, "cpu", stage, "file_size"))
        lines.append(f"| {label} | {_fmt(_value(top1), '.2f')} | {ci} | {_fmt(_value(_get(rows, 'cpu', stage, 'top5')), '.2f')} "
                     f"| {_spread(_get(rows, 'cpu', stage, 'quantize_time'), '.1f')} | {_fmt(size, '.2f', 1 / MIB)} |")
    lines += ["", verdict(rows), ""]
    quantize_note = (_get(rows, "cpu", "onnx_int8", "quantize_time") or {}).get("note")
    first = _method(peers[0])  # the notes differ only in the method
    peer_note = _get(rows, "cpu", peers[0], "quantize_time")["note"].replace(
        f"calibrate_method={first}", "calibrate_method=<the row's method>")
    if quantize_note:
        lines.append(f"quantzoo's quantization time: {quantize_note}.")
    lines += [f"ONNX Runtime's: {peer_note}.", ""]
    return lines


def verdict(rows: Sequence[Row]) -> str:
    """One sentence: ours against the best ``quantize_static`` method, in top-1 points."""
    ours = _get(rows, "cpu", "onnx_int8", "top1")
    peers = [r for r in rows if r["stage"].startswith(PEER_STAGE_PREFIX) and r["metric"] == "top1"]
    best = max(peers, key=lambda r: float(r["median"]))  # ties: the first method listed
    mine, theirs = float(ours["median"]), float(best["median"])
    method = _method(best["stage"])
    one = 100.0 / int(ours["samples"])
    delta = mine - theirs
    if delta >= 0:
        return (f"**Ours is at least as good**: {mine:.2f}% top-1 against quantize_static's best ({method}) "
                f"{theirs:.2f}%, {delta:+.2f} points (one image is {one:.3f} points).")
    return (f"**Ours is worse**: {mine:.2f}% top-1 against quantize_static's best ({method}) {theirs:.2f}%, "
            f"{delta:+.2f} points ({round(-delta / one)} of {ours['samples']} images; one image is {one:.3f} points).")


def render_summary(rows: Iterable[Row], machine: str) -> str:
    """The whole ``<machine>.md`` from every row of ``<machine>.csv``."""
    rows = list(rows)
    lines = [f"# Bench on `{machine}`", "",
             f"Generated by `quantzoo bench` from `{machine}.csv` (every bench appends there; this page shows "
             "the newest bench of each recipe, and the newest bench run with `--peer` for the comparison with "
             "ONNX Runtime's own quantizer). Do not edit by hand.", ""]
    for key in sorted({(r["model"], r["recipe"]) for r in rows}):
        mine = [r for r in rows if (r["model"], r["recipe"]) == key]
        lines += [f"## {key[0]} / {key[1]}", ""]
        speed = _newest_bench(mine, lambda r: r["stage"].startswith(("onnx_", "torch_")) and r["metric"] != "top1")
        peer = _newest_bench(mine, lambda r: r["stage"].startswith(PEER_STAGE_PREFIX))
        lines += ["### Speed, memory and size", "", _provenance(speed), "", *speed_section(speed)] if speed else []
        if peer:
            lines += ["### Ours against ONNX Runtime `quantize_static`", "", _provenance(peer), "",
                      *peer_section(peer, key[1])]
    return "\n".join(lines).rstrip("\n") + "\n"
