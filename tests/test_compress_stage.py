"""``quantzoo run`` with a ``compress`` group: the compressed model is evaluated, quantized and recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from quantlib.compress.steps import parse_step
from zoo.cli import main
from zoo.cli.schema import register_schemas

COMPRESS_GROUP = sorted(p.stem for p in (Path(__file__).parents[1] / "recipes" / "compress").glob("*.yaml"))


def _record(tmp_path: Path) -> dict:
    (path,) = (tmp_path / "results" / "runs").glob("digits_mlp__w8a8_per_channel__*.json")
    return json.loads(path.read_text())


def test_svd_and_sparsity_steps_are_evaluated_and_recorded(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    steps = "[{method: weight_svd, target: 0.7, candidates: [0.25, 0.5]}, {method: n_m_sparsity}]"
    main(["run", "digits_mlp/w8a8_per_channel", f"compress.steps={steps}", "compress.greedy.num_samples=64",
          "hydra.run.dir=.", "evaluator.progress=false", "evaluator.onnxruntime=false"])
    record = _record(tmp_path)
    block = record["compress"]
    assert [s["method"] for s in block["steps"]] == ["weight_svd", "n_m_sparsity"]
    svd = block["steps"][0]
    assert svd["selection"]["cost_ratio"] <= 0.7 and set(svd["selection"]["table"]) == {"fc1", "fc2"}
    assert block["cost"]["macs_ratio"] == pytest.approx(svd["selection"]["cost_ratio"])
    for name, layer in block["layers"].items():
        assert layer["sparsity"] >= 0.5 - 1e-9, name  # 2:4 on every layer (fc1.0's 64 inputs split evenly)
    assert block["size"]["after"]["weights_int_gzip_bytes"] < block["size"]["before"]["weights_int_gzip_bytes"]
    assert block["scoring"] == {"split": "calibration", "num_samples": 64, "score": "top1"}
    assert Path(block["sensitivity_plot"]).is_file() and block["sensitivity_plot"].endswith(".png")
    assert record["metrics"]["compressed"]["num_samples"] == 360 and "compress" in record["timings"]
    assert block["structure"] == ["sparsity"]


def test_a_bad_step_setting_is_one_line_naming_it(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["run", "digits_mlp/w8a8_per_channel", "compress.steps=[{method: clustering, clusterz: 8}]",
              "hydra.run.dir=.", "evaluator.progress=false", "evaluator.onnxruntime=false"])
    err = capsys.readouterr().err
    assert "clusterz" in err and "compress.steps[0]" in err and "Traceback" not in err
    assert not list(tmp_path.glob("results/runs/*.json"))


@pytest.mark.parametrize("name", COMPRESS_GROUP)
def test_every_compress_group_file_composes_and_parses(name, monkeypatch):
    monkeypatch.setenv("QUANTZOO_DATA_DIR", "/data")
    register_schemas()
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        cfg = compose(config_name="mnist_cnn/pcqat_w8", overrides=[f"compress={name}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    steps = [parse_step(step, i) for i, step in enumerate(resolved["compress"]["steps"])]
    assert (name == "none") == (not steps)


def test_quantized_structure_counts_clusters_and_codes_of_the_simulated_model():
    import torch
    from torch import nn

    from quantlib.compress.clustering import cluster_weights
    from quantlib.compress.size import float_sizes, quantized_sizes
    from quantlib.compress.sparsity import sparsify
    from quantlib.quantsim import QuantSim
    from zoo.cli.compress_stage import quantized_structure

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(64, 32)
    dense_sim = QuantSim(dense, x[:1], "per_tensor")
    summary = {"size": {"before": {**float_sizes(dense), **quantized_sizes(dense_sim)}}}
    compressed = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    compressed.load_state_dict(dense.state_dict())
    sparsify(compressed, "magnitude", sparsity=0.5)
    cluster_weights(compressed, 16)
    sim = QuantSim(compressed, x[:1], "per_tensor")
    sim.calibrate([x], progress=False)
    block = quantized_structure(sim, summary)
    for name in ("0", "2"):
        layer = block["layers"][name]
        assert layer["unique"] == 16 and layer["sparsity"] == 0.5 and layer["unique_codes"] <= 16
    assert block["file_int_gzip_ratio"] < 0.7  # zeros and 16 codes per layer compress well
    assert block["file_int_gzip_vs_fp32_gzip"] < block["file_int_gzip_ratio"]
