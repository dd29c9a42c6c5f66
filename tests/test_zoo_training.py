"""Tests for zoo.training_data (same split as evaluators) and zoo.training (deterministic CPU training)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from evaluators import Preprocessing, TorchBackend, build_dataset, evaluate_classification
from zoo import builder
from zoo.card import CardError
from zoo.registry import default_registry
from zoo.training import METADATA_KEY, train_model
from zoo.training_data import load_arrays, load_split, split_indices


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture(scope="module")
def digits_card(registry):
    return registry.get("digits_mlp")


@pytest.fixture(scope="module")
def trained(digits_card, tmp_path_factory):
    """digits_mlp trained twice with its seed and once with another seed."""
    out = tmp_path_factory.mktemp("trained")
    first = train_model(digits_card, out_dir=out / "a", progress=False)
    second = train_model(digits_card, out_dir=out / "b", progress=False)
    other = train_model(digits_card, out_dir=out / "c", seed=digits_card.training.seed + 1, progress=False)
    return first, second, other


# --------------------------------------------------------------------------- split


@pytest.mark.parametrize("dataset,card_name", [("digits", "digits_mlp"), ("mnist", "mnist_cnn")])
def test_zoo_split_equals_evaluators_split(registry, dataset, card_name):
    card = registry.get(card_name)
    pre = card.preprocessing
    arrays = load_arrays(dataset)
    for split in ("train", "test"):
        x, y = load_split(dataset, split, mean=pre.mean, std=pre.std, arrays=arrays)
        ds = build_dataset(dataset, split, root=None, preprocessing=Preprocessing(**pre.as_kwargs()))
        assert np.array_equal(split_indices(dataset, split), ds.indices)
        assert x.dtype == ds.images.dtype == torch.float32
        assert torch.equal(x, ds.images), f"{dataset}/{split} images differ"
        assert y.tolist() == ds.labels
    n_train = {"digits": 1437, "mnist": 4000}[dataset]
    assert len(split_indices(dataset, "train")) == n_train
    # evaluators' default preprocessing is the card's
    default = build_dataset(dataset, "test", root=None, preprocessing=None)
    x, _ = load_split(dataset, "test", mean=pre.mean, std=pre.std, arrays=arrays)
    assert torch.equal(x, default.images)


def test_split_rejects_unknown_names():
    with pytest.raises(ValueError, match="split"):
        split_indices("digits", "calibration")
    with pytest.raises(ValueError, match="quantzoo train supports"):
        split_indices("imagenet_sample", "train")


# --------------------------------------------------------------------------- training


def test_same_seed_same_sha_different_seed_different_sha(trained, digits_card):
    first, second, other = trained
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()
    assert other.sha256 != first.sha256
    for result in trained:
        assert result.path.name == f"digits_mlp-{result.sha256[:8]}.safetensors"
        assert result.path.is_file() and result.seconds > 0 and result.num_train == 1437
    assert not list(first.path.parent.glob(".*"))  # no temp file left behind


def test_trained_file_metadata_and_state(trained, digits_card):
    from safetensors import safe_open

    with safe_open(str(trained[0].path), "pt") as fh:
        meta = json.loads(fh.metadata()[METADATA_KEY])
    assert meta["seed"] == digits_card.training.seed and meta["epochs"] == digits_card.training.epochs
    assert meta["torch"] == torch.__version__ and meta["model"] == "digits_mlp"


def test_trained_digits_mlp_reaches_90_percent_via_evaluators(trained, digits_card):
    result = trained[0]
    card = digits_card.with_weights(sha256=result.sha256, filename=result.path.name, path=None,
                                    url=f"https://example.invalid/weights/digits_mlp/{result.path.name}")
    model = builder.build_architecture(card)
    builder.load_weights(model, card, result.path)
    ds = build_dataset("digits", "test", root=None, preprocessing=Preprocessing(**card.preprocessing.as_kwargs()))
    metrics = evaluate_classification(TorchBackend(model.eval()), ds, batch_size=128)
    assert metrics.num_samples == 360
    assert metrics.top1 >= 90.0  # percent
    assert abs(metrics.top1 - result.top1_test) < 1e-6


def test_training_restores_global_torch_state(digits_card, tmp_path):
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(1234)
    expected_next = torch.rand(1)
    torch.manual_seed(1234)
    quick = dataclasses.replace(digits_card, training=dataclasses.replace(digits_card.training, epochs=1))
    train_model(quick, out_dir=tmp_path, progress=False)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det
    assert torch.equal(torch.rand(1), expected_next)


def test_default_out_dir_is_the_cache_resolve_weights_reads(digits_card, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTZOO_HOME", str(tmp_path / "home"))
    quick = dataclasses.replace(digits_card, training=dataclasses.replace(digits_card.training, epochs=2))
    result = train_model(quick, progress=False)
    assert result.path.parent == tmp_path / "home" / "weights" / "digits_mlp"
    hub_card = quick.with_weights(
        sha256=result.sha256, filename=result.path.name, path=None,
        url=f"{quick.hub_base_url}weights/digits_mlp/{result.path.name}",
    )
    assert builder.resolve_weights(hub_card, offline=True) == result.path
    assert result.matches_card is False  # the registered card has the full-recipe sha256


def test_cards_without_recipe_cannot_be_trained(registry, tmp_path):
    with pytest.raises(CardError, match="efficientnet_lite0: has no training recipe"):
        train_model(registry.get("efficientnet_lite0"), out_dir=tmp_path)
