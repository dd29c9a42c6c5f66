"""``quantzoo train``: reproduce a card's weights deterministically on the CPU.

:func:`train_model` trains a card that has a :class:`zoo.card.TrainingRecipe`
on its dataset's train split (read by :mod:`zoo.training_data`, the same
split as ``evaluators``), measures top-1 on the test split and writes
``<name>-<sha256[:8]>.safetensors`` atomically.

Procedure (fixed; the recipe holds the knobs):

* ``torch.manual_seed(seed)`` before building the network (initialisation);
  a separate ``torch.Generator`` seeded with ``seed`` draws the epoch
  permutations and the augmentation shifts; no DataLoader workers;
* ``torch.use_deterministic_algorithms(True)`` and one intra-op thread while
  training (both restored afterwards, as is the global RNG state);
* augmentation: a random integer shift of up to ``translate`` pixels in x and
  y with zero padding (in normalized space: padding with the normalized zero);
* the network and batches use the channels-last memory format (faster
  convolutions on the CPU; saved tensors are made contiguous again);
* loss: cross-entropy; optimizer: SGD (momentum 0.9, Nesterov) or AdamW, with
  ``weight_decay`` on every parameter; learning rate: linear warm-up over
  ``warmup_epochs`` then cosine decay to 0, updated every step; the last,
  possibly smaller, batch of an epoch is kept.

The same seed gives a byte-identical file (hence the same sha256) on the same
machine and torch build. The safetensors metadata holds one key,
``quantzoo.training`` (a JSON string with the model, seed, recipe, torch
version and test top-1): safetensors writes multiple metadata keys in a
random order, which would break byte reproducibility.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from zoo.builder import build_architecture, trained_weights_dir
from zoo.card import CardError, ModelCard
from zoo.safe_load import save_safetensors
from zoo.training_data import load_arrays, load_split

__all__ = ["METADATA_KEY", "TrainResult", "deterministic_cpu", "train_model"]

METADATA_KEY = "quantzoo.training"
_EVAL_BATCH = 500


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_model` produced.

    ``path``: the written file; ``sha256``: its sha256; ``top1_test``: test
    top-1 in percent; ``seconds``: wall time of the whole call;
    ``matches_card``: whether ``sha256`` equals the card's registered one.
    """

    path: Path
    sha256: str
    top1_test: float
    seconds: float
    card_name: str = ""
    matches_card: bool = False
    num_train: int = 0
    num_test: int = 0


@contextlib.contextmanager
def deterministic_cpu(threads: int = 1) -> Iterator[None]:
    """Deterministic algorithms, ``threads`` intra-op threads and a saved/restored global RNG."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_rng = torch.get_rng_state()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_rng_state(old_rng)


def _shift_batch(x: torch.Tensor, max_shift: int, fill: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift every image by its own random (dy, dx) in [-max_shift, max_shift], padding with ``fill``."""
    n, c, h, w = x.shape
    p = max_shift
    padded = fill.view(1, c, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
    padded[:, :, p : p + h, p : p + w] = x
    offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def _lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), _EVAL_BATCH):
        xb = x[start : start + _EVAL_BATCH].to(device).contiguous(memory_format=torch.channels_last)
        logits = model(xb)
        correct += int((logits.argmax(1).cpu() == y[start : start + _EVAL_BATCH]).sum())
    return 100.0 * correct / max(1, len(x))


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def train_model(
    card: ModelCard,
    *,
    out_dir: Path | str | None = None,
    seed: int | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> TrainResult:
    """Train ``card`` from scratch with its recipe; write ``<name>-<sha8>.safetensors``; return a :class:`TrainResult`.

    ``out_dir`` defaults to ``<cache>/weights/<name>/``, the folder
    :func:`zoo.builder.resolve_weights` reads, so a trained card is then found
    by ``quantzoo run``. ``seed`` overrides the recipe's seed. ``device`` other
    than ``"cpu"`` trains there (not bit-reproducible across devices).
    Raises :class:`zoo.card.CardError` when the card has no training recipe.
    """
    recipe = card.training
    if recipe is None:
        raise CardError(f"card {card.name}: has no training recipe; only cards with `training` can be trained")
    started = time.perf_counter()
    seed = recipe.seed if seed is None else int(seed)
    dev = torch.device(device)
    out = Path(out_dir) if out_dir is not None else trained_weights_dir(card)
    pre = card.preprocessing
    if pre.resize is not None or pre.crop is not None:
        raise CardError(f"card {card.name}: training supports only native-size inputs (no resize/crop)")

    arrays = load_arrays(card.dataset)
    x_train, y_train = load_split(card.dataset, "train", mean=pre.mean, std=pre.std, arrays=arrays)
    x_test, y_test = load_split(card.dataset, "test", mean=pre.mean, std=pre.std, arrays=arrays)
    if recipe.num_train_samples is not None:
        if recipe.num_train_samples > len(x_train):
            raise CardError(
                f"card {card.name}: training.num_train_samples={recipe.num_train_samples} exceeds "
                f"the {len(x_train)} train samples"
            )
        x_train, y_train = x_train[: recipe.num_train_samples], y_train[: recipe.num_train_samples]
    fill = torch.tensor([(0.0 - m) / s for m, s in zip(pre.mean, pre.std)], dtype=torch.float32)

    with deterministic_cpu(threads=1):
        torch.manual_seed(seed)
        model = build_architecture(card).to(dev, memory_format=torch.channels_last)
        generator = torch.Generator().manual_seed(seed)
        params = list(model.parameters())
        if recipe.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                params, lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        n = len(x_train)
        steps_per_epoch = math.ceil(n / recipe.batch_size)
        total = steps_per_epoch * recipe.epochs
        warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
        loss_fn = nn.CrossEntropyLoss()
        step = 0
        for epoch in range(recipe.epochs):
            model.train()
            order = torch.randperm(n, generator=generator)
            running, seen = 0.0, 0
            epoch_start = time.perf_counter()
            for start in range(0, n, recipe.batch_size):
                idx = order[start : start + recipe.batch_size]
                xb, yb = x_train[idx], y_train[idx]
                if recipe.translate:
                    xb = _shift_batch(xb, recipe.translate, fill, generator)
                lr = _lr_at(step, total, warmup, recipe.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                xb = xb.to(dev).contiguous(memory_format=torch.channels_last)
                loss = loss_fn(model(xb), yb.to(dev))
                loss.backward()
                optimizer.step()
                running += float(loss.detach()) * len(idx)
                seen += len(idx)
                step += 1
            _log(
                progress,
                f"[{card.name}] epoch {epoch + 1}/{recipe.epochs} loss {running / seen:.4f} "
                f"({time.perf_counter() - epoch_start:.1f}s)",
            )
        top1 = _top1(model, x_test, y_test, dev)
        _log(progress, f"[{card.name}] test top-1 {top1:.2f}% on {len(x_test)} samples")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    metadata = {
        METADATA_KEY: json.dumps(
            {
                "model": card.name,
                "seed": seed,
                "epochs": recipe.epochs,
                "recipe": recipe.to_dict(),
                "torch": torch.__version__,
                "device": dev.type,
                "top1_test": round(top1, 2),
            },
            sort_keys=True,
        )
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{card.name}.{secrets.token_hex(6)}.training.safetensors"
    try:
        sha256 = save_safetensors(state, tmp, metadata=metadata)
        final = out / f"{card.name}-{sha256[:8]}.safetensors"
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    _log(progress, f"[{card.name}] wrote {final} (sha256 {sha256}) in {seconds:.1f}s")
    return TrainResult(
        path=final,
        sha256=sha256,
        top1_test=top1,
        seconds=seconds,
        card_name=card.name,
        matches_card=sha256 == card.weights.sha256,
        num_train=len(x_train),
        num_test=len(x_test),
    )
