"""Models: the built-in zoo (teacher ``resnet``, student ``mobilenetv2``, tiny ``cnn``), the registry of model
sources (``sources``: zoo, torchvision, timm, factory, TorchScript), loaders and the DepGraph wrapper.

Names are imported lazily so that ``import hwkd.models`` (and ``hwkd --help``) does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["ZOO", "build_from_spec", "build_student", "find_head", "load_teacher"]

if TYPE_CHECKING:
    from hwkd.models.loaders import build_from_spec, build_student, find_head, load_teacher
    from hwkd.models.zoo import ZOO


def __getattr__(name: str):
    if name == "ZOO":
        from hwkd.models.zoo import ZOO

        return ZOO
    if name in ("build_from_spec", "build_student", "find_head", "load_teacher"):
        from hwkd.models import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module 'hwkd.models' has no attribute {name!r}")
