"""Where architectures come from: a small registry of model sources (zoo, torchvision, timm, factory,
TorchScript), each knowing how to make a spec from a name, how to build it, and its default preprocessing.

A reference on the command line is ``KIND:NAME`` (``torchvision:resnet18``, ``timm:efficientnet_b0``,
``zoo:mobilenetv2``), a bare zoo name (``resnet``), or ``pkg.mod:fn`` (user code, needs ``--trust-code``).
Specs are the JSON-able dicts stored in checkpoints (see ``hwkd.artifacts.save_model``):

- ``{"kind": "zoo", "name": "resnet", "kwargs": {"num_classes": 10, "in_channels": 1, "width": 1.0}}``
- ``{"kind": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}}``
- ``{"kind": "timm", "name": "resnet18", "kwargs": {"num_classes": 10, "in_chans": 3}}``
- ``{"kind": "factory", "ref": "pkg.mod:fn", "kwargs": {}}``
- ``{"kind": "torchscript", "path": "/abs/teacher.ts"}`` (a teacher only; not rebuildable)

torchvision and timm are the optional extra ``hwkd[vision]``; they are imported only when asked for, and
never download weights (``weights=None`` / ``pretrained=False``): weights come from the user's files.

Example::

    from hwkd.models.sources import build_from_spec, spec_for
    spec = spec_for("torchvision:mobilenet_v3_small", num_classes=10, in_channels=3)
    model = build_from_spec(spec)
"""

from __future__ import annotations

import abc
import difflib
import re
from typing import Any

from torch import nn

from hwkd.errors import ConfigError, ModelError
from hwkd.registry import Registry

VISION_EXTRA = "pip install 'hwkd[vision]'"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ModelSource(abc.ABC):
    """One place architectures come from. Subclasses fill in ``spec`` and ``build``."""

    kind: str = ""
    rebuildable = True  # can hwkd build a fresh, trainable copy (needed to train, prune and reload)?

    @abc.abstractmethod
    def spec(self, name: str, num_classes: int, in_channels: int) -> dict[str, Any]:
        """The JSON-able spec that rebuilds this architecture (see hwkd.models.loaders)."""

    @abc.abstractmethod
    def build(self, spec: dict[str, Any], trust_code: bool = False) -> nn.Module:
        """A fresh model from ``spec``."""

    def preprocessing(self, spec: dict[str, Any]) -> dict[str, Any] | None:
        """The normalisation the architecture is documented with; None when it has none of its own."""
        return None


SOURCES: Registry[ModelSource] = Registry("model source")


def _register(cls: type[ModelSource]) -> type[ModelSource]:
    SOURCES.register(cls.kind)(cls())
    return cls


def _close(name: str, names: list[str], n: int = 4) -> str:
    near = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    return f" Did you mean {', '.join(near)}?" if near else ""


@_register
class ZooSource(ModelSource):
    """hwkd's built-in models (the embedded default's teacher and students)."""

    kind = "zoo"

    def spec(self, name, num_classes, in_channels, width: float = 1.0):
        from hwkd.models.zoo import ZOO

        if name not in ZOO:
            raise ModelError(f"Unknown model {name!r}.", f"The built-in models are: {', '.join(ZOO.names())}.")
        kwargs = {"num_classes": int(num_classes), "in_channels": int(in_channels), "width": float(width)}
        return {"kind": "zoo", "name": name, "kwargs": kwargs}

    def build(self, spec, trust_code=False):
        from hwkd.models.zoo import ZOO

        name = spec["name"]
        if name not in ZOO:
            raise ModelError(
                f"Unknown model {name!r} in a model spec.", f"The built-in models are: {', '.join(ZOO.names())}."
            )
        return ZOO.get(name)(**spec.get("kwargs", {}))


def import_vision(package: str, ref: str):
    """Import torchvision or timm for ``ref``; a missing or broken install is a ModelError naming the extra."""
    import importlib

    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as exc:
        raise ModelError(
            f"{ref!r} needs {package}, which is not installed.",
            f"Install hwkd's vision extra: {VISION_EXTRA} (torchvision and timm).",
        ) from exc
    except Exception as exc:  # e.g. a torchvision wheel built for another torch: "operator ... does not exist"
        import torch

        raise ModelError(
            f"{package} is installed but does not import with torch {torch.__version__} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).",
            f"Install the {package} build that matches this torch (e.g. torch==2.14.1 with torchvision==0.29.1), "
            f"then {VISION_EXTRA}.",
        ) from exc


@_register
class TorchvisionSource(ModelSource):
    """``torchvision.models.get_model(name, weights=None, num_classes=...)``: RGB classification models."""

    kind = "torchvision"

    def names(self) -> list[str]:
        tv = import_vision("torchvision", "torchvision:")
        return sorted(tv.models.list_models(module=tv.models))  # classification only, no detection heads

    def spec(self, name, num_classes, in_channels):
        ref = f"torchvision:{name}"
        names = self.names()
        if name not in names:
            raise ModelError(
                f"torchvision has no classification model {name!r}.{_close(name, names)}",
                "See torchvision.models.list_models(module=torchvision.models) for the names.",
            )
        if in_channels != 3:
            raise ModelError(
                f"{ref} takes 3-channel (RGB) images, but the data has {in_channels} channel(s).",
                "Use RGB images, or a timm model (it builds any number of input channels, e.g. timm:resnet18).",
            )
        return {"kind": "torchvision", "name": name, "kwargs": {"num_classes": int(num_classes)}}

    def build(self, spec, trust_code=False):
        tv = import_vision("torchvision", f"torchvision:{spec['name']}")
        try:
            return tv.models.get_model(spec["name"], weights=None, **spec.get("kwargs", {}))
        except Exception as exc:
            raise ModelError(
                f"torchvision could not build {spec['name']!r} with {spec.get('kwargs')} "
                f"({type(exc).__name__}: {exc})."
            ) from exc

    def preprocessing(self, spec):
        # torchvision's classification models all document the ImageNet normalisation.
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bilinear"}


@_register
class TimmSource(ModelSource):
    """``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)``."""

    kind = "timm"

    def spec(self, name, num_classes, in_channels):
        timm = import_vision("timm", f"timm:{name}")
        if not timm.is_model(name):
            raise ModelError(
                f"timm has no model {name!r}.{_close(name, timm.list_models())}",
                "See timm.list_models('*PATTERN*') for the names.",
            )
        return {"kind": "timm", "name": name, "kwargs": {"num_classes": int(num_classes), "in_chans": int(in_channels)}}

    def build(self, spec, trust_code=False):
        timm = import_vision("timm", f"timm:{spec['name']}")
        try:
            return timm.create_model(spec["name"], pretrained=False, **spec.get("kwargs", {}))
        except Exception as exc:
            raise ModelError(
                f"timm could not build {spec['name']!r} with {spec.get('kwargs')} ({type(exc).__name__}: {exc})."
            ) from exc

    def preprocessing(self, spec):
        timm = import_vision("timm", f"timm:{spec['name']}")
        cfg = timm.models.get_pretrained_cfg(spec["name"])
        if cfg is None:
            return None
        out = {"mean": list(cfg.mean), "std": list(cfg.std), "interpolation": cfg.interpolation}
        if cfg.crop_pct:
            out["crop_pct"] = float(cfg.crop_pct)
        return out


@_register
class FactorySource(ModelSource):
    """``pkg.mod:fn`` returning an nn.Module: user code, run only with ``--trust-code``."""

    kind = "factory"

    def spec(self, name, num_classes, in_channels):
        return {"kind": "factory", "ref": name, "kwargs": {}}

    def build(self, spec, trust_code=False):
        from hwkd.models.loaders import call_factory

        return call_factory(spec["ref"], dict(spec.get("kwargs", {})), trust_code)


@_register
class TorchScriptSource(ModelSource):
    """A TorchScript file: usable as a teacher as it is, but hwkd cannot rebuild it to train or prune."""

    kind = "torchscript"
    rebuildable = False

    def spec(self, name, num_classes, in_channels):
        return {"kind": "torchscript", "path": name}

    def build(self, spec, trust_code=False):
        raise ModelError(
            f"The TorchScript model {spec.get('path')!r} cannot be rebuilt as a trainable module.",
            "Use an architecture by name (zoo, torchvision:NAME, timm:NAME) or a module:factory for models "
            "hwkd has to train or prune.",
        )


# Prefixes that name a source on the command line; ``pkg.mod:fn`` is the factory kind.
PREFIXES = ("zoo", "torchvision", "timm")


def is_factory_ref(text: str) -> bool:
    """True for ``pkg.mod:fn`` strings that are neither a source prefix nor an existing path."""
    from pathlib import Path

    return bool(_FACTORY_RE.match(text)) and split_ref(text)[0] is None and not Path(text).exists()


def split_ref(text: str) -> tuple[str | None, str]:
    """``"timm:resnet18"`` -> ("timm", "resnet18"); anything without a known prefix -> (None, text)."""
    kind, sep, name = text.strip().partition(":")
    if sep and kind in PREFIXES:
        if not name:
            raise ModelError(f"{text!r} names no architecture after {kind + ':'!r}.", f"For example {kind}:resnet18.")
        return kind, name
    return None, text.strip()


def parse_ref(text: str) -> tuple[str, str] | None:
    """The (kind, name) a reference names, or None if it is not one (e.g. a width multiplier ``0.5x``)."""
    from hwkd.models.zoo import ZOO

    kind, name = split_ref(text)
    if kind is not None:
        return kind, name
    if name in ZOO:
        return "zoo", name
    if is_factory_ref(name):
        return "factory", name
    return None


def spec_for(ref: str, num_classes: int, in_channels: int) -> dict[str, Any]:
    """The spec of an architecture named ``ref`` for data with these classes and channels."""
    parsed = parse_ref(ref)
    if parsed is None:
        from hwkd.models.zoo import ZOO

        raise ModelError(
            f"Unknown model {ref!r}.",
            f"Use torchvision:NAME, timm:NAME, a built-in model ({', '.join(ZOO.names())}), or "
            "module:factory with --trust-code.",
        )
    kind, name = parsed
    return SOURCES.get(kind).spec(name, num_classes, in_channels)


def source_of(spec: dict[str, Any]) -> ModelSource:
    kind = spec.get("kind") if isinstance(spec, dict) else None
    try:
        return SOURCES.get(str(kind))
    except ConfigError:
        raise ModelError(
            f"Unknown model spec kind {kind!r}.", f"Expected one of: {', '.join(SOURCES.names())}."
        ) from None


def build_from_spec(spec: dict[str, Any], trust_code: bool = False) -> nn.Module:
    """Rebuild the unpruned architecture a spec describes (fresh weights; never downloads any)."""
    return source_of(spec).build(spec, trust_code)


def default_preprocessing(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The architecture's documented normalisation (mean, std, interpolation), or None (zoo, user code)."""
    return source_of(spec).preprocessing(spec)
