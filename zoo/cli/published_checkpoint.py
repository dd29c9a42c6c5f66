"""Start a run from published artifacts: check they fit the recipe, then load them into a QuantSim.

Used by ``quantzoo run ... checkpoint=download|PATH`` (:mod:`zoo.cli.run`). The published manifest
must name the same model, recipe, ``quant``/``ptq``/``compress`` settings and FP32 weights; the
encodings' quantizer specs must equal the ones the recipe builds; and after loading the integer
weights the QuantSim's encodings must equal the published encodings file.
"""

from __future__ import annotations

import json
from typing import Any

from quantlib.checkpoint import load_quantized_state_dict
from quantlib.quantsim import QuantSim
from zoo.builder import weights_sha256
from zoo.card import ModelCard

from .distribution import PublishedArtifacts
from .errors import RunConfigError

__all__ = ["check_published_recipe", "load_published_checkpoint"]

# (quantizer kind, spec field) -> the recipe setting that decides it; other fields come from quant.config
_SPEC_SETTINGS = {("weight", "bitwidth"): "quant.weight_bits", ("weight", "observer"): "quant.weight_observer",
                  ("activation", "bitwidth"): "quant.activation_bits", ("activation", "observer"): "quant.activation_observer"}


def check_published_recipe(published: PublishedArtifacts, card: ModelCard, resolved: dict[str, Any]) -> None:
    """RunConfigError naming the first setting where the published manifest differs from this run.

    Checks model and recipe, every ``quant.*``, ``ptq.*`` and ``compress.*`` setting, and the FP32 weights the
    artifacts were made from. Without a manifest (card-listed artifacts) only the encodings check
    of :func:`load_published_checkpoint` applies.
    """
    manifest, source = published.manifest, resolved["checkpoint"]
    if manifest is None:
        return
    model, recipe = manifest.get("model"), manifest.get("recipe")
    if (model, recipe) != (card.name, resolved["recipe"]):
        raise RunConfigError(
            f"checkpoint={source} holds {model}/{recipe} artifacts but this run is {card.name}/{resolved['recipe']}; "
            f"run `quantzoo run {model}/{recipe} checkpoint={source}` or point checkpoint at {card.name}/{resolved['recipe']} artifacts")
    for group in ("quant", "ptq", "compress"):
        theirs, ours = manifest.get("config", {}).get(group), resolved[group]
        if theirs is None:
            continue  # manifests written before settings were recorded: the encodings check still applies
        for key in sorted(set(theirs) | set(ours)):
            if theirs.get(key) != ours.get(key):
                raise RunConfigError(
                    f"{group}.{key}={ours.get(key)!r} but checkpoint={source} was published with "
                    f"{group}.{key}={theirs.get(key)!r}; drop the override or publish a run made with it")
    fp32 = manifest.get("fp32_sha256")
    if fp32 is not None and fp32 != weights_sha256(card):
        raise RunConfigError(
            f"checkpoint={source} was made from FP32 weights sha256 {fp32} but model card {card.name} has "
            f"weights.sha256 {weights_sha256(card)}; publish a run made with this card's weights")


def _canonical(data: Any) -> Any:
    return json.loads(json.dumps(data, sort_keys=True))


def load_published_checkpoint(sim: QuantSim, published: PublishedArtifacts, source: str) -> None:
    """Install the published integer weights and encodings into ``sim`` (mutated) instead of calibrating.

    First every quantizer's spec in the encodings' ``quantizer_args`` must equal the one this
    recipe builds (else RunConfigError naming the ``quant.*`` setting); then the integer
    checkpoint is loaded (:func:`quantlib.checkpoint.load_quantized_state_dict`: weights rebuilt
    on their grid, bit for bit); last, the encodings ``sim`` now has must equal the published
    encodings file, so the two artifacts are proven to describe one model.
    """
    from safetensors import SafetensorError, safe_open

    path = published.paths["encodings"]
    try:
        encodings = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunConfigError(f"checkpoint={source}: {path.name} is not an encodings JSON file ({err})") from None
    published_args = encodings.get("quantizer_args") if isinstance(encodings, dict) else None
    if not isinstance(published_args, dict) or not all(isinstance(v, dict) for v in published_args.values()):
        raise RunConfigError(f"checkpoint={source}: {path.name} has no quantizer_args table; it was not written by quantlib's save_encodings")
    params = set(sim.param_quantizers())
    for name, quantizer in sim.quantizers().items():
        if name not in published_args:
            raise RunConfigError(
                f"checkpoint={source} has no quantizer {name!r}; the artifacts were published for another model or quant.config")
        ours, theirs = _canonical(quantizer.spec.to_dict()), published_args[name]
        for key in ours:
            if ours[key] != theirs.get(key):
                setting = _SPEC_SETTINGS.get(("weight" if name in params else "activation", key), "quant.config")
                raise RunConfigError(
                    f"{setting} gives quantizer {name} {key}={ours[key]!r} but checkpoint={source} was published with "
                    f"{key}={theirs.get(key)!r}; set {setting} to match the artifacts or use their recipe")
    extra = sorted(set(published_args) - set(sim.quantizers()))
    if extra:
        raise RunConfigError(
            f"checkpoint={source} quantizes {extra[0]!r}, which this model does not have; the artifacts were published for another model or quant.config")
    weights = published.paths["weights"]
    try:
        with safe_open(str(weights), "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        load_quantized_state_dict(sim, tensors, metadata)
    except (SafetensorError, KeyError, ValueError, RuntimeError) as err:
        raise RunConfigError(f"checkpoint={source}: {weights.name} does not load into this model: {err}") from None
    if _canonical(sim.encodings()) != _canonical(encodings):
        raise RunConfigError(
            f"checkpoint={source}: {weights.name} and {path.name} give different encodings; they are not from one run, publish them again")


