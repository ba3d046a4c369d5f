"""Datasets: the embedded digits, image folders (read lazily) and .npz arrays, behind one DataLoader API.

Names are imported lazily so that ``import hwkd.data`` (and ``hwkd --help``) does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "Dataset",
    "Preprocessing",
    "check_compatible",
    "load_dataset",
    "random_affine",
    "set_epoch",
]

if TYPE_CHECKING:
    from hwkd.data.augment import random_affine
    from hwkd.data.dataset import Dataset, check_compatible, load_dataset
    from hwkd.data.loading import set_epoch
    from hwkd.data.preprocess import Preprocessing


def __getattr__(name: str):
    if name == "random_affine":
        from hwkd.data import augment

        return augment.random_affine
    if name == "set_epoch":
        from hwkd.data import loading

        return loading.set_epoch
    if name == "Preprocessing":
        from hwkd.data import preprocess

        return preprocess.Preprocessing
    if name in ("Dataset", "check_compatible", "load_dataset"):
        from hwkd.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'hwkd.data' has no attribute {name!r}")
