"""Atomic artifact writes and (structure + weights) model checkpoints.

Every file hwkd writes goes through ``atomic_write``: a temp file in the same directory, fsync, then
``os.replace``. A crash leaves either the old file or none, never a half-written one that looks complete.

Pruned models no longer fit their class's constructor, and ``torch.load(weights_only=True)`` refuses
pickled modules, so a checkpoint stores how to rebuild the unpruned architecture (a ``ModelSpec``), the
channel attributes of every resized layer as plain ints, and the weights. Loading rebuilds, resizes,
then assigns the tensors.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hwkd.errors import ModelError

# Layer attributes torch-pruning changes; enough to rebuild conv / linear / norm layers after pruning.
_SHAPE_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "num_channels",
    "normalized_shape",
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync and rename it into place, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write bytes or text to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def save_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Let ``writer`` write to a temp path (e.g. torch.onnx, onnx.save), then rename atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, buf.getvalue())


def torch_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load`` with weights_only=True, turning missing/corrupt files into ModelError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"The {what} file {str(path)!r} does not exist.", "Check the path.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, wrong format, pickled classes
        raise ModelError(
            f"Could not read the {what} {str(path)!r} as a PyTorch weights file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}).",
            "Pass a state dict saved with torch.save(model.state_dict(), PATH), or a TorchScript file.",
        ) from exc


def model_structure(model) -> dict[str, dict[str, Any]]:
    """Channel attributes of every layer, as plain ints/lists (safe for weights_only loading)."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        attrs = {}
        for a in _SHAPE_ATTRS:
            if hasattr(mod, a):
                v = getattr(mod, a)
                if isinstance(v, int | tuple | list) and not isinstance(v, bool):
                    attrs[a] = list(v) if isinstance(v, tuple | list) else v
        if attrs:
            out[name] = attrs
    return out


def apply_structure(model, structure: dict[str, dict[str, Any]]) -> None:
    """Set the saved channel attributes on a freshly built (unpruned) model of the same architecture."""
    modules = dict(model.named_modules())
    for name, attrs in structure.items():
        if name not in modules:
            raise ModelError(f"Checkpoint layer {name!r} does not exist in the rebuilt architecture.")
        for a, v in attrs.items():
            setattr(modules[name], a, tuple(v) if isinstance(v, list) else v)


def save_model(path: str | os.PathLike, model, spec: dict[str, Any], extra: dict | None = None) -> Path:
    """Save a (possibly pruned) model as spec + structure + weights."""
    payload = {
        "format": "hwkd.model/1",
        "spec": spec,
        "structure": model_structure(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    return torch_save(path, payload)


def load_model(path: str | os.PathLike, build: Callable[[dict[str, Any]], Any]):
    """Load a checkpoint written by ``save_model``; ``build(spec)`` returns the unpruned model."""
    payload = torch_load(path, "hwkd model checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != "hwkd.model/1":
        raise ModelError(f"{str(path)!r} is not an hwkd model checkpoint.")
    model = build(payload["spec"])
    apply_structure(model, payload["structure"])
    assign_tensors(model, payload["state_dict"])
    return model, payload["spec"], payload.get("extra", {})


def assign_tensors(model, state_dict: dict[str, Any]) -> None:
    """Put every saved tensor in place, whatever its shape (pruned layers are smaller than built ones)."""
    import torch

    expected = set(model.state_dict())
    if set(state_dict) != expected:
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        raise ModelError(
            f"Checkpoint does not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})."
        )
    modules = dict(model.named_modules())
    for key, tensor in state_dict.items():
        owner, _, attr = key.rpartition(".")
        mod = modules[owner]
        if attr in mod._parameters:
            old = mod._parameters[attr]
            mod._parameters[attr] = torch.nn.Parameter(tensor.clone(), requires_grad=old.requires_grad)
        else:
            mod._buffers[attr] = tensor.clone()
