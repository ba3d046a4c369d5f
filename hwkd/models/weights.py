"""State dicts from the user's files into architectures hwkd built: read with weights_only=True, checked
key by key, so a wrong architecture or head size is an error that names the keys, never a silent
partial load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwkd.errors import ModelError


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensor dict inside ``obj`` (a bare state dict, or {'state_dict'|'model'|...: ...}); else None."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel / DDP prefixes
    return None


def _few(keys: list[str], n: int = 4) -> str:
    return f"{keys[:n]}" + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def state_dict_problems(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Missing / unexpected keys and shape mismatches between ``state`` and ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    out = []
    if missing:
        out.append(f"missing keys {_few(missing)}")
    if unexpected:
        out.append(f"unexpected keys {_few(unexpected)}")
    if shapes:
        out.append("shape mismatches " + "; ".join(shapes[:3]) + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""))
    return out


def head_hint(model: nn.Module, state: dict[str, torch.Tensor], num_classes: int) -> str | None:
    """If only the classifier's size differs, say so: the file was trained for another number of classes."""
    from hwkd.models.loaders import find_head

    head = find_head(model)
    names = {m: n for n, m in model.named_modules()}
    key = f"{names.get(head, '')}.weight".lstrip(".")
    if key in state and state[key].ndim >= 1 and state[key].shape[0] != num_classes:
        return (
            f"Its classifier {key!r} has {state[key].shape[0]} outputs but the data has {num_classes} "
            f"classes: pass the data the model was trained on, or replace the head and fine-tune it first."
        )
    return None


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Read a state dict with ``torch.load(weights_only=True)``; anything else is a ModelError."""
    from hwkd.artifacts import torch_load

    obj = torch_load(path, what)
    state = unwrap_state_dict(obj)
    if state is None:
        raise ModelError(
            f"The {what} file {str(path)!r} does not hold a state dict (found {type(obj).__name__}).",
            "Save it with torch.save(model.state_dict(), PATH), or as {'state_dict': ...}.",
        )
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, where: str, arch: str, num_classes: int,
                 hint: str | None = None) -> nn.Module:  # fmt: skip
    """Load ``state`` into ``model`` strictly; a mismatch names the keys and, if it is the head, the classes."""
    problems = state_dict_problems(model, state)
    if problems:
        fix = head_hint(model, state, num_classes) if not any(p.startswith(("missing", "unexpected")) for p in problems) else None
        raise ModelError(
            f"The state dict {where!r} does not fit the {arch!r} architecture: {'; '.join(problems)}.",
            fix or hint or f"Pass the architecture it was trained as, and check the number of classes ({num_classes}) "
            "and input channels of the data.",
        )
    model.load_state_dict(state, strict=True)
    return model
