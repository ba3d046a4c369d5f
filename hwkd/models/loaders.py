"""Loading teachers and building students from what the user names: an architecture (a zoo name,
``torchvision:NAME``, ``timm:NAME``, ``pkg.mod:fn``) plus an optional state dict, a TorchScript file, or an
hwkd checkpoint. Where architectures come from is ``hwkd.models.sources`` (a registry); every model comes
with the *spec* that rebuilds its unpruned architecture (``hwkd.artifacts.save_model`` stores it beside the
pruned channel structure).
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
from hwkd.models.depgraph import torch_pruning_errors
from hwkd.models.sources import build_from_spec, is_factory_ref, parse_ref, spec_for
from hwkd.models.weights import load_weights, read_state_dict, state_dict_problems, unwrap_state_dict
from hwkd.models.zoo import DEFAULT_STUDENT, ZOO

__all__ = ["build_from_spec", "build_student", "find_head", "is_factory_ref", "load_teacher", "zoo_spec"]

_WIDTH_RE = re.compile(r"^\s*(\d*\.?\d+)\s*[xX]?\s*$")
_PARAMS_RE = re.compile(r"^\s*params\s*[:=]\s*(\d*\.?\d+)\s*%\s*$", re.IGNORECASE)
_TRUST_FIX = "Loading a model from Python code runs that code; pass --trust-code if you trust {ref!r}."


def _zoo_list() -> str:
    return ", ".join(ZOO.names())


def zoo_spec(name: str, num_classes: int, in_channels: int, width: float = 1.0) -> dict[str, Any]:
    from hwkd.models.sources import SOURCES

    return SOURCES.get("zoo").spec(name, num_classes, in_channels, width)


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


def call_factory(ref: str, kwargs: dict[str, Any], trust_code: bool) -> nn.Module:
    fn = resolve_factory(ref, trust_code)
    try:
        model = fn(**kwargs)
    except Exception as exc:
        raise ModelError(f"The model factory {ref!r} raised {type(exc).__name__}: {exc}.") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"The model factory {ref!r} returned {type(model).__name__}, not a torch nn.Module.")
    return model


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


def _matching_arches(state: dict[str, torch.Tensor], num_classes: int, in_channels: int) -> list[str]:
    """Zoo names whose default-width architecture accepts ``state`` exactly (for a helpful hint)."""
    out = []
    for name in ZOO.names():
        try:
            if not state_dict_problems(ZOO.get(name)(num_classes, in_channels), state):
                out.append(name)
        except Exception:  # a builder that cannot take these arguments is simply not a match
            continue
    return out


def _torchscript_hint(path: Path) -> None:
    if _is_torchscript(path):
        raise ModelError(
            f"The teacher {str(path)!r} is a TorchScript file, not a state dict.",
            "Drop --teacher-arch to load it as TorchScript.",
        ) from None


def _load_state_dict_teacher(
    path: Path, arch: str, num_classes: int, in_channels: int, trust_code: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``arch`` (a zoo name, ``torchvision:NAME``, ``timm:NAME``, ...) and load the state dict into it."""
    from hwkd.artifacts import torch_load

    spec = spec_for(arch, num_classes, in_channels)
    try:
        obj = torch_load(path, "teacher")
    except ModelError:
        _torchscript_hint(path)
        raise
    if isinstance(obj, dict) and obj.get("format") == "hwkd.model/1":
        return _load_hwkd_checkpoint(path, trust_code)
    state = unwrap_state_dict(obj)
    if state is None:
        raise ModelError(
            f"The teacher file {str(path)!r} does not hold a state dict (found {type(obj).__name__}).",
            "Save it with torch.save(model.state_dict(), PATH), or as {'state_dict': ...}.",
        )
    model = build_from_spec(spec, trust_code)
    hint = None
    if spec["kind"] == "zoo" and state_dict_problems(model, state):
        others = [a for a in _matching_arches(state, num_classes, in_channels) if a != spec["name"]]
        hint = (
            f"It matches --teacher-arch {others[0]}."
            if others
            else f"Pass the --teacher-arch it was trained as (built-in: {_zoo_list()}, or torchvision:NAME / "
            f"timm:NAME) and check the number of classes ({num_classes}) and input channels ({in_channels}) "
            "of the data."
        )
    load_weights(model, state, where=str(path), arch=arch, num_classes=num_classes, hint=hint)
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
    named = parse_ref(source) if not path.exists() else None
    if named is not None and named[0] != "factory":
        raise ModelError(
            f"--teacher {source!r} names an architecture, but --teacher takes the trained weights.",
            f"Pass --teacher WEIGHTS.pt --teacher-arch {source} (hwkd never downloads pretrained weights).",
        )
    if is_factory_ref(source):
        model = call_factory(source, {}, trust_code)
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
                f"(torchvision:NAME, timm:NAME or one of {_zoo_list()}).",
            ) from exc
        if isinstance(obj, dict) and obj.get("format") == "hwkd.model/1":
            model, spec = _load_hwkd_checkpoint(path, trust_code)
            return model.eval(), spec
        state = unwrap_state_dict(obj)
        matches = _matching_arches(state, num_classes, in_channels) if state is not None else []
        raise ModelError(
            f"The teacher {str(path)!r} is not a TorchScript file"
            + (" (it looks like a state dict)." if state is not None else "."),
            "If it is a state dict, pass --teacher-arch NAME "
            + (
                f"(it matches {', '.join(matches)})."
                if matches
                else f"(torchvision:NAME, timm:NAME or one of {_zoo_list()})."
            )
            + " Otherwise export the model with torch.jit.save.",
        ) from jit_exc
    return model.eval(), {"kind": "torchscript", "path": str(path.resolve())}


def parse_width(text: str) -> float | None:
    """``"0.5x"`` / ``"0.5"`` -> 0.5; None if ``text`` is not a width multiplier."""
    m = _WIDTH_RE.match(text)
    return float(m.group(1)) if m else None


def parse_params_share(text: str) -> float | None:
    """``"params:10%"`` -> 0.1 (a student with at most 10% of the teacher's parameters); None otherwise."""
    m = _PARAMS_RE.match(text)
    return float(m.group(1)) / 100.0 if m else None


def _layer_widths(model: nn.Module) -> list[int]:
    return [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]  # fmt: skip


SEARCH_TRIES = 8  # pruned copies widest_under_params makes: the 0.5x reference + ceil(log2(100)) bisection steps


def widest_under_params(
    teacher: nn.Module,
    example_input: torch.Tensor,
    share: float,
    num_classes: int | None = None,
    round_to: int = 8,
    on_try: Callable[[], Any] = lambda: None,
) -> tuple[float, nn.Module]:
    """The widest multiplier, in steps of 0.01, whose ``prune_uniform`` copy of the teacher keeps at most
    ``share`` of its parameters, and that copy.

    Why a search: the share a width keeps is not its square (the head is kept whole, channel counts are
    rounded down to ``round_to``), so "90% fewer parameters" is 0.30x of one teacher and 0.32x of another
    (the CIFAR-10 benchmark's ResNet-20 with ``prune.round_to=1``). And it is not monotone: a layer whose
    kept count would round to 0 is left whole by torch-pruning, so past some narrowness a copy grows again.
    Each width is therefore one of three states, in this order as the width grows: too narrow (a layer that
    shrinks at 0.5x is whole), fits, too wide; bisection finds the last width that is not too wide.
    """
    from hwkd.stages.common import count_params  # here, not at import: it pulls in the training loop

    total = count_params(teacher)
    if share >= 1.0:
        return 1.0, copy.deepcopy(teacher)
    full = _layer_widths(teacher)

    def pruned(step: int) -> nn.Module:
        model = prune_uniform(copy.deepcopy(teacher), example_input, step / 100, num_classes, round_to=round_to)
        on_try()  # SEARCH_TRIES in all: 0.5x, then 7 bisection steps over 1..99
        return model

    shrinks = [i for i, (w, f) in enumerate(zip(_layer_widths(pruned(50)), full, strict=True)) if w < f]
    tried: dict[int, tuple[str, int, nn.Module]] = {}

    def state(step: int) -> str:
        model = pruned(step)
        widths, n = _layer_widths(model), count_params(model)
        kind = "narrow" if any(widths[i] == full[i] for i in shrinks) else "fits" if n <= share * total else "wide"
        tried[step] = (kind, n, model if kind == "fits" else None)
        return kind

    lo, hi = 0, 100  # lo: not too wide (0: none tried); hi: too wide (100 is the teacher, share < 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if state(mid) == "wide":
            hi = mid
        else:
            lo = mid
    if lo and tried[lo][0] == "fits":
        return lo / 100, tried[lo][2]
    narrowest = tried[hi][1] if hi in tried else total
    raise ModelError(
        f"No width of the teacher keeps at most {share * 100:g}% of its {total:,} parameters: the narrowest that "
        f"shrinks every layer it can ({hi / 100:g}x) keeps {narrowest:,} ({narrowest / total:.1%}); narrower, "
        f"channel counts rounded down to prune.round_to={round_to} reach 0 and torch-pruning leaves those "
        "layers whole. The classifier head and layers torch-pruning cannot follow are never pruned.",
        "Ask for a larger share (--student params:N%), lower the rounding (--set prune.round_to=1), or "
        "name a smaller architecture with --student.",
    )


def prune_uniform(
    model: nn.Module,
    example_input: torch.Tensor,
    keep: float,
    num_classes: int | None = None,
    round_to: int = 8,
) -> nn.Module:
    """Remove ``1 - keep`` of the channels of every prunable layer by L2 magnitude (in place); head kept.

    Layers torch-pruning cannot follow (e.g. through a channel shuffle) keep their width.
    """
    import torch_pruning as tp

    from hwkd.models.depgraph import base_pruner

    if keep >= 1.0:
        return model
    was_training = model.training
    model.eval()  # tracing runs a forward; in train mode it would move the BatchNorm statistics
    pruner, _skipped = base_pruner(
        model,
        example_input,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=1.0 - keep,
        ignored_layers=[find_head(model, num_classes)],
        round_to=round_to,
    )
    with torch_pruning_errors(model, "pruning the teacher into a width-multiplier student"):
        pruner.step()
    model.train(was_training)
    return model


def _student_from_checkpoint(path: Path, student: str | None, num_classes: int, in_channels: int,
                             trust_code: bool) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """An hwkd checkpoint as --student-weights: its own (possibly pruned) architecture, which must match."""
    model, spec = _load_hwkd_checkpoint(path, trust_code)
    if student is not None and parse_ref(student) is not None:
        wanted = spec_for(student, num_classes, in_channels)
        if (wanted.get("kind"), wanted.get("name", wanted.get("ref"))) != (spec.get("kind"), spec.get("name", spec.get("ref"))):
            raise ModelError(
                f"--student-weights {str(path)!r} is an hwkd checkpoint of {spec.get('kind')}:"
                f"{spec.get('name', spec.get('ref'))}, not of --student {student!r}.",
                "Drop --student (the checkpoint names its own architecture) or pass the matching one.",
            )
    return model, spec


def build_student(
    student: str | None,
    teacher: nn.Module,
    teacher_spec: dict[str, Any],
    num_classes: int,
    in_channels: int,
    trust_code: bool,
    example_input: torch.Tensor,
    weights: str | None = None,
    round_to: int = 8,
    log: Callable[[str], Any] = lambda _msg: None,
    progress: Any = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the student: an architecture (zoo name, default ``mobilenetv2``; ``torchvision:NAME``;
    ``timm:NAME``; ``pkg.mod:fn``), or a width multiplier of the teacher (``"0.5x"``: a copy of the trained
    teacher with half the channels of every prunable layer removed by magnitude, counts rounded to
    ``round_to``; ``"1x"`` is the teacher's copy), or the widest such copy with at most a share of the
    teacher's parameters (``"params:10%"``, ``widest_under_params``; the width chosen goes to ``log``).
    ``weights`` is a state dict (or an hwkd checkpoint) to start from instead of fresh weights; ``progress``
    (hwkd.pipeline.Progress) shows the width search.
    """
    if weights is not None:
        wpath = Path(weights).expanduser()
        from hwkd.artifacts import torch_load

        obj = torch_load(wpath, "student weights")
        if isinstance(obj, dict) and obj.get("format") == "hwkd.model/1":
            return _student_from_checkpoint(wpath, student, num_classes, in_channels, trust_code)
    text = (student or DEFAULT_STUDENT).strip()
    parsed = parse_ref(text)
    if parsed is not None:
        spec = spec_for(text, num_classes, in_channels)
        model = build_from_spec(spec, trust_code)
        if weights is not None:
            load_weights(model, read_state_dict(wpath, "student weights"), where=str(wpath), arch=text,
                         num_classes=num_classes)  # fmt: skip
        return model, spec
    if weights is not None:
        raise ModelError(
            f"--student-weights needs a named student architecture, not {text!r}.",
            "Pass --student torchvision:NAME, timm:NAME, a built-in model or module:factory with it.",
        )
    share = parse_params_share(text)
    mult = parse_width(text)
    if share is None and mult is None:
        raise ModelError(
            f"Unknown student {text!r}.",
            f"Use torchvision:NAME, timm:NAME, a built-in model ({_zoo_list()}), module:factory with "
            "--trust-code, a width multiplier of the teacher such as 0.5x, or a share of its parameters "
            "such as params:10%.",
        )
    if share is not None and not 0.0 < share <= 1.0:
        raise ModelError(f"The student's share of the teacher's parameters {text!r} must be in (0%, 100%].",
                         "For example params:10% (90% fewer parameters).")  # fmt: skip
    if mult is not None and not 0.0 < mult <= 1.0:
        raise ModelError(f"The student width multiplier {text!r} must be in (0, 1].", "For example 0.5x.")
    kind = teacher_spec.get("kind")
    if kind in ("zoo", "factory", "torchvision", "timm") and not isinstance(teacher, torch.jit.ScriptModule):
        # A pruned copy, not a fresh narrower network: it starts from the teacher's trained weights
        # (docs/decisions-issue14.md, "Stop 20"); the saved structure rebuilds it from the teacher's spec.
        if share is not None:
            from hwkd.stages.common import count_params

            bar = (progress.task(f"student width for {text.strip()}", SEARCH_TRIES) if progress
                   else contextlib.nullcontext(lambda n=1: None))  # fmt: skip
            with bar as advance:  # a bar while the copies are pruned: a minute for a ResNet-50
                tries = []
                mult, model = widest_under_params(teacher, example_input, share, num_classes, round_to=round_to,
                                                  on_try=lambda: (tries.append(1), advance()))  # fmt: skip
                advance(SEARCH_TRIES - len(tries))  # some searches end a step early: the bar ends full
            log(f"student: {mult:g}x of the teacher, the widest with at most {share * 100:g}% of its "
                f"parameters ({count_params(model):,} of {count_params(teacher):,}, "
                f"{count_params(model) / count_params(teacher):.2%})")  # fmt: skip
        else:
            model = prune_uniform(copy.deepcopy(teacher), example_input, mult, num_classes, round_to=round_to)
        return model, copy.deepcopy(teacher_spec)
    raise ModelError(
        f"A width-multiplier student ({text!r}) needs a teacher hwkd can rebuild, but the teacher is "
        f"{'a TorchScript file' if kind == 'torchscript' else repr(kind)}.",
        f"Name the student architecture instead: torchvision:NAME, timm:NAME, a built-in model ({_zoo_list()}) "
        "or module:factory.",
    )
