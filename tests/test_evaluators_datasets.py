"""Tests for evaluators.preprocessing and evaluators.datasets (fast, deterministic)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from evaluators import (
    DatasetRegistry,
    EvaluatorConfigError,
    Preprocessing,
    build_dataset,
    build_transform,
    list_datasets,
)
from evaluators.datasets.arrays import split_indices

IMAGENET_SAMPLE = Path(os.environ.get("QUANTZOO_DATA_DIR", "/work/shared/data")) / "imagenet-sample-1k"
PRE_224 = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture(scope="module")
def imagenet_root() -> Path:
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"{IMAGENET_SAMPLE} not found; set QUANTZOO_DATA_DIR to the folder holding imagenet-sample-1k")
    return IMAGENET_SAMPLE


def _imagenet(split: str, root, **kw):
    return build_dataset("imagenet_sample", split, root=str(root), preprocessing=PRE_224, **kw)


# --------------------------------------------------------------------------- preprocessing


def test_preprocessing_validates_fields():
    with pytest.raises(EvaluatorConfigError, match="preprocessing.mean"):
        Preprocessing(resize=256, crop=224, mean=(0.5, 0.5), std=(0.5,) * 3)
    with pytest.raises(EvaluatorConfigError, match="preprocessing.interpolation"):
        Preprocessing(resize=256, crop=224, interpolation="lanczos", mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(EvaluatorConfigError, match="preprocessing.resize"):
        Preprocessing(resize=0, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(EvaluatorConfigError, match="preprocessing.in_chans"):
        Preprocessing(resize=None, crop=None, mean=(0.5,) * 2, std=(0.5,) * 2, in_chans=2)
    pre = Preprocessing(resize=None, crop=8, mean=[0.1], std=[0.2], in_chans=1)
    assert pre.mean == (0.1,) and pre.std == (0.2,)


def test_build_transform_matches_torchvision_reference():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8))
    reference = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    out = build_transform(PRE_224)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert torch.equal(out, reference(img))
    gray = build_transform(Preprocessing(resize=None, crop=None, mean=(0.0,), std=(1.0,), in_chans=1))(img)
    assert gray.shape == (1, 300, 400)


# --------------------------------------------------------------------------- imagenet_sample


def test_imagenet_sample_splits(imagenet_root):
    files = sorted(p.name for p in imagenet_root.iterdir() if p.suffix == ".JPEG")
    cal, ev = _imagenet("calibration", imagenet_root), _imagenet("eval", imagenet_root)
    assert (len(cal), len(ev)) == (250, 750)
    assert cal.sample_ids == files[::4]
    assert not set(cal.sample_ids) & set(ev.sample_ids)
    assert sorted(cal.sample_ids + ev.sample_ids) == files
    assert cal.num_classes == ev.num_classes == 1000
    assert cal.sample_ids[0] == "n01440764_tench.JPEG" and cal.labels[0] == 0
    assert ev.sample_ids[-1] == files[-1] and ev.labels[-1] == 999
    assert cal.class_names[0] == "tench"
    image, label = cal[0]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and label == 0


def test_imagenet_sample_num_samples_and_fingerprint_stable(imagenet_root):
    a, b = _imagenet("eval", imagenet_root), _imagenet("eval", imagenet_root)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != _imagenet("calibration", imagenet_root).fingerprint()
    first = _imagenet("eval", imagenet_root, num_samples=10)
    assert first.sample_ids == a.sample_ids[:10]
    with pytest.raises(EvaluatorConfigError, match="data.num_samples"):
        _imagenet("eval", imagenet_root, num_samples=751)


def test_imagenet_sample_fingerprint_changes_with_bytes(imagenet_root, tmp_path):
    for name in sorted(os.listdir(imagenet_root))[:8]:
        shutil.copyfile(imagenet_root / name, tmp_path / name)
    before = _imagenet("calibration", tmp_path)
    assert before.sample_ids == sorted(os.listdir(tmp_path))[::4]
    assert before.num_classes == 8 and before.labels == [0, 4]
    fp = before.fingerprint()
    target = tmp_path / before.sample_ids[1]
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    assert _imagenet("calibration", tmp_path).fingerprint() != fp


def test_imagenet_sample_missing_root_is_a_config_error(tmp_path, monkeypatch):
    with pytest.raises(EvaluatorConfigError, match="data.root") as err:
        build_dataset("imagenet_sample", "eval", root=str(tmp_path / "nope"), preprocessing=None)
    assert "QUANTZOO_DATA_DIR" in str(err.value)
    with pytest.raises(EvaluatorConfigError, match="holds no images"):
        build_dataset("imagenet_sample", "eval", root=str(tmp_path), preprocessing=None)
    monkeypatch.delenv("QUANTZOO_DATA_DIR", raising=False)
    with pytest.raises(EvaluatorConfigError, match="QUANTZOO_DATA_DIR"):
        build_dataset("imagenet_sample", "eval", root=None, preprocessing=None)
    monkeypatch.setenv("QUANTZOO_DATA_DIR", str(tmp_path))
    with pytest.raises(EvaluatorConfigError, match="data.root"):
        build_dataset("imagenet_sample", "eval", root=None, preprocessing=None)


# --------------------------------------------------------------------------- imagefolder


def _write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (value, value, value)).save(path)


def test_imagefolder_layout_and_shared_class_ids(tmp_path):
    for split_dir, cls, n in [("train", "cat", 2), ("train", "dog", 1), ("val", "ant", 1), ("val", "dog", 2)]:
        for i in range(n):
            _write_png(tmp_path / split_dir / cls / f"{i}.png", 40 * i)
    pre = Preprocessing(resize=8, crop=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    cal = build_dataset("imagefolder", "calibration", root=str(tmp_path), preprocessing=pre)
    ev = build_dataset("imagefolder", "eval", root=str(tmp_path), preprocessing=pre)
    assert cal.class_names == ev.class_names == ["ant", "cat", "dog"]
    assert cal.sample_ids == ["train/cat/0.png", "train/cat/1.png", "train/dog/0.png"]
    assert cal.labels == [1, 1, 2] and ev.labels == [0, 2, 2]
    image, label = ev[1]
    assert image.shape == (3, 8, 8) and label == 2
    renamed = build_dataset(
        "imagefolder", "eval", root=str(tmp_path), preprocessing=pre, split_dirs={"eval": "train"}
    )
    assert renamed.sample_ids == cal.sample_ids
    with pytest.raises(EvaluatorConfigError, match="data.root"):
        build_dataset("imagefolder", "eval", root=str(tmp_path), preprocessing=pre, split_dirs={"eval": "test"})


# --------------------------------------------------------------------------- registry / errors


def test_unknown_name_split_or_option_lists_choices():
    assert list(list_datasets()) == ["digits", "imagefolder", "imagenet_sample", "mnist"]
    with pytest.raises(EvaluatorConfigError, match=r"data.name.*imagenet_sample"):
        build_dataset("cifar", "eval", root=None, preprocessing=None)
    with pytest.raises(EvaluatorConfigError, match=r"data.split.*calibration"):
        build_dataset("digits", "validation", root=None, preprocessing=None)
    with pytest.raises(EvaluatorConfigError, match="split_dirs"):
        build_dataset("digits", "eval", root=None, preprocessing=None, split_dirs={})


def test_registry_refuses_duplicates():
    registry = DatasetRegistry()
    registry.register("x", lambda split, **kw: None, ("eval",))
    with pytest.raises(ValueError, match="already registered"):
        registry.register("x", lambda split, **kw: None, ("eval",))


# --------------------------------------------------------------------------- mnist / digits
# Loading mnist parses a CSV (~3 s), so each split is built once per module.

ARRAY_CASES = {"mnist": (4000, 1000, (1, 28, 28)), "digits": (1437, 360, (1, 8, 8))}


@pytest.fixture(scope="module", params=sorted(ARRAY_CASES))
def array_splits(request):
    name = request.param
    splits = {s: build_dataset(name, s, root=None, preprocessing=None) for s in ("train", "test", "calibration")}
    return name, splits


def _indices(name: str, split: str, **kw) -> list[str]:
    n_train, n_test, _ = ARRAY_CASES[name]
    kw.setdefault("num_samples", None)
    kw.setdefault("seed", 0)
    return [f"{name}:{i}" for i in split_indices(n_train + n_test, n_train, split, kind=name, **kw)]


def test_array_split_sizes_and_disjointness(array_splits):
    name, ds = array_splits
    n_train, n_test, shape = ARRAY_CASES[name]
    assert (len(ds["train"]), len(ds["test"]), len(ds["calibration"])) == (n_train, n_test, 512)
    assert not set(ds["train"].sample_ids) & set(ds["test"].sample_ids)
    assert len(set(ds["train"].sample_ids) | set(ds["test"].sample_ids)) == n_train + n_test
    assert set(ds["calibration"].sample_ids) <= set(ds["train"].sample_ids)
    cal_idx = [int(s.split(":")[1]) for s in ds["calibration"].sample_ids]
    assert cal_idx == sorted(cal_idx) and ds["calibration"].sample_ids[0].startswith(f"{name}:")
    image, label = ds["test"][0]
    assert image.shape == shape and image.dtype == torch.float32 and isinstance(label, int)
    assert ds["train"].num_classes == 10
    assert sorted(set(ds["test"].labels)) == list(range(10))
    # the split is fixed (rng 0), whatever the seed: eval is test
    assert _indices(name, "eval", seed=5) == _indices(name, "test") == ds["test"].sample_ids


def test_array_default_normalization(array_splits):
    name, ds = array_splits
    mean, std = {"mnist": (0.1307, 0.3081), "digits": (0.5, 0.5)}[name]
    pixels = ds["test"].images * std + mean
    assert float(pixels.min()) == pytest.approx(0.0, abs=1e-5)
    assert float(pixels.max()) == pytest.approx(1.0, abs=1e-5)


def test_array_calibration_is_deterministic_and_seeded(array_splits):
    name, ds = array_splits
    again = build_dataset(name, "calibration", root=None, preprocessing=None)
    assert again.sample_ids == ds["calibration"].sample_ids
    assert again.fingerprint() == ds["calibration"].fingerprint()
    other = build_dataset(name, "calibration", root=None, preprocessing=None, seed=1)
    assert set(other.sample_ids) <= set(ds["train"].sample_ids)
    assert len(other) == 512 and set(other.sample_ids) != set(ds["calibration"].sample_ids)
    assert other.fingerprint() != ds["calibration"].fingerprint()
    small = _indices(name, "calibration", seed=1, num_samples=100)
    assert len(small) == 100 and set(small) <= set(ds["train"].sample_ids)


def test_array_num_samples(array_splits):
    name, ds = array_splits
    n_train, n_test, _ = ARRAY_CASES[name]
    assert _indices(name, "eval", num_samples=7) == ds["test"].sample_ids[:7]
    if name == "digits":  # cheap to load: check the built dataset too
        head = build_dataset(name, "eval", root=None, preprocessing=None, num_samples=7)
        assert head.sample_ids == ds["test"].sample_ids[:7]
        assert torch.equal(head.images, ds["test"].images[:7])
    with pytest.raises(EvaluatorConfigError, match="data.num_samples"):
        build_dataset(name, "eval", root=None, preprocessing=None, num_samples=n_test + 1)
    with pytest.raises(EvaluatorConfigError, match="data.num_samples"):
        build_dataset(name, "calibration", root=None, preprocessing=None, num_samples=n_train + 1)
    with pytest.raises(EvaluatorConfigError, match="preprocessing.in_chans"):
        build_dataset(name, "eval", root=None, preprocessing=PRE_224)


def test_with_mirrored_appends_every_image_flipped_with_its_label():
    import torch

    from evaluators.datasets.mirrored import with_mirrored

    images = torch.arange(3 * 1 * 2 * 3, dtype=torch.float32).reshape(3, 1, 2, 3)
    base = list(zip(images, [4, 5, 6]))
    doubled = with_mirrored(base)
    assert len(doubled) == 6
    for i in range(3):
        assert torch.equal(doubled[i][0], images[i]) and doubled[i][1] == base[i][1]
        assert torch.equal(doubled[3 + i][0], images[i].flip(-1)) and doubled[3 + i][1] == base[i][1]
