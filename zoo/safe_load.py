"""Safe checkpoint loading and saving: never unpickle arbitrary objects.

Contract
--------
* ``.safetensors`` files are read with ``safetensors.torch.load_file``.
* ``.pt`` / ``.pth`` / ``.bin`` files are read with
  ``torch.load(..., map_location="cpu", weights_only=True)``; a file that
  needs full pickle is refused with :class:`zoo.hub.HubError`.
* When a sha256 is given it is verified before any byte is parsed.
* Results are flat ``dict[str, torch.Tensor]`` on the CPU.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from zoo.hub import HubError, atomic_path, sha256_file, verify_file

__all__ = ["SUPPORTED_EXTENSIONS", "load_state_dict", "save_safetensors"]

SUPPORTED_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin")
_TORCH_EXTENSIONS = (".pt", ".pth", ".bin")
_WRAPPER_KEYS = ("state_dict", "model")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Return the tensor dict inside ``obj`` (itself, or under 'state_dict' / 'model')."""
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_tensor_dict(obj.get(key)):
                return dict(obj[key])
    raise HubError(
        f"{path} does not hold a state dict of tensors (got {type(obj).__name__}); "
        "save model.state_dict() or use save_safetensors()"
    )


def _reason(exc: Exception) -> str:
    """Return the one informative line of torch's long weights_only error."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "WeightsUnpickler error" in line:
            return line.split(" Please ")[0][:200]
    return (lines[0] if lines else type(exc).__name__)[:200]


def load_state_dict(path: Path | str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint as a CPU ``dict[str, Tensor]`` without unpickling code.

    Verifies ``sha256`` first when given (ChecksumMismatchError; the file is
    not removed). Unknown extensions raise ValueError; a torch file holding
    pickled objects beyond tensors/containers raises HubError; a dict wrapping
    the tensors under 'state_dict' or 'model' is unwrapped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"cannot load {path}: unsupported extension {path.suffix!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; download it first")
    if sha256 is not None:
        verify_file(path, sha256)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise HubError(
            f"{path} holds pickled objects that weights_only loading refuses, so it was "
            f"refused ({_reason(exc)}); re-save it as a plain state dict or .safetensors"
        ) from None
    return _unwrap(obj, path)


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: Path | str,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``tensors`` to ``path`` as safetensors atomically; return the file's sha256.

    Tensors are detached, moved to the CPU and made contiguous. ``metadata``
    must map str to str (ValueError otherwise). Tensors sharing storage are
    rejected by safetensors itself.
    """
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("metadata must map str to str; convert values with str() or json.dumps()")
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"save_safetensors needs dict[str, Tensor]; bad entries: {bad[:5]!r}")
    from safetensors.torch import save_file

    prepared = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(prepared, str(tmp), metadata=dict(metadata) if metadata is not None else None)
        digest = sha256_file(tmp)
    return digest
