"""The README's "Adding a model" example works as written.

The test takes the card (Python) and recipe (YAML) blocks out of README.md, fills in the one
placeholder the README asks the user to fill (the weights' sha256), and follows the steps: the
card goes into a new module of ``zoo.models`` (a temporary folder added to the package path),
the YAML files into a copy of the ``recipes`` package, the weights onto a local HTTP server
standing in for ``https://my.server/weights/`` (through ``QUANTZOO_MIRROR``), and then
``quantzoo run my_net/w8a8_per_channel`` runs on a small synthetic ImageNet-style folder.
The default test swaps the timm architecture for timm's tiny ``test_resnet`` (the README's
``mobilenetv3_small_100`` takes ~30 s to export); the slow test runs the README verbatim.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hub_server import ArtifactServer
import zoo.models
from zoo.builder import build_architecture
from zoo.hub import sha256_file

README = Path(__file__).resolve().parents[1] / "README.md"
README_ARCH = 'name="mobilenetv3_small_100"'
TINY_ARCH = 'name="test_resnet"'
SHA_LINE = re.compile(r'^_SHA256 = "[^"]*"', re.M)
STANDARD_RECIPES = ("w8a8_per_tensor", "w8a8_per_channel", "w4a8", "w8a16")


def readme_example() -> dict[str, str]:
    """The pieces of the README's "Adding a model" section a user copies."""
    text = README.read_text()
    start = text.index("## Adding a model")
    section = text[start:text.index("\n## ", start + 3)]
    blocks = re.findall(r"^ *```(\w+)\n(.*?)^ *```", section, re.M | re.S)
    python = [textwrap.dedent(body) for lang, body in blocks if lang == "python"]
    yaml = [textwrap.dedent(body) for lang, body in blocks if lang == "yaml"]
    assert len(python) == 1 and len(yaml) == 1, "the section should hold one card block and one recipe block"
    module = re.search(r"module `zoo/models/(\w+)\.py`", section)
    model_yaml = re.search(r"`recipes/model/(\w+)\.yaml` \(`([^`]+)`\)", section)
    recipe_file = re.search(r"`recipes/(\w+)/(\w+)\.yaml`:", section)
    command = re.search(r"`quantzoo run (\w+/\w+)`", section)
    assert module and model_yaml and recipe_file and command, "the README section lost a step"
    return {"card": python[0], "recipe_yaml": yaml[0], "module": module.group(1),
            "model": model_yaml.group(1), "model_yaml": model_yaml.group(2) + "\n",
            "recipe_model": recipe_file.group(1), "recipe": recipe_file.group(2), "command": command.group(1)}


def _card_from(source: str, sha256: str):
    namespace: dict = {}
    exec(compile(SHA_LINE.sub(f'_SHA256 = "{sha256}"', source), "<README card>", "exec"), namespace)  # noqa: S102
    (card,) = namespace["CARDS"]
    return card


def _synthetic_imagenet_sample(root: Path, count: int = 8) -> Path:
    """``count`` noise JPEGs named ``<wnid>_<name>.JPEG``: calibration gets i % 4 == 0, eval the rest."""
    folder = root / "imagenet-sample-1k"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"n{i:08d}_class{i}.JPEG", quality=90)
    return root


def test_readme_example_is_complete():
    example = readme_example()
    assert example["module"] == example["model"] == example["recipe_model"] == "my_net"
    assert example["command"] == f"{example['model']}/{example['recipe']}"
    assert len(SHA_LINE.findall(example["card"])) == 1, "the card should have one _SHA256 placeholder line"
    assert example["card"].count(README_ARCH) == 1
    # as printed, the placeholder is not a sha256: the card refuses it, naming the field
    with pytest.raises(ValueError, match="sha256"):
        exec(compile(example["card"], "<README card>", "exec"), {})  # noqa: S102


def _follow_readme(tmp_path: Path, monkeypatch, capsys, architecture: str) -> dict:
    example = readme_example()
    source = example["card"].replace(README_ARCH, architecture)

    # step 1: weights of the card's architecture on a server, named <name>-<sha8>.safetensors
    torch.manual_seed(0)
    net = build_architecture(_card_from(source, "0" * 64))
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    sha256 = sha256_file(weights)
    card = _card_from(source, sha256)
    assert card.weights.filename == f"my_net-{sha256[:8]}.safetensors"

    # step 2: the card in a new module of zoo.models
    models = tmp_path / "models"
    models.mkdir()
    (models / f"{example['module']}.py").write_text(SHA_LINE.sub(f'_SHA256 = "{sha256}"', source))
    monkeypatch.setattr(zoo.models, "__path__", [*zoo.models.__path__, str(models)])

    # step 3: the model YAML and the recipe files, in a copy of the recipes package
    import recipes

    packages = tmp_path / "packages"
    copied = shutil.copytree(Path(recipes.__file__).parent, packages / "recipes",
                             ignore=shutil.ignore_patterns("__pycache__"))
    (copied / "model" / f"{example['model']}.yaml").write_text(example["model_yaml"])
    (copied / example["model"]).mkdir()
    for name in STANDARD_RECIPES:  # "their files differ only in the /quant: line and recipe:"
        text = example["recipe_yaml"].replace(f"/quant: {example['recipe']}", f"/quant: {name}")
        (copied / example["model"] / f"{name}.yaml").write_text(text.replace(f"recipe: {example['recipe']}", f"recipe: {name}"))
    assert (copied / example["model"] / f"{example['recipe']}.yaml").read_text() == example["recipe_yaml"]
    for key in [k for k in sys.modules if k == "recipes" or k.startswith("recipes.")]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.syspath_prepend(str(packages))
    assert Path(importlib.import_module("recipes").__file__).parent == copied

    # step 4: quantzoo run, with QUANTZOO_DATA_DIR set and QUANTZOO_MIRROR standing in for my.server
    monkeypatch.setenv("QUANTZOO_DATA_DIR", str(_synthetic_imagenet_sample(tmp_path / "data")))
    monkeypatch.setenv("QUANTZOO_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    from zoo.cli import main

    with ArtifactServer(files={f"/{card.weights.filename}": weights.read_bytes()}) as server:
        monkeypatch.setenv("QUANTZOO_MIRROR", server.url)
        try:
            assert main(["list", "my_*"]) == 0
            listed = capsys.readouterr().out
            main(["run", example["command"], "hydra.run.dir=.", "evaluator.progress=false"])
        finally:
            sys.modules.pop(f"zoo.models.{example['module']}", None)
    assert server.requests == [(f"/{card.weights.filename}", None)]
    assert "my_net" in listed and all(name in listed for name in STANDARD_RECIPES)
    assert "onnxruntime" in capsys.readouterr().out
    (record_path,) = (tmp_path / "results" / "runs").glob("my_net__w8a8_per_channel__*.json")
    record = json.loads(record_path.read_text())
    assert record["provenance"]["checkpoint_sha256"] == sha256
    return record


def _assert_ran(record: dict) -> None:
    for backend in ("fp32", "quantsim", "onnxruntime"):
        assert record["metrics"][backend]["num_samples"] == 6  # 8 images, i % 4 == 0 calibrate
    assert len(record["provenance"]["calibration_sample_ids"]) == 2
    assert 0 <= record["agreement"]["quantsim_vs_onnxruntime_top1"] <= 100
    assert record["quantsim"]["weight_quantizers"] > 0
    assert set(record["artifacts"]) == {"onnx", "encodings", "weights"}


def test_readme_example_runs_with_a_tiny_architecture(tmp_path, monkeypatch, capsys):
    _assert_ran(_follow_readme(tmp_path, monkeypatch, capsys, TINY_ARCH))


@pytest.mark.slow
def test_readme_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    record = _follow_readme(tmp_path, monkeypatch, capsys, README_ARCH)
    _assert_ran(record)
    assert record["provenance"]["config"]["model"]["name"] == "my_net"


def test_readme_module_is_gone_after_the_test():
    """The temporary card and recipes must not leak into what later tests see."""
    import recipes
    from zoo.cli import _recipes
    from zoo.registry import default_registry

    assert "my_net" not in default_registry() and "my_net" not in _recipes()
    assert Path(recipes.__file__).resolve().parent == README.parent / "recipes"
