"""The QAT stage of ``quantzoo run``: train the calibrated QuantSim on the calibration split.

:func:`run_qat` is called by :func:`zoo.cli.run.execute` after calibration and the PTQ steps when
``qat.enabled`` is true (settings: :class:`zoo.cli.schema_qat.QatConf`). It

1. builds the training batches from the calibration split (never the eval split), decoded once
   into memory with ``qat.cache_data`` and shuffled per epoch by ``(qat.seed, epoch)``;
2. swaps in learnable quantizer ranges when ``qat.learn_ranges`` asks (LSQ,
   :mod:`quantlib.qat.range_learning`);
3. trains ``sim.model`` in place with :func:`quantlib.qat.train` (task loss, distillation from the
   FP32 teacher, or both; checkpoints in ``qat.checkpoint_dir``, resumed with ``qat.resume``;
   torchrun-launched processes train together with DDP), re-applying sparsity/cluster structure
   after every step when ``qat.preserve`` lists it;
4. swaps plain quantizers back with the learned encodings, so the sim exports exactly as after
   PTQ, and re-estimates the running statistics of BNs QuantSim did not fold if
   ``qat.reestimate_bn``;
5. writes ``qat_metrics.jsonl`` (one JSON line per epoch) and ``qat_curves.png`` into the run's
   record folder (rank 0 only),

and returns the JSON-able summary that goes into the run record under ``"qat"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlib.ptq.bn_reestimation import batch_norms, reestimate_bn_stats
from quantlib.qat import TrainConfig, TrainConfigError, disable_range_learning, enable_range_learning, train
from quantlib.qat.checkpointing import CheckpointError
from quantlib.qat.curves import plot_training_curves
from quantlib.qat.data import cached, training_loader
from quantlib.qat.distributed import is_primary_process
from quantlib.quantsim import QuantSim

from .errors import RunConfigError
from .schema_qat import LEARN_RANGES

__all__ = ["METRICS_LOG", "CURVES_PNG", "qat_train_config", "run_qat"]

METRICS_LOG = "qat_metrics.jsonl"
CURVES_PNG = "qat_curves.png"
_TRAIN_FIELDS = tuple(TrainConfig.__dataclass_fields__)
_PRESERVE_KINDS = ("sparsity", "clusters")


def qat_train_config(qat: dict[str, Any]) -> TrainConfig:
    """The :class:`~quantlib.qat.TrainConfig` of the recipe's ``qat`` group; a bad value is a RunConfigError naming ``qat.<field>``."""
    try:
        return TrainConfig(**{name: qat[name] for name in _TRAIN_FIELDS if name in qat})
    except TrainConfigError as err:
        raise RunConfigError(f"qat.{err}") from None


def _check_stage_settings(qat: dict[str, Any]) -> None:
    if qat["learn_ranges"] not in LEARN_RANGES:
        raise RunConfigError(f"qat.learn_ranges={qat['learn_ranges']!r} is not supported; use one of {', '.join(LEARN_RANGES)}")
    unknown = sorted(set(qat["preserve"]) - set(_PRESERVE_KINDS))
    if unknown:
        raise RunConfigError(f"qat.preserve lists {unknown[0]!r}; use a subset of {list(_PRESERVE_KINDS)}")
    if qat["batch_size"] < 1:
        raise RunConfigError(f"qat.batch_size={qat['batch_size']} must be >= 1")


def _step_hooks(model: nn.Module, preserve: list[str]) -> list:
    if not preserve:
        return []
    from quantlib.compress.preserve import structure_preserver  # only runs that keep compression structure need it

    return [structure_preserver(model, preserve)]


def run_qat(sim: QuantSim, fp32_teacher: nn.Module, resolved: dict[str, Any], calibration: torch.utils.data.Dataset,
            record_dir: Path, device: torch.device, progress: bool) -> dict[str, Any]:
    """Train ``sim.model`` in place as ``resolved["qat"]`` says; returns the record's ``qat`` summary.

    Args:
        sim: the calibrated QuantSim (mutated: weights, encodings; it stays exportable).
        fp32_teacher: the FP32 model distillation follows (not changed; moved to the device).
        resolved: the resolved recipe (``qat`` group, ``recipe``, ``model.name``).
        calibration: the calibration split, the only data QAT reads.
        record_dir: folder next to the run record for the metrics log and the curve PNG.
        device: the training device (``cuda:LOCAL_RANK`` per rank under torchrun with CUDA).
        progress: show a tqdm bar per epoch.

    Raises RunConfigError naming the ``qat.*`` setting for bad settings or an unusable checkpoint.
    """
    qat = resolved["qat"]
    config = qat_train_config(qat)
    _check_stage_settings(qat)
    dataset = cached(calibration) if qat["cache_data"] else calibration
    loader = training_loader(dataset, qat["batch_size"], seed=qat["seed"], shuffle=qat["shuffle"])
    learn = qat["learn_ranges"]
    learned = [] if learn == "none" else enable_range_learning(
        sim.model, weights=learn in ("weights", "all"), activations=learn in ("activations", "all"),
        learn_offset=qat["learn_offset"], grad_scale=qat["lsq_grad_scale"], log_scale=qat["learn_log_scale"])
    primary = is_primary_process()
    record_dir = Path(record_dir)
    try:
        report = train(sim.model, loader, config, teacher=fp32_teacher if config.uses_teacher else None,
                       checkpoint_dir=qat["checkpoint_dir"], resume=qat["resume"],
                       step_hooks=_step_hooks(sim.model, list(qat["preserve"])), progress=progress, device=device,
                       metrics_log=record_dir / METRICS_LOG if primary else None)
    except CheckpointError as err:
        raise RunConfigError(f"qat.resume=true: {err}") from None
    finally:
        disable_range_learning(sim.model)
    unfolded = len(batch_norms(sim.model))
    bn_batches = 0
    if qat["reestimate_bn"] and unfolded:
        bn_batches = reestimate_bn_stats(sim.model, training_loader(dataset, qat["batch_size"], shuffle=False),
                                         progress=progress)
    files: dict[str, str] = {}
    if primary:
        files["metrics_log"] = str(record_dir / METRICS_LOG)
        files["curves_png"] = str(plot_training_curves(
            report.history, record_dir / CURVES_PNG,
            title=f"QAT {resolved['model']['name']}/{resolved['recipe']}: loss {config.loss}, {len(report.history)} epochs"))
    summary = report.to_dict()
    summary.update(
        train_samples=len(dataset), batch_size=qat["batch_size"], learned_ranges=len(learned),
        learn_ranges=learn, preserve=list(qat["preserve"]),
        batch_norm={"mode": config.batch_norm, "folded": len(sim.folded_batch_norms), "unfolded": unfolded,
                    "reestimated_batches": bn_batches},
        final=report.history[-1] if report.history else None, **files,
    )
    return summary
