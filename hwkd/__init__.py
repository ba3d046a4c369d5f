"""hwkd: hardware-aware model compression for PyTorch.

Public API (heavy imports happen on first use, so ``import hwkd`` and ``hwkd --help`` stay instant)::

    import hwkd
    result = hwkd.compress(profile="jetson", out="runs/demo")
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "compress", "load_profile", "estimate", "benchmark"]


def __getattr__(name: str):
    if name in ("compress", "estimate", "benchmark"):
        from hwkd import api

        return getattr(api, name)
    if name == "load_profile":
        from hwkd.hardware.profiles import load_profile

        return load_profile
    raise AttributeError(f"module 'hwkd' has no attribute {name!r}")
