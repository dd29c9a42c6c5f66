"""Tests for evaluators.classification and evaluators.backends (fast, deterministic)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from evaluators import (
    ClassificationMetrics,
    EvaluatorConfigError,
    InferenceBackend,
    OnnxRuntimeBackend,
    TorchBackend,
    build_dataset,
    evaluate_classification,
    prediction_agreement,
    wilson_interval,
)
from evaluators.backends import onnxruntime_providers

# --------------------------------------------------------------------------- known logits

LOGITS = [
    [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 1: 4 classes above it -> top-5 hit only
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 0: 5 classes above it -> miss
    [0.0, 0.0, 9.0, 0.0, 0.0, 0.0],  # label 2: top-1 hit
]
LABELS = [0, 1, 0, 2]


class IndexDataset(Dataset):
    """Item i is (tensor([i]), LABELS[i]); the backend looks the logits up by index."""

    def __len__(self):
        return len(LABELS)

    def __getitem__(self, i):
        return torch.tensor([float(i)]), LABELS[i]


class TableBackend:
    name = "table"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.tensor([LOGITS[int(i)] for i in batch[:, 0]])


def _expected_loss() -> float:
    def ce(row, label):
        return math.log(sum(math.exp(v) for v in row)) - row[label]

    return sum(ce(r, y) for r, y in zip(LOGITS, LABELS)) / len(LABELS)


def test_known_logits_give_known_metrics():
    backend = TableBackend()
    assert isinstance(backend, InferenceBackend)
    m = evaluate_classification(backend, IndexDataset(), batch_size=3, progress=False)
    assert (m.num_samples, m.num_correct_top1, m.num_correct_top5) == (4, 2, 3)
    assert m.top1 == 50.0 and m.top5 == 75.0 and m.topk == 5
    assert m.loss == pytest.approx(_expected_loss(), rel=1e-12)
    assert m.predictions == [0, 5, 5, 2]
    d = m.to_dict()
    assert "predictions" not in d and d["top1_ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert d["backend"] == "table" and d["seconds"] >= 0
    json.dumps(d)
    assert len(m.to_dict(include_predictions=True)["predictions"]) == 4


def test_max_batches_and_few_classes():
    m = evaluate_classification(TableBackend(), IndexDataset(), batch_size=2, progress=False, max_batches=1)
    assert m.num_samples == 2 and m.top1 == 50.0 and m.top5 == 100.0

    class ThreeClasses(TableBackend):
        def __call__(self, batch):
            return super().__call__(batch)[:, :3]

    m3 = evaluate_classification(ThreeClasses(), IndexDataset(), batch_size=4, progress=False)
    assert m3.topk == 3 and m3.top5 == 100.0 and m3.predictions == [0, 2, 2, 2]


def test_bad_logits_are_reported():
    class Wrong:
        name = "wrong"

        def __call__(self, batch):
            return torch.zeros(batch.shape[0], 2)  # label 2 does not fit

    with pytest.raises(ValueError, match="number of classes"):
        evaluate_classification(Wrong(), IndexDataset(), batch_size=4, progress=False)


def test_wilson_interval_and_agreement():
    lo, hi = wilson_interval(80, 100)
    assert lo == pytest.approx(71.1, abs=0.05) and hi == pytest.approx(86.7, abs=0.05)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    assert prediction_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 75.0
    with pytest.raises(ValueError, match="equal length"):
        prediction_agreement([1], [1, 2])


# --------------------------------------------------------------------------- torch vs onnxruntime


@pytest.fixture(scope="module")
def digits_model():
    """A tiny nearest-centroid classifier for digits, built in closed form (no training loop).

    logit_c(x) = <mu_c, x> - |mu_c|^2 / 2, with mu_c the class means of the train split.
    """
    train = build_dataset("digits", "train", root=None, preprocessing=None)
    x, y = train.images.flatten(1).double(), torch.tensor(train.labels)
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.copy_(means)
        model[1].bias.copy_(-0.5 * (means**2).sum(1))
    return model.eval()


@pytest.fixture(scope="module")
def digits_eval():
    return build_dataset("digits", "eval", root=None, preprocessing=None)


def _export(model, path, batch: int, dynamic: bool) -> None:
    torch.onnx.export(
        model,
        (torch.zeros(batch, 1, 8, 8),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None,
        dynamo=False,
    )


def test_torch_and_onnxruntime_agree(digits_model, digits_eval, tmp_path):
    torch_metrics = evaluate_classification(TorchBackend(digits_model), digits_eval, batch_size=64, progress=False)
    assert torch_metrics.top1 > 80.0  # the tiny model did learn

    _export(digits_model, tmp_path / "dynamic.onnx", batch=2, dynamic=True)
    _export(digits_model, tmp_path / "fixed3.onnx", batch=3, dynamic=False)
    for file in ("dynamic.onnx", "fixed3.onnx"):
        backend = OnnxRuntimeBackend(tmp_path / file, intra_op_num_threads=1)
        assert backend.fixed_batch == (3 if file == "fixed3.onnx" else None)
        m = evaluate_classification(backend, digits_eval, batch_size=64, progress=False)
        assert (m.num_correct_top1, m.num_correct_top5, m.num_samples) == (
            torch_metrics.num_correct_top1,
            torch_metrics.num_correct_top5,
            torch_metrics.num_samples,
        )
        assert m.loss == pytest.approx(torch_metrics.loss, abs=1e-5)
        assert prediction_agreement(m, torch_metrics) == 100.0
        assert m.backend.startswith("onnxruntime:")


def test_device_errors_name_the_config_field(digits_model, tmp_path):
    with pytest.raises(EvaluatorConfigError, match="evaluator.device"):
        TorchBackend(nn.Linear(2, 2), device="tpu:x")
    with pytest.raises(EvaluatorConfigError, match="evaluator.device"):
        onnxruntime_providers("cuda", available=["CPUExecutionProvider"])
    assert onnxruntime_providers("auto", available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(EvaluatorConfigError, match="model_path"):
        OnnxRuntimeBackend(tmp_path / "missing.onnx")
    if torch.cuda.is_available():
        assert TorchBackend(nn.Linear(2, 2), device="auto").device.type == "cuda"
    else:
        assert TorchBackend(nn.Linear(2, 2), device="auto").device.type == "cpu"
        with pytest.raises(EvaluatorConfigError, match="evaluator.device"):
            TorchBackend(nn.Linear(2, 2), device="cuda")


def test_metrics_dataclass_round_trip():
    m = ClassificationMetrics(
        top1=80.0, top5=95.0, loss=0.7, num_samples=100, num_correct_top1=80, num_correct_top5=95, seconds=1.0
    )
    assert m.to_dict()["top1_ci95"] == pytest.approx([71.1, 86.7], abs=0.05)
