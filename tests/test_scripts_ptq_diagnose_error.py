"""scripts/ptq_diagnose_error.py on the MNIST CNN: the held-out calibration report it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ptq_diagnose_error.py"


def _script():
    spec = importlib.util.spec_from_file_location("ptq_diagnose_error", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_scores_adaround_against_nearest_on_held_out_calibration_images(tmp_path):
    out = tmp_path / "report.json"
    _script().main(["mnist_cnn/w4a8_adaround", "--fit", "384", "--per-block", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["fit_images"] == 384 and report["held_out_images"] == 128
    assert report["adaround"]["kl"] < report["nearest"]["kl"]
    for key in ("weights_only", "grid_weights_activations_only"):
        assert set(report[key]) == {"kl", "agreement"}
    assert list(report["per_block_float"]) == ["features.0", "features.3", "features.6", "features.9", "features.12", "fc"]
    assert report["git"] is None or "sha" in report["git"]


def test_fit_must_leave_held_out_images(tmp_path):
    with pytest.raises(SystemExit, match=r"--fit 512 must leave held-out images: the calibration split has 512"):
        _script().main(["mnist_cnn/w4a8_adaround", "--fit", "512", "--out", str(tmp_path / "r.json")])


def test_a_missing_data_dir_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTZOO_DATA_DIR", raising=False)
    with pytest.raises(SystemExit, match=r"ptq_diagnose_error: error: data.root needs QUANTZOO_DATA_DIR"):
        _script().main(["efficientnet_lite0/w4a8_adaround_ends8_blocks_reg1", "--out", str(tmp_path / "r.json")])


def test_a_bias_tuning_step_after_adaround_is_scored_and_overrides_apply(tmp_path):
    out = tmp_path / "report.json"
    _script().main(["mnist_cnn/w4a8_adaround_bias_tuning", "ptq.steps.0.num_iterations=50", "ptq.steps.1.epochs=2",
                    "--fit", "384", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["overrides"] == ["ptq.steps.0.num_iterations=50", "ptq.steps.1.epochs=2"]
    assert [entry["epoch"] for entry in report["bias_tuning_history"]] == [0, 1, 2]
    assert set(report["bias_tuning"]) == {"kl", "agreement"} and report["bias_tuning"]["kl"] < report["nearest"]["kl"]


def test_other_step_lists_are_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"runs an adaround step, optionally followed by bias_tuning; this recipe has \['cle', 'bias_correction'\]"):
        _script().main(["mnist_cnn/w8a8_per_tensor", "ptq.steps=[{name: cle}, {name: bias_correction}]",
                        "--out", str(tmp_path / "r.json")])
