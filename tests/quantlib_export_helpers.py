"""Shared by the quantlib.export tests: exporting a calibrated QuantSim and running it in ONNX Runtime.

The reference for every ORT comparison is the simulated torch output of the same QuantSim; the
tolerance is ONE step of the quantizer that produces the model output (``tolerance``).
``exported`` caches one export per name for the whole session (exports take ~1 s).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from quantlib.config import load_config
from quantlib.export import export
from quantlib.quantsim import QuantSim

from quantlib_quantsim_helpers import ResBlockNet, build, randn


def prepare(model: nn.Module, shape: tuple[int, ...], config) -> QuantSim:
    sim = QuantSim(model, randn(*shape, seed=1), config)
    sim.calibrate([randn(*shape, seed=s) for s in (1, 2, 3)], progress=False)
    return sim


def output_quantizer_scale(sim: QuantSim) -> float:
    """Scale of the activation quantizer whose output is the model output (through data movement)."""
    output = next(n for n in sim.model.graph.nodes if n.op == "output")
    node = output.args[0]
    while not str(node.target).startswith("activation_quantizers."):
        node = node.args[0]
    quantizer = sim.activation_quantizers()[str(node.target).split(".", 1)[1]]
    assert quantizer.scale.numel() == 1
    return quantizer.scale.item()


def tolerance(step: float, ref: np.ndarray) -> float:
    """One output step, plus the float32 rounding of (q - zero_point) * scale at the output's magnitude."""
    return step + 4 * float(np.finfo(np.float32).eps) * float(np.abs(ref).max())


def session(path, disabled_optimizers=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    kwargs = {"disabled_optimizers": disabled_optimizers} if disabled_optimizers else {}
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], **kwargs)


def run_ort(path, x: torch.Tensor, **kwargs) -> np.ndarray:
    return session(path, **kwargs).run(None, {"input": x.numpy()})[0]


def simulate(sim: QuantSim, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return sim.model(x).numpy()


def initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


_EXPORT_CACHE: dict = {}


def exported(name: str, config, tmp_path_factory, cls=ResBlockNet, shape=(2, 3, 8, 8)):
    """(sim, onnx path, proto) of ``cls`` under ``config``; cached per name (exports take ~1 s)."""
    if name not in _EXPORT_CACHE:
        sim = prepare(build(cls), shape, config)
        directory = tmp_path_factory.mktemp(name)
        artifacts = export(sim, directory, name, randn(*shape, seed=1))
        _EXPORT_CACHE[name] = (sim, artifacts, onnx.load(str(artifacts.onnx)))
    return _EXPORT_CACHE[name]


CONFIGS = {
    "per_tensor": "per_tensor",
    "per_channel": "per_channel",
    "onnxruntime_cpu": "onnxruntime_cpu",
    "w4a8": load_config("per_channel").with_defaults(weight={"bitwidth": 4}),
    "w8a16": load_config("per_channel").with_defaults(activation={"bitwidth": 16}),
}
