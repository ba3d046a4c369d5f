"""Datasets: the embedded digits, image folders and .npz arrays, as in-memory tensors.

Names are imported lazily so that ``import hwkd.data`` (and ``hwkd --help``) does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "Dataset",
    "Preprocessing",
    "check_compatible",
    "iterate_batches",
    "load_dataset",
    "random_affine",
]

if TYPE_CHECKING:
    from hwkd.data.augment import iterate_batches, random_affine
    from hwkd.data.dataset import Dataset, Preprocessing, check_compatible, load_dataset


def __getattr__(name: str):
    if name in ("iterate_batches", "random_affine"):
        from hwkd.data import augment

        return getattr(augment, name)
    if name in ("Dataset", "Preprocessing", "check_compatible", "load_dataset"):
        from hwkd.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'hwkd.data' has no attribute {name!r}")
