"""`quantzoo bench`: measurement primitives, the CSV (columns, atomic concurrent appends), the torch
and ONNX Runtime stages on a tiny model, the peer side by side with ONNX Runtime's quantize_static,
the generated summary, and the CLI on digits_mlp.

Speed figures come from `quantzoo bench` itself; these tests check what is measured and how it is
recorded, never how fast anything is.
"""

from __future__ import annotations

import collections
import csv
import json
import multiprocessing
import time

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from zoo.cli import main
from zoo.cli.bench_machine import machine_info, machine_slug
from zoo.cli.bench_measure import PeakRss, Stat, calls_for, timed_repeats
from zoo.cli.bench_ort import export_fp32_onnx, measure_ort, ort_provider, save_inputs
from zoo.cli.bench_peer import PEER_METHODS, BatchReader, PeerSettings, peer_stage, quantize_with_ort
from zoo.cli.bench_report import COLUMNS, BenchCsvError, BenchRow, append_csv, format_table, read_rows, row_dicts
from zoo.cli.bench_run import compose_recipe
from zoo.cli.bench_summary import parse_csv, render_summary, verdict
from zoo.cli.bench_torch import BenchConfigError, TorchBench
from zoo.cli.run import quant_config, recipe_datasets
from zoo.registry import default_registry

MACHINE = {"machine": "m", "cpu": "CPU, with comma", "cpu_count": 2, "load_avg_1m": 0.5}


class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.conv2(self.relu(self.bn(self.conv1(x)))).flatten(1))


@pytest.fixture
def tiny():
    """A BN conv net, two (images, labels) calibration batches of 48 and three eval batches of 32."""
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    images, labels = torch.rand(96, 1, 8, 8), torch.randint(0, 10, (96,))
    calibration = [(images[:48], labels[:48]), (images[48:], labels[48:])]
    return model, calibration, [images[i:i + 32] for i in range(0, 96, 32)]


def test_stat_of_repeats():
    s = Stat.of([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max, s.repeats) == (2.0, 1.0, 3.0, 3)
    assert Stat.of([4.0, 1.0, 2.0, 10.0]).median == 3.0  # even count: mean of the middle two
    rate = s.inverse(6.0)  # 6 images in s seconds -> images per second; the slowest repeat is the min rate
    assert (rate.median, rate.min, rate.max) == (3.0, 2.0, 6.0)
    assert s.scaled(1000).median == 2000.0
    with pytest.raises(ValueError, match="--repeats"):
        Stat.of([])


def test_timed_repeats_times_blocks_after_the_warmup():
    calls = []
    measured = timed_repeats(lambda: (calls.append(1), time.sleep(0.01)), repeats=3, warmup=2, calls=4)
    assert len(calls) == 2 + 3 * 4 and len(measured.seconds) == 3
    assert all(0.009 <= s < 0.5 for s in measured.seconds)  # seconds per call, not per block
    assert calls_for(lambda: time.sleep(0.01), min_seconds=0.05, warmup_seconds=0.0) in range(3, 7)
    with pytest.raises(ValueError, match="--repeats"):
        timed_repeats(lambda: None, repeats=0)


def test_peak_rss_is_the_stage_peak():
    with PeakRss() as big:
        block = np.ones(256 * 1024 * 1024 // 8)  # 256 MiB, touched
        del block
    with PeakRss() as small:
        np.ones(1024).sum()
    assert big.mib is not None and small.mib is not None
    if big.scope == "stage":  # Linux: the high-water mark is reset per block
        assert big.mib - small.mib > 200


def test_machine_slug_is_stable_and_hostname_free():
    assert machine_slug({"cpu": "AMD EPYC 7763 64-Core Processor", "cpu_count": 16}) == "amd-epyc-7763-16c"
    assert machine_slug({"cpu": "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "cpu_count": 32,
                         "gpu": "NVIDIA H100 80GB HBM3"}) == "intel-xeon-platinum-8480-32c-nvidia-h100-80gb-hbm3"
    info = machine_info()
    assert info["machine"] == machine_slug(info) and info["cpu_count"] >= 1 and info["load_avg_1m"] >= 0
    assert all(c.isalnum() or c == "-" for c in info["machine"])


def _dicts(model: str, bench_id: str, values: list[float]) -> list[dict[str, str]]:
    rows = [BenchRow("cpu", "onnx_fp32", f"latency_b1_{i}", "ms", Stat.of([v, v + 1, v + 2])) for i, v in enumerate(values)]
    return row_dicts(rows, model=model, recipe="r", machine=MACHINE, bench_id=bench_id, measured_at="t")


def test_csv_has_the_columns_and_appends_median_min_max(tmp_path):
    path = tmp_path / "m.csv"
    append_csv(path, _dicts("a", "b1", [5.0, 1.5]))
    append_csv(path, _dicts("a", "b2", [7.0]))  # the same quantity again: appended, the old row stays
    with path.open() as handle:
        assert tuple(next(csv.reader(handle))) == COLUMNS
    rows = read_rows(path)
    assert [(r["bench_id"], r["metric"], r["median"], r["min"], r["max"], r["repeats"]) for r in rows] == [
        ("b1", "latency_b1_0", "6", "5", "7", "3"), ("b1", "latency_b1_1", "2.5", "1.5", "3.5", "3"),
        ("b2", "latency_b1_0", "8", "7", "9", "3")]
    assert rows[0]["cpu"] == "CPU, with comma" and rows[0]["load_avg_1m"] == "0.5" and rows[0]["gpu"] == ""
    assert path.read_text().count("bench_id,") == 1  # one header
    size = BenchRow("cpu", "onnx_int8", "file_size", "bytes", Stat.single(18741523))
    (written,) = row_dicts([size], model="a", recipe="r", machine=MACHINE, bench_id="b3", measured_at="t")
    assert (written["median"], written["repeats"], written["samples"]) == ("18741523", "1", "")  # bytes stay exact


def test_csv_refuses_a_file_with_other_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("model,median\nx,1\n")
    with pytest.raises(BenchCsvError, match=r"m\.csv has columns model,median.*--out"):
        append_csv(path, _dicts("a", "b1", [1.0]))
    assert path.read_text() == "model,median\nx,1\n"  # left as it was


def _append_many(path: str, worker: int, count: int) -> None:
    for i in range(count):
        append_csv(path, _dicts(f"w{worker}", f"{worker}-{i}", [float(i), float(i) + 0.5]))


def test_concurrent_appends_keep_every_row(tmp_path):
    """Four processes append 25 times each at once: all 200 rows are there and the file parses."""
    path = tmp_path / "m.csv"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), w, 25)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    rows = read_rows(path)
    assert len(rows) == 200 and len({r["bench_id"] for r in rows}) == 100
    assert all(tuple(r) == COLUMNS for r in rows)
    for w in range(4):  # each worker's appends stay in its own order
        ids = [r["bench_id"] for r in rows if r["model"] == f"w{w}" and r["metric"] == "latency_b1_0"]
        assert ids == [f"{w}-{i}" for i in range(25)]
    assert not list(tmp_path.glob(".m.csv.*.tmp"))  # no temporary file left behind


def test_table_puts_int8_next_to_fp32():
    rows = [
        BenchRow("cpu", "torch_quantsim_eval", "time_ratio_to_fp32", "x", Stat.of([3.0, 2.0, 4.0])),
        BenchRow("cpu", "onnx_fp32", "latency_b1", "ms", Stat.single(4.0)),
        BenchRow("cpu", "onnx_fp32", "file_size", "bytes", Stat.single(4 * 1024 * 1024)),
        BenchRow("cpu", "onnx_int8", "latency_b1", "ms", Stat.single(1.0)),
        BenchRow("cpu", "onnx_int8", "file_size", "bytes", Stat.single(1024 * 1024)),
    ]
    lines = format_table(rows, title="t").splitlines()
    assert "time_ratio_to_fp32" in lines[2] and "(2..4, n=3)" in lines[2]
    assert lines[5].split() == ["onnx_fp32", "4.000", "4.000", "1.00x", "-", "-"]
    assert lines[6].split() == ["onnx_int8", "1.000", "1.000", "0.25x", "-", "-"]


def test_torch_stages_on_a_tiny_model(tiny):
    model, calibration, evaluation = tiny
    tb = TorchBench(model, "per_channel", calibration, evaluation, torch.device("cpu"), repeats=2)
    sim = tb.quantize(["bn_fold", {"name": "bias_correction", "kind": "empirical"}])
    tb.evaluate(sim)
    got = {(r.stage, r.metric): r for r in tb.rows}
    for key in [("torch_quantize", "seconds"), ("torch_prepare", "seconds"), ("torch_calibrate", "time_per_sample"),
                ("torch_ptq_bn_fold", "seconds"), ("torch_ptq_bias_correction", "seconds"),
                ("torch_fp32_eval", "throughput"), ("torch_quantsim_eval", "throughput"),
                ("torch_quantsim_eval", "time_ratio_to_fp32")]:
        assert got[key].stat.repeats == 2 and got[key].stat.min <= got[key].stat.median <= got[key].stat.max, key
    assert got[("torch_calibrate", "time_per_sample")].samples == 96
    assert got[("torch_fp32_eval", "throughput")].samples == 96 and got[("torch_fp32_eval", "throughput")].stat.min > 0
    assert got[("torch_quantsim_eval", "time_ratio_to_fp32")].stat.min > 0
    assert {r.unit for r in tb.rows if r.metric == "peak_rss"} == {"MiB"}
    assert [r.stage for r in tb.rows if r.stage.startswith("torch_ptq_")] == ["torch_ptq_bn_fold", "torch_ptq_bias_correction"]


def test_onnxruntime_worker_measures_fp32_in_a_fresh_process(tiny, tmp_path):
    model, calibration, evaluation = tiny
    fp32 = export_fp32_onnx(model, calibration[0][0][:1], tmp_path / "fp32.onnx")
    session = onnxruntime.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": evaluation[0].numpy()})  # dynamic batch: 32 images
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(evaluation[0]).numpy(), rtol=1e-4, atol=1e-5)

    inputs = save_inputs(evaluation[0], tmp_path / "inputs.npy")
    speed = measure_ort(fp32, inputs, provider="CPUExecutionProvider", repeats=2, warmup=1, block_seconds=0.02)
    assert speed["latency_b1_ms"].repeats == 2 and speed["latency_b1_ms"].median > 0
    assert speed["throughput_b32"].repeats == 2 and speed["throughput_b32"].median > 0
    assert speed["peak_rss_mib"] >= speed["baseline_rss_mib"] > 0 and speed["provider"] == "CPUExecutionProvider"


def test_missing_cuda_provider_is_a_reason_not_an_error():
    provider, reason = ort_provider("cpu")
    assert provider == "CPUExecutionProvider" and reason == ""
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    provider, reason = ort_provider("cuda")
    assert provider is None and "CUDAExecutionProvider" in reason


def test_bench_without_cuda_skips_cleanly(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    assert main(["bench", "digits_mlp/w8a8_per_channel", "--devices", "cuda", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skipped: cuda: torch.cuda.is_available() is False" in out and "no csv written" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--devices", "tpu"], "--devices=tpu"),
    (["--repeats", "0"], "--repeats=0"),
    (["qat.enabled=true"], "qat.enabled=true"),
    (["checkpoint=download"], "checkpoint=download"),
    (["quant.weight_bitz=4"], "weight_bitz"),
    (["--peer", "--peer-methods", "MinMax,KL"], "--peer-methods=MinMax,KL"),
    (["quant.weight_bits=4", "--peer"], "quant.weight_bits=4"),
])
def test_bench_refuses_bad_requests_in_one_line(args, message, tmp_path, capsys):
    assert main(["bench", "digits_mlp/w8a8_per_channel", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_bench_digits_mlp_end_to_end(tmp_path, capsys):
    """The whole CLI on digits_mlp, one repeat: every stage lands in <out>/<machine>.csv."""
    assert main(["bench", "digits_mlp/w8a8_per_channel", "--repeats", "1", "--samples", "32", "--devices", "cpu",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("*.csv")
    assert path.name == f"{machine_info()['machine']}.csv" and f"csv: {path}" in out
    rows = read_rows(path)
    got = {(r["device"], r["stage"], r["metric"]): r for r in rows}
    for stage, metric in [("torch_quantize", "seconds"), ("torch_calibrate", "time_per_sample"),
                          ("torch_fp32_eval", "throughput"), ("torch_quantsim_eval", "time_ratio_to_fp32"),
                          ("torch_export", "seconds"), ("torch_export", "safetensors_size"),
                          ("torch_export", "encodings_size"), ("onnx_fp32", "latency_b1"), ("onnx_int8", "latency_b1"),
                          ("onnx_fp32", "throughput_b32"), ("onnx_int8", "throughput_b32"),
                          ("onnx_fp32", "peak_rss"), ("onnx_int8", "peak_rss"),
                          ("onnx_fp32", "file_size"), ("onnx_int8", "file_size")]:
        row = got[("cpu", stage, metric)]
        assert row["repeats"] == "1" and float(row["median"]) > 0 and row["model"] == "digits_mlp", (stage, metric)
    resolved = compose_recipe("digits_mlp/w8a8_per_channel")
    calibration, _ = recipe_datasets(default_registry().get("digits_mlp"), resolved["data"])
    assert got[("cpu", "torch_calibrate", "time_per_sample")]["samples"] == str(len(calibration))
    assert got[("cpu", "onnx_int8", "throughput_b32")]["samples"] == "32"
    assert len({r["bench_id"] for r in rows}) == 1 and {r["recipe"] for r in rows} == {"w8a8_per_channel"}


def test_peer_settings_follow_the_recipe():
    """W8A8 per-channel: asymmetric uint8 activations, symmetric int8 per-channel weights; W4 is refused."""
    per_channel = PeerSettings.from_quant_config(quant_config(compose_recipe("digits_mlp/w8a8_per_channel")["quant"]))
    assert per_channel == PeerSettings("QUInt8", "QInt8", activation_symmetric=False, weight_symmetric=True,
                                       per_channel=True)
    per_tensor = PeerSettings.from_quant_config(quant_config(compose_recipe("digits_mlp/w8a8_per_tensor")["quant"]))
    assert not per_tensor.per_channel
    with pytest.raises(BenchConfigError, match=r"quant.weight_bits=4 .*w8a8_per_channel"):
        PeerSettings.from_quant_config(quant_config(compose_recipe("digits_mlp/w4a8")["quant"]))


def test_batch_reader_serves_strides_then_rewinds():
    batches = [np.full((2, 1), float(i)) for i in range(3)]
    reader = BatchReader(batches, "input")
    assert len(reader) == 3
    reader.set_range(1, 2)
    got = reader.get_next()
    assert list(got) == ["input"] and got["input"].dtype == np.float32 and got["input"][0, 0] == 1.0
    assert reader.get_next() is None
    reader.rewind()
    assert [reader.get_next()["input"][0, 0] for _ in range(3)] == [0.0, 1.0, 2.0] and reader.get_next() is None


def test_quantize_static_makes_a_per_channel_qdq_model_per_method(tiny, tmp_path):
    """Each calibrate method gives a QDQ model with one weight scale per output channel, close to FP32."""
    model, calibration, evaluation = tiny
    fp32 = export_fp32_onnx(model, calibration[0][0][:1], tmp_path / "fp32.onnx")
    settings = PeerSettings("QUInt8", "QInt8", activation_symmetric=False, weight_symmetric=True, per_channel=True)
    reader = BatchReader([images.numpy() for images, _ in calibration], "input")
    scales = {}
    for method in PEER_METHODS:
        out = quantize_with_ort(fp32, reader, method, settings, tmp_path / f"{method}.onnx")
        graph = onnx.load(str(out)).graph
        ops = collections.Counter(node.op_type for node in graph.node)
        assert ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] >= 5, (method, ops)
        assert "BatchNormalization" not in ops  # quant_pre_process folded it, as quantzoo's recipe does
        arrays = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        per_channel = {a.shape for name, a in arrays.items() if name.endswith("_scale") and a.ndim == 1}
        assert per_channel == {(8,), (10,)}  # conv1, conv2: 8 output channels; fc: 10
        scales[method] = sorted(float(a) for name, a in arrays.items() if name.endswith("_scale") and a.ndim == 0)
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"input": evaluation[0].numpy()})
        with torch.no_grad():
            reference = model(evaluation[0]).numpy()
        assert np.abs(logits - reference).max() < 0.1 * np.abs(reference).max()  # int8 close to FP32, not equal
    assert scales["MinMax"] != scales["Percentile"]  # the method reaches the calibrator (Percentile clips the tails)


def _peer_rows(ours: float, peers: dict[str, float], samples: int = 750) -> list[dict[str, str]]:
    rows = [BenchRow("cpu", "onnx_int8", "top1", "%", Stat.single(ours), samples=samples, note="95% CI 1..2")]
    rows += [BenchRow("cpu", peer_stage(m), "top1", "%", Stat.single(v), samples=samples, note="95% CI 1..2")
             for m, v in peers.items()]
    rows += [BenchRow("cpu", peer_stage(m), "quantize_time", "s", Stat.single(3.0), samples=250, note="n")
             for m in peers]
    return row_dicts(rows, model="m", recipe="r", machine=MACHINE, bench_id="b", measured_at="t")


def test_verdict_says_plainly_when_ours_is_worse():
    worse = verdict(_peer_rows(80.0, {"MinMax": 79.6, "Entropy": 80.4, "Percentile": 80.2}))
    assert worse.startswith("**Ours is worse**") and "best (Entropy) 80.40%" in worse and "-0.40 points (3 of 750" in worse
    tie = verdict(_peer_rows(80.4, {"MinMax": 79.6, "Entropy": 80.4}))
    assert tie.startswith("**Ours is at least as good**") and "+0.00 points" in tie


def test_summary_shows_the_newest_bench_and_is_deterministic():
    old = _peer_rows(79.0, {"MinMax": 80.0})
    new = [{**r, "bench_id": "b2", "measured_at": "u", "median": "81" if r["stage"] == "onnx_int8" else r["median"]}
           for r in old]
    text = render_summary(old + new, "m")
    assert text == render_summary(old + new, "m") and text.endswith("\n") and "## m / r" in text
    assert "bench `b2`" in text and "bench `b`" not in text and "**Ours is at least as good**: 81.00%" in text
    assert "| ORT quantize_static, MinMax | 80.00 | 1..2 |" in text


def test_bench_peer_digits_mlp_end_to_end(monkeypatch, tmp_path, capsys):
    """--peer on digits_mlp: ours and every quantize_static method scored on the whole eval split, in the CSV and .md.

    Ours is the same int8 ONNX model `quantzoo run` exports, so its bench accuracy equals the run record's.
    """
    monkeypatch.chdir(tmp_path)
    main(["run", "digits_mlp/w8a8_per_channel", "hydra.run.dir=.", "evaluator.progress=false"])
    (record_path,) = (tmp_path / "results" / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    capsys.readouterr()

    assert main(["bench", "digits_mlp/w8a8_per_channel", "--repeats", "1", "--samples", "32", "--devices", "cpu",
                 "--peer", "--out", str(tmp_path / "bench")]) == 0
    out = capsys.readouterr().out
    (path,) = (tmp_path / "bench").glob("*.csv")
    got = {(r["stage"], r["metric"]): r for r in read_rows(path)}
    resolved = compose_recipe("digits_mlp/w8a8_per_channel")
    calibration, evaluation = recipe_datasets(default_registry().get("digits_mlp"), resolved["data"])
    # the CSV keeps 6 significant digits; one image is 0.28 points
    assert float(got[("onnx_int8", "top1")]["median"]) == pytest.approx(record["metrics"]["onnxruntime"]["top1"], abs=1e-3)
    assert got[("onnx_int8", "top1")]["samples"] == str(len(evaluation))
    assert float(got[("onnx_int8", "quantize_time")]["median"]) > 0
    for method in PEER_METHODS:
        stage = peer_stage(method)
        assert got[(stage, "top1")]["samples"] == str(len(evaluation)), method
        assert 90 < float(got[(stage, "top1")]["median"]) <= 100, method  # digits: int8 keeps FP32 accuracy
        assert float(got[(stage, "quantize_time")]["median"]) > 0 and float(got[(stage, "file_size")]["median"]) > 0
        assert got[(stage, "quantize_time")]["samples"] == str(len(calibration))
        assert f"calibrate_method={method} QDQ per_channel=True" in got[(stage, "quantize_time")]["note"]
        assert f"| ORT quantize_static, {method} |" in out
    assert "**Ours is" in out
    summary = path.with_suffix(".md").read_text()
    assert summary == render_summary(parse_csv(path.read_text()), path.stem)
    assert "### Ours against ONNX Runtime `quantize_static`" in summary and verdict(read_rows(path)) in summary
