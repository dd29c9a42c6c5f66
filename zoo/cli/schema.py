"""Structured-config schemas for recipes, registered in Hydra's ConfigStore.

A recipe composes these groups; because the schema is a dataclass, a misspelt key or a wrong
type fails at compose time with a message naming the key.

Top-level settings of :class:`RunConf` besides the groups:

* ``recipe``: the recipe name (``w8a8_per_channel``, ...); ``seed``: the torch seed;
* ``results_dir`` / ``artifacts_dir``: where run records and exported files go;
* ``checkpoint``: where the quantized model comes from.
    - ``null`` (default): calibrate the simulated model on the calibration split, as usual;
    - ``download``: fetch the recipe's published artifacts (integer-weight safetensors,
      encodings JSON, ONNX) with ``quantzoo download``'s rules: the sha256 listed on the model
      card (else in the published manifest), the cache, ``QUANTZOO_MIRROR`` and
      ``QUANTZOO_OFFLINE``;
    - a path: a folder written by ``quantzoo publish`` (its ``--to`` root or the
      ``<model>/<recipe>`` folder inside it) or that folder's ``manifest.json`` (a folder that is
      literally called ``download`` is written ``./download``).
  With a source set, the run loads the published checkpoint into the simulated model instead of
  calibrating, evaluates the published ONNX file in ONNX Runtime, and records both stages it
  skipped (``calibrate``, ``export``) and the artifacts' sha256.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from .schema_compress import CompressConf
from .schema_qat import QatConf


@dataclass
class ModelConf:
    name: str = MISSING  # a zoo model card name (quantzoo list)


@dataclass
class DataConf:
    name: str = MISSING  # evaluators dataset: imagenet_sample | imagefolder | mnist | digits
    root: Optional[str] = None
    calibration_split: str = "calibration"
    eval_split: str = "eval"
    num_calibration_samples: Optional[int] = None
    num_eval_samples: Optional[int] = None
    calibration_batch_size: int = 50
    seed: int = 0  # selects the calibration subset where the dataset draws one
    # searching steps also score on every calibration image mirrored left-right (image classifiers)
    score_mirrored: bool = False


@dataclass
class QuantConf:
    config: str = "per_channel"  # a quantlib preset name or a YAML path
    weight_bits: int = 8
    activation_bits: int = 8
    activation_observer: str = "minmax"
    weight_observer: str = "minmax"
    modules: list[Any] = field(default_factory=list)  # per-module glob overrides (quantlib config syntax)
    # null keeps quant.config's own; float: fast QDQ simulation; integer: mirror ONNX Runtime's int8 kernels
    arithmetic: Optional[str] = None


@dataclass
class PtqConf:
    # quantlib.ptq steps in order: a name or {name: ..., **settings}, e.g. [{name: bn_fold}, {name: cle}]
    steps: list[Any] = field(default_factory=list)


@dataclass
class EvaluatorConf:
    batch_size: int = 50
    num_workers: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    onnxruntime: bool = True
    progress: bool = True


@dataclass
class RunConf:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    quant: QuantConf = field(default_factory=QuantConf)
    ptq: PtqConf = field(default_factory=PtqConf)
    qat: QatConf = field(default_factory=QatConf)
    compress: CompressConf = field(default_factory=CompressConf)
    evaluator: EvaluatorConf = field(default_factory=EvaluatorConf)
    recipe: str = MISSING
    seed: int = 0
    results_dir: str = "results"
    artifacts_dir: str = "artifacts"
    checkpoint: Optional[str] = None  # null: calibrate | download | a published folder or manifest.json


def register_schemas() -> None:
    """Register the run schema (idempotent: ConfigStore overwrites by name).

    Recipes list ``/run_schema`` first in their defaults, so every group merged into it is
    validated against the typed fields above.
    """
    ConfigStore.instance().store(name="run_schema", node=RunConf)
