"""Where models come from: the zoo, user factories (``pkg.mod:fn``), state dicts and TorchScript files.

Every loaded or built model comes with a *spec*, a small JSON-able dict that says how to rebuild its
unpruned architecture (``hwkd.artifacts.save_model`` stores it beside the pruned channel structure):

- ``{"kind": "zoo", "name": "resnet", "kwargs": {"num_classes": 10, "in_channels": 1, "width": 1.0}}``
- ``{"kind": "factory", "ref": "pkg.mod:fn", "kwargs": {}}`` (runs user code: needs ``--trust-code``)
- ``{"kind": "torchscript", "path": "/abs/teacher.ts"}`` (usable as a teacher, not rebuildable)
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwkd.errors import ModelError
from hwkd.models.zoo import DEFAULT_STUDENT, ZOO

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_WIDTH_RE = re.compile(r"^\s*(\d*\.?\d+)\s*[xX]?\s*$")
_TRUST_FIX = "Loading a model from Python code runs that code; pass --trust-code if you trust {ref!r}."


def _zoo_list() -> str:
    return ", ".join(ZOO.names())


def is_factory_ref(source: str) -> bool:
    """True for ``pkg.mod:fn`` strings that are not an existing path."""
    return bool(_FACTORY_RE.match(source)) and not Path(source).exists()


def zoo_spec(name: str, num_classes: int, in_channels: int, width: float = 1.0) -> dict[str, Any]:
    if name not in ZOO:
        raise ModelError(f"Unknown model {name!r}.", f"The built-in models are: {_zoo_list()}.")
    return {
        "kind": "zoo",
        "name": name,
        "kwargs": {"num_classes": int(num_classes), "in_channels": int(in_channels), "width": float(width)},
    }


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """Let ``mymodels:build`` import from the current directory, as ``python -m`` would, then undo it."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def resolve_factory(ref: str, trust_code: bool) -> Callable[..., Any]:
    """Import ``pkg.mod:fn`` (``fn`` may be dotted, e.g. ``Class.build``); refuses without trust_code."""
    if not trust_code:
        raise ModelError(f"{ref!r} names Python code to import and run.", _TRUST_FIX.format(ref=ref))
    module_name, _, attr = ref.partition(":")
    try:
        with _cwd_on_path():
            obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises at import time
        raise ModelError(
            f"Could not import module {module_name!r} for {ref!r} ({type(exc).__name__}: {exc}).",
            "Run hwkd from the directory that contains it, or add that directory to PYTHONPATH.",
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"Module {module_name!r} has no attribute {attr!r} (from {ref!r}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"{ref!r} is not callable; it must be a function returning an nn.Module.")
    return obj


def _call_factory(ref: str, kwargs: dict[str, Any], trust_code: bool) -> nn.Module:
    fn = resolve_factory(ref, trust_code)
    try:
        model = fn(**kwargs)
    except Exception as exc:
        raise ModelError(f"The model factory {ref!r} raised {type(exc).__name__}: {exc}.") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"The model factory {ref!r} returned {type(model).__name__}, not a torch nn.Module.")
    return model


def build_from_spec(spec: dict[str, Any], trust_code: bool = False) -> nn.Module:
    """Rebuild the unpruned architecture a spec describes (fresh weights). See the module docstring."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "zoo":
        name = spec["name"]
        if name not in ZOO:
            raise ModelError(
                f"Unknown model {name!r} in a model spec.", f"The built-in models are: {_zoo_list()}."
            )
        return ZOO.get(name)(**spec.get("kwargs", {}))
    if kind == "factory":
        return _call_factory(spec["ref"], dict(spec.get("kwargs", {})), trust_code)
    if kind == "torchscript":
        raise ModelError(
            f"The TorchScript model {spec.get('path')!r} cannot be rebuilt as a trainable module.",
            "Use a zoo model name or a module:factory for models hwkd has to train or prune.",
        )
    raise ModelError(f"Unknown model spec kind {kind!r}.", "Expected 'zoo', 'factory' or 'torchscript'.")


def find_head(model: nn.Module, num_classes: int | None = None) -> nn.Module:
    """The classifier layer: the last nn.Linear (else last Conv2d), preferring one with num_classes outputs.

    Pruning must leave it alone (``ignored_layers``), since its outputs are the classes.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if num_classes is not None:
        for layer in reversed(linears):
            if layer.out_features == num_classes:
                return layer
        for layer in reversed(convs):
            if layer.out_channels == num_classes:
                return layer
    if linears:
        return linears[-1]
    if convs:
        return convs[-1]
    raise ModelError(f"Cannot find a classifier head (nn.Linear or nn.Conv2d) in {type(model).__name__}.")


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel prefixes
    return None


def _state_dict_problems(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
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
        out.append(
            f"missing keys {missing[:4]}" + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        )
    if unexpected:
        out.append(
            f"unexpected keys {unexpected[:4]}"
            + (f" (+{len(unexpected) - 4} more)" if len(unexpected) > 4 else "")
        )
    if shapes:
        out.append(
            "shape mismatches "
            + "; ".join(shapes[:3])
            + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else "")
        )
    return out


def _matching_arches(state: dict[str, torch.Tensor], num_classes: int, in_channels: int) -> list[str]:
    """Zoo names whose default-width architecture accepts ``state`` exactly (for a helpful hint)."""
    out = []
    for name in ZOO.names():
        try:
            if not _state_dict_problems(ZOO.get(name)(num_classes, in_channels), state):
                out.append(name)
        except Exception:  # a builder that cannot take these arguments is simply not a match
            continue
    return out


def _load_state_dict_teacher(
    path: Path, arch: str, num_classes: int, in_channels: int, trust_code: bool
) -> tuple[nn.Module, dict[str, Any]]:
    from hwkd.artifacts import torch_load

    spec = zoo_spec(arch, num_classes, in_channels)
    try:
        obj = torch_load(path, "teacher")
    except ModelError:
        if _is_torchscript(path):
            raise ModelError(
                f"The teacher {str(path)!r} is a TorchScript file, not a state dict.",
                "Drop --teacher-arch to load it as TorchScript.",
            ) from None
        raise
    if isinstance(obj, dict) and obj.get("format") == "hwkd.model/1":
        return _load_hwkd_checkpoint(path, trust_code)
    state = _unwrap_state_dict(obj)
    if state is None:
        raise ModelError(
            f"The teacher file {str(path)!r} does not hold a state dict (found {type(obj).__name__}).",
            "Save it with torch.save(model.state_dict(), PATH), or as {'state_dict': ...}.",
        )
    model = build_from_spec(spec)
    problems = _state_dict_problems(model, state)
    if problems:
        others = [a for a in _matching_arches(state, num_classes, in_channels) if a != arch]
        hint = (
            f"It matches --teacher-arch {others[0]}."
            if others
            else f"Pass the --teacher-arch it was trained as (built-in: {_zoo_list()}) and check the number "
            f"of classes ({num_classes}) and input channels ({in_channels}) of the data."
        )
        raise ModelError(
            f"The state dict {str(path)!r} does not fit the {arch!r} architecture: {'; '.join(problems)}.",
            hint,
        )
    model.load_state_dict(state, strict=True)
    return model, spec


def _is_torchscript(path: Path) -> bool:
    try:
        torch.jit.load(str(path), map_location="cpu")
    except Exception:
        return False
    return True


def _load_hwkd_checkpoint(path: Path, trust_code: bool) -> tuple[nn.Module, dict[str, Any]]:
    from hwkd.artifacts import load_model

    model, spec, _extra = load_model(path, lambda s: build_from_spec(s, trust_code))
    return model, spec


def load_teacher(
    source: str, arch: str | None, num_classes: int, in_channels: int, trust_code: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a teacher from ``pkg.mod:fn``, a state dict (with ``arch``), a TorchScript file or an hwkd
    checkpoint. Returns ``(model in eval mode, spec)``.
    """
    path = Path(source).expanduser()
    if is_factory_ref(source):
        model = _call_factory(source, {}, trust_code)
        return model.eval(), {"kind": "factory", "ref": source, "kwargs": {}}
    if not path.exists():
        raise ModelError(
            f"The teacher {source!r} does not exist.",
            "Pass a TorchScript file, a state dict with --teacher-arch NAME, or module:factory with --trust-code.",
        )
    if not path.is_file():
        raise ModelError(f"The teacher {source!r} is a directory, not a model file.")
    if arch is not None:
        model, spec = _load_state_dict_teacher(path, arch, num_classes, in_channels, trust_code)
        return model.eval(), spec
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as jit_exc:
        # Not TorchScript: an hwkd checkpoint loads without --teacher-arch, a bare state dict does not.
        from hwkd.artifacts import torch_load

        try:
            obj = torch_load(path, "teacher")
        except ModelError as exc:
            raise ModelError(
                f"The teacher {str(path)!r} is neither a TorchScript file nor a PyTorch weights file "
                f"({type(jit_exc).__name__}).",
                "Pass a TorchScript file (torch.jit.save), or a state dict with --teacher-arch NAME "
                f"(one of {_zoo_list()}).",
            ) from exc
        if isinstance(obj, dict) and obj.get("format") == "hwkd.model/1":
            model, spec = _load_hwkd_checkpoint(path, trust_code)
            return model.eval(), spec
        state = _unwrap_state_dict(obj)
        matches = _matching_arches(state, num_classes, in_channels) if state is not None else []
        raise ModelError(
            f"The teacher {str(path)!r} is not a TorchScript file"
            + (" (it looks like a state dict)." if state is not None else "."),
            "If it is a state dict, pass --teacher-arch NAME "
            + (f"(it matches {', '.join(matches)})." if matches else f"(one of {_zoo_list()}).")
            + " Otherwise export the model with torch.jit.save.",
        ) from jit_exc
    return model.eval(), {"kind": "torchscript", "path": str(path.resolve())}


def parse_width(text: str) -> float | None:
    """``"0.5x"`` / ``"0.5"`` -> 0.5; None if ``text`` is not a width multiplier."""
    m = _WIDTH_RE.match(text)
    return float(m.group(1)) if m else None


def prune_uniform(
    model: nn.Module,
    example_input: torch.Tensor,
    keep: float,
    num_classes: int | None = None,
    round_to: int = 8,
) -> nn.Module:
    """Remove ``1 - keep`` of the channels of every prunable layer by L2 magnitude (in place); head kept."""
    import torch_pruning as tp

    if keep >= 1.0:
        return model
    was_training = model.training
    model.eval()  # tracing runs a forward; in train mode it would move the BatchNorm statistics
    pruner = tp.pruner.BasePruner(
        model,
        example_input,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=1.0 - keep,
        ignored_layers=[find_head(model, num_classes)],
        round_to=round_to,
    )
    pruner.step()
    model.train(was_training)
    return model


def build_student(
    student: str | None,
    teacher: nn.Module,
    teacher_spec: dict[str, Any],
    num_classes: int,
    in_channels: int,
    trust_code: bool,
    example_input: torch.Tensor,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the student: a zoo name (default ``mobilenetv2``), ``pkg.mod:fn``, or a width multiplier of
    the teacher (``"0.5x"``: the same zoo arch at width x 0.5, or the teacher pruned uniformly to 50%).
    """
    if student is None:
        student = DEFAULT_STUDENT
    student = student.strip()
    if student in ZOO:
        spec = zoo_spec(student, num_classes, in_channels)
        return build_from_spec(spec), spec
    if is_factory_ref(student):
        model = _call_factory(student, {}, trust_code)
        return model, {"kind": "factory", "ref": student, "kwargs": {}}
    mult = parse_width(student)
    if mult is None:
        raise ModelError(
            f"Unknown student {student!r}.",
            f"Use a built-in model ({_zoo_list()}), module:factory with --trust-code, or a width multiplier "
            "of the teacher such as 0.5x.",
        )
    if not 0.0 < mult <= 1.0:
        raise ModelError(f"The student width multiplier {student!r} must be in (0, 1].", "For example 0.5x.")
    kind = teacher_spec.get("kind")
    if kind == "zoo":
        kwargs = dict(teacher_spec.get("kwargs", {}))
        spec = zoo_spec(
            teacher_spec["name"],
            kwargs.get("num_classes", num_classes),
            kwargs.get("in_channels", in_channels),
            float(kwargs.get("width", 1.0)) * mult,
        )
        return build_from_spec(spec), spec
    if kind == "factory":
        if isinstance(teacher, torch.jit.ScriptModule):
            raise ModelError("A TorchScript teacher cannot be pruned into a student.")
        model = prune_uniform(copy.deepcopy(teacher), example_input, mult, num_classes)
        return model, copy.deepcopy(teacher_spec)
    raise ModelError(
        f"A width-multiplier student ({student!r}) needs a teacher hwkd can rebuild, but the teacher is "
        f"{'a TorchScript file' if kind == 'torchscript' else repr(kind)}.",
        f"Name the student architecture instead: a built-in model ({_zoo_list()}) or module:factory.",
    )
