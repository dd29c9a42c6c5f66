"""`quantzoo reproduce`: the comparison rules, the record lookup, and real re-runs.

The quick end-to-end test runs digits_mlp twice (run, then reproduce) on the CPU and requires
identical metrics and identical artifact sha256. Every committed record in results/runs is
reproduced by one parametrized test: the quick ones (:func:`_quick`: digits_mlp, and mnist_cnn
plain PTQ) in CI, the others (EfficientNet-Lite0, QAT, compression, PTQ passes) behind the
``slow`` marker.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from zoo.cli import main
from zoo.cli.bench_run import compose_recipe
from zoo.cli.reproduce_compare import ABSENT, compare_records, format_comparison
from zoo.cli.reproduce_run import ReproduceError, explain_artifact_difference, find_record, run_config

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted((REPO / "results" / "runs").glob("*.json"))
QUICK_MODELS = ("digits_mlp",)  # seconds per run, whatever the recipe
PLAIN_PTQ_MODELS: tuple[str, ...] = ()  # e.g. ("mnist_cnn",): tens of seconds each, kept out of CI for its time budget


def _quick(record_path: Path) -> bool:
    """True for a record that reproduces in seconds on 2 CPU cores: a QUICK_MODELS model, or plain PTQ
    (no PTQ steps, QAT or compression) of a PLAIN_PTQ_MODELS model."""
    record = json.loads(record_path.read_text())
    config = record["provenance"]["config"]
    plain = (not config["ptq"]["steps"] and not (config.get("qat") or {}).get("enabled")
             and not (config.get("compress") or {}).get("steps"))
    return record["model"] in QUICK_MODELS or (record["model"] in PLAIN_PTQ_MODELS and plain)


COMMITTED_PARAMS = [pytest.param(p, id=p.stem, marks=() if _quick(p) else pytest.mark.slow) for p in COMMITTED]


def _record(run_id: str = "m__r__20260101T000000Z__00000000", top1: float = 80.0) -> dict:
    metrics = {"top1": top1, "top5": 95.0, "loss": 0.9, "num_samples": 750, "num_correct_top1": round(top1 * 7.5),
               "num_correct_top5": 712, "topk": 5, "backend": "torch:cpu", "seconds": 12.0}
    return {
        "run_id": run_id, "model": "m", "recipe": "r",
        "metrics": {"fp32": dict(metrics), "quantsim": dict(metrics)},
        "agreement": {"fp32_vs_quantsim_top1": 97.0},
        "artifacts": {"onnx": {"path": "a.onnx", "sha256": "1" * 64, "bytes": 10},
                      "weights": {"path": "a.safetensors", "sha256": "2" * 64, "bytes": 10}},
        "provenance": {
            "config": {"seed": 0, "results_dir": "results", "artifacts_dir": "artifacts", "quant": {"weight_bits": 8}},
            "git": {"sha": "abc", "dirty": False},
            "packages": {"torch": "2.14.1", "onnxruntime": "1.32.0"},
            "python": "3.11.7", "platform": "Linux-x", "seed": 0,
            "hardware": {"cpu": "AMD EPYC", "cpu_count": 2, "torch_threads": 2, "gpu": None},
            "dataset_fingerprint": {"calibration": "c" * 64, "eval": "e" * 64},
            "calibration_sample_ids": [f"img{i}.jpg" for i in range(250)],
            "checkpoint_sha256": "f" * 64,
        },
    }


def _reproduced(original: dict, **changes) -> dict:
    new = copy.deepcopy(original)
    new["run_id"] = "m__r__20260102T000000Z__11111111"
    new["provenance"]["config"]["results_dir"] = "/tmp/x"  # reproduce writes elsewhere on purpose
    for backend in new["metrics"].values():
        backend["seconds"] = 99.0  # timings never count
    for path, value in changes.items():
        node = new
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return new


def test_identical_runs_pass_in_exact_mode():
    original = _record()
    comparison = compare_records(original, _reproduced(original))
    assert comparison.mode == "exact" and comparison.passed and comparison.identical
    assert comparison.provenance == []  # results_dir is reproduce's own setting, not a difference
    assert "PASS" in format_comparison(comparison)


def test_exact_mode_fails_on_any_metric_or_hash_change():
    original = _record()
    changed = _reproduced(original, **{"metrics.quantsim.loss": 0.9000001, "artifacts.weights.sha256": "3" * 64})
    comparison = compare_records(original, changed, tolerance=5.0)
    assert comparison.mode == "exact" and not comparison.passed
    assert any("metrics.quantsim.loss" in f for f in comparison.failures)
    assert any("artifacts.weights.sha256" in f for f in comparison.failures)
    assert [d.field for d in comparison.artifacts] == ["artifacts.weights.sha256"]


def test_other_environment_lists_provenance_and_uses_the_tolerance():
    original = _record()
    moved = _reproduced(original, **{"provenance.packages.torch": "2.15.0", "provenance.hardware.cpu_count": 16,
                                     "metrics.quantsim.top1": 80.4, "artifacts.onnx.sha256": "9" * 64})
    comparison = compare_records(original, moved, tolerance=0.5)
    assert comparison.mode == "tolerance" and comparison.passed
    fields = {d.field: (d.original, d.reproduced) for d in comparison.provenance}
    assert fields["packages.torch"] == ("2.14.1", "2.15.0") and fields["hardware.cpu_count"] == (2, 16)
    (delta,) = [m for m in comparison.metrics if m.backend == "quantsim" and m.metric == "top1"]
    assert delta.delta == pytest.approx(0.4)
    assert any("artifact hash" in n for n in comparison.notes)  # listed, not failed

    comparison = compare_records(original, moved, tolerance=0.3)
    assert not comparison.passed
    assert any("metrics.quantsim.top1" in f and "--tolerance=0.3" in f for f in comparison.failures)


def test_different_inputs_or_missing_backend_fail_in_any_mode():
    original = _record()
    other_data = _reproduced(original, **{"provenance.packages.torch": "2.15.0",
                                          "provenance.dataset_fingerprint.eval": "d" * 64})
    comparison = compare_records(original, other_data, tolerance=100)
    assert not comparison.passed and any("dataset_fingerprint.eval" in f for f in comparison.failures)

    ids = _reproduced(original, **{"provenance.calibration_sample_ids": [f"img{i}.jpg" for i in range(1, 251)]})
    comparison = compare_records(original, ids)
    (diff,) = [d for d in comparison.provenance if d.field == "calibration_sample_ids"]
    assert diff.original == "[250 items; 250 differ from the other run]"  # long lists are summarised
    assert not comparison.passed

    missing = _reproduced(original)
    del missing["metrics"]["quantsim"]
    assert "metrics.quantsim is missing from the reproduced run" in compare_records(original, missing).failures


def test_a_field_added_later_at_null_is_not_a_difference():
    original = _record()
    newer = _reproduced(original, **{"provenance.quantized_checkpoint_sha256": None, "provenance.config.checkpoint": None})
    comparison = compare_records(original, newer)
    assert comparison.provenance == [] and comparison.passed
    newer["provenance"]["config"]["checkpoint"] = "download"
    assert [d.field for d in compare_records(original, newer).provenance] == ["config.checkpoint"]
    assert compare_records(original, newer).provenance[0].original == ABSENT


def test_tolerance_must_be_a_non_negative_number():
    with pytest.raises(ValueError, match="--tolerance"):
        compare_records(_record(), _record(), tolerance=-1)


def test_find_record_by_run_id_and_newest_by_recipe(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for stamp in ("20260101T000000Z__aaaaaaaa", "20260301T000000Z__bbbbbbbb", "20260201T000000Z__cccccccc"):
        (runs / f"digits_mlp__w4a8__{stamp}.json").write_text("{}")
    (runs / "digits_mlp_x__w4a8__20270101T000000Z__dddddddd.json").write_text("{}")
    assert find_record("digits_mlp/w4a8", tmp_path).name == "digits_mlp__w4a8__20260301T000000Z__bbbbbbbb.json"
    assert find_record("digits_mlp__w4a8__20260101T000000Z__aaaaaaaa", tmp_path).parent == runs
    with pytest.raises(ReproduceError, match="quantzoo run mnist_cnn/w4a8"):
        find_record("mnist_cnn/w4a8", tmp_path)
    with pytest.raises(ReproduceError, match="does not exist"):
        find_record("nope", tmp_path)


def test_run_config_uses_the_record_and_names_bad_keys(tmp_path):
    record = json.loads(COMMITTED[0].read_text()) if COMMITTED else None
    if record is None:
        pytest.skip("no committed record")
    cfg = run_config(record, results_dir=tmp_path / "r", artifacts_dir=tmp_path / "a", overrides=["evaluator.batch_size=25"])
    assert cfg.results_dir == str(tmp_path / "r") and cfg.artifacts_dir == str(tmp_path / "a")
    assert cfg.quant.weight_bits == record["provenance"]["config"]["quant"]["weight_bits"]
    assert cfg.evaluator.batch_size == 25 and cfg.data.root == record["provenance"]["config"]["data"]["root"]

    with pytest.raises(ReproduceError, match="--artifacts-dir"):
        run_config(record, results_dir="r", artifacts_dir="a", overrides=["artifacts_dir=/elsewhere"])
    with pytest.raises(ReproduceError, match="key=value"):
        run_config(record, results_dir="r", artifacts_dir="a", overrides=["evaluator.batch_size"])
    broken = copy.deepcopy(record)
    broken["provenance"]["config"]["quant"]["weight_bitz"] = 4
    with pytest.raises(ReproduceError, match="weight_bitz"):
        run_config(broken, results_dir="r", artifacts_dir="a")


def _safetensors(path: Path, header: str, payload: bytes) -> Path:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)
    return path


def test_explains_a_safetensors_file_that_differs_only_in_header_order(tmp_path):
    tensor = '"w":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}'
    a = _safetensors(tmp_path / "a.safetensors", '{"__metadata__":{"a":"1","b":"2"},' + tensor + "}", b"\x01\x02")
    b = _safetensors(tmp_path / "b.safetensors", '{"__metadata__":{"b":"2","a":"1"},' + tensor + "}", b"\x01\x02")
    c = _safetensors(tmp_path / "c.safetensors", '{"__metadata__":{"b":"2","a":"1"},' + tensor + "}", b"\x01\x03")
    assert a.read_bytes() != b.read_bytes()
    assert "only the key order" in explain_artifact_difference(a, b)
    assert explain_artifact_difference(a, c) is None  # different tensor bytes: a real difference
    assert explain_artifact_difference(a, tmp_path / "gone.safetensors") is None


def test_explains_an_onnx_file_that_differs_only_in_the_exporters_debug_metadata(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    def model(source: str | None, alpha: float = 0.1) -> onnx.ModelProto:
        node = helper.make_node("LeakyRelu", ["x"], ["y"], alpha=alpha)
        if source:
            node.metadata_props.add(key="pkg.torch.onnx.stack_trace", value=f'File "{source}/quantlib/qmodules.py", line 279')
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        return helper.make_model(graph)

    paths = {}
    for name, proto in {"a": model("/tmp/clone_a"), "b": model("/work/clone_b"), "c": model(None, alpha=0.2)}.items():
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(proto, str(paths[name]))
    assert paths["a"].read_bytes() != paths["b"].read_bytes()
    assert "debug metadata" in explain_artifact_difference(paths["a"], paths["b"])
    assert explain_artifact_difference(paths["a"], paths["c"]) is None  # another attribute: a real difference


def test_reproduce_cli_refuses_a_bad_request(tmp_path, capsys):
    assert main(["reproduce", "digits_mlp/w8a8_per_channel", "--results-dir", str(tmp_path)]) == 2
    assert "no run record for digits_mlp/w8a8_per_channel" in capsys.readouterr().err
    assert main(["reproduce", "x", "--tolerance", "-1"]) == 2
    assert "--tolerance" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "x", "--tolerance", "1", "--tolerence", "2"])
    assert "unrecognized arguments: --tolerence 2" in capsys.readouterr().err


def test_cli_by_run_id_lists_provenance_and_fails_beyond_the_tolerance(monkeypatch, tmp_path, capsys):
    """RUN_ID form through the CLI, with the re-run replaced by one on another torch that moved top-1."""
    import zoo.cli.reproduce_run as reproduce_run

    original = _record("digits_mlp__w8a8_per_channel__20260101T000000Z__00000000")
    original["provenance"]["config"] = compose_recipe("digits_mlp/w8a8_per_channel")  # a real resolved recipe
    threads_before = torch.get_num_threads()
    original["provenance"]["hardware"]["torch_threads"] = threads_before + 1
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / f"{original['run_id']}.json").write_text(json.dumps(original))
    seen = {}

    def fake_execute(cfg):
        seen["config"], seen["threads"] = cfg, torch.get_num_threads()
        record = _reproduced(original, **{"provenance.packages.torch": "2.15.0", "metrics.quantsim.top1": 79.2})
        path = Path(cfg.results_dir) / "runs" / f"{record['run_id']}.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))
        return {**record, "record_path": str(path)}

    monkeypatch.setattr(reproduce_run, "execute", fake_execute)
    code = main(["reproduce", original["run_id"], "--results-dir", str(tmp_path), "--tolerance", "0.5",
                 "--artifacts-dir", str(tmp_path / "art")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert seen["config"].quant.weight_bits == 8 and seen["config"].artifacts_dir == str(tmp_path / "art")
    assert seen["threads"] == threads_before + 1 and torch.get_num_threads() == threads_before  # the record's count, then restored
    assert "FAIL (tolerance mode, tolerance 0.5 top-1 points" in out
    assert "  packages.torch: 2.14.1 -> 2.15.0" in out  # the provenance field that differs
    assert "quantsim               80.000      79.200   -0.800" in out  # the metric delta
    assert ("failure: metrics.quantsim.top1 80.0 -> 79.2 moved more than --tolerance=0.5 points" in out)
    (report,) = (tmp_path / "reproduced").glob("*.json")
    saved = json.loads(report.read_text())
    assert saved["comparison"]["passed"] is False and saved["original_record"].endswith(f"{original['run_id']}.json")

    assert main(["reproduce", original["run_id"], "--results-dir", str(tmp_path), "--tolerance", "1.0",
                 "--artifacts-dir", str(tmp_path / "art"), "evaluator.batch_size=64"]) == 0  # within a wider tolerance
    assert seen["config"].evaluator.batch_size == 64  # key=value overrides may follow the options


def test_same_recipe_twice_on_the_cpu_is_identical(monkeypatch, tmp_path, capsys):
    """quantzoo run, then quantzoo reproduce: identical metrics and artifact sha256, results/runs untouched."""
    monkeypatch.chdir(tmp_path)
    main(["run", "digits_mlp/w8a8_per_channel", "hydra.run.dir=.", "evaluator.progress=false"])
    (original,) = (tmp_path / "results" / "runs").glob("*.json")
    capsys.readouterr()

    code = main(["reproduce", "digits_mlp/w8a8_per_channel"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS (exact mode" in out and "results identical" in out
    assert list((tmp_path / "results" / "runs").glob("*.json")) == [original]
    (report_path,) = (tmp_path / "results" / "reproduced").glob("digits_mlp__w8a8_per_channel__*.json")
    report = json.loads(report_path.read_text())
    first = json.loads(original.read_text())
    assert report["comparison"]["identical"] and report["comparison"]["original_run_id"] == first["run_id"]
    assert report["record"]["run_id"] != first["run_id"]
    for kind, artifact in first["artifacts"].items():
        assert report["record"]["artifacts"][kind]["sha256"] == artifact["sha256"], kind
        assert Path(report["record"]["artifacts"][kind]["path"]).parts[:2] == ("artifacts", "reproduced")
    for backend, metrics in first["metrics"].items():
        again = report["record"]["metrics"][backend]
        assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in metrics.items() if k != "seconds"}


def test_a_quick_committed_record_runs_in_ci():
    """The split of the next test: at least one committed record is quick, and EfficientNet-Lite0 never is."""
    if not COMMITTED:
        pytest.skip("no committed record")
    quick = [p for p in COMMITTED if _quick(p)]
    assert quick, "no committed digits_mlp or plain-PTQ mnist_cnn record; commit one so CI reproduces a record"
    assert not [p.name for p in quick if p.name.startswith("efficientnet_lite0__")]


@pytest.mark.parametrize("record_path", COMMITTED_PARAMS)
def test_every_committed_record_reproduces(record_path, tmp_path, capsys):
    """`quantzoo reproduce RUN_ID` passes: exact on the recording environment, within the tolerance elsewhere."""
    record = json.loads(record_path.read_text())
    overrides = []
    data_dir = os.environ.get("QUANTZOO_DATA_DIR")
    root = record["provenance"]["config"]["data"].get("root")
    if root and not Path(root).is_dir():
        if not data_dir:
            pytest.skip(f"{root} is not here; set QUANTZOO_DATA_DIR")
        overrides.append(f"data.root={Path(data_dir) / Path(root).name}")
    code = main(["reproduce", record["run_id"], *overrides, "--results-dir", str(REPO / "results"),
                 "--out", str(tmp_path / "reproduced"), "--artifacts-dir", str(tmp_path / "artifacts")])
    out = capsys.readouterr().out
    print(out)
    assert code == 0, out
