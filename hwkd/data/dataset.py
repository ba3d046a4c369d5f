"""In-memory datasets and the one preprocessing that produces every tensor hwkd trains on.

``Preprocessing`` is the contract with deployment: it is written into the exported ONNX model's
metadata, and a deployer reproduces the inputs from that metadata alone (scale -> resize -> normalize),
so every tensor here is made by ``Preprocessing.apply`` on the raw pixels and nothing else.

Example::

    from hwkd.data import load_dataset
    ds = load_dataset(None)  # embedded digits, 1x32x32, 10 classes
    ds.x_train.shape, ds.preprocessing.to_json()
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hwkd.data.sources import RawData, check_finite, load_image_folder, load_npz
from hwkd.errors import DataError

DEFAULT_IMAGE_SIZE = 32
SPLIT = (0.70, 0.15, 0.15)  # train / val / test, stratified
# Fewest examples per class for which the two-step stratified 70/15/15 split always puts every class
# in each of train, val and test (floor(0.3 * 7) = 2 go to val+test, one each).
MIN_PER_CLASS = 7
_ALIGN_MODES = ("linear", "bilinear", "bicubic", "trilinear")


@dataclass(frozen=True)
class Preprocessing:
    """raw pixels -> ``x * scale`` -> resize to (H, W) -> ``(x - mean) / std`` per channel.

    The resize is ``torch.nn.functional.interpolate(mode=interpolation, align_corners=False,
    antialias=False)`` on NCHW float32 tensors.
    """

    scale: float
    resize: tuple[int, int]  # (H, W)
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"resize": list(self.resize)}

    def to_json(self) -> str:
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in self.to_dict().items()})

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        d = json.loads(text)
        return cls(
            scale=float(d["scale"]),
            resize=(int(d["resize"][0]), int(d["resize"][1])),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )

    def apply(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Preprocess a batch of raw images, NCHW or NHW (one channel), into float32 NCHW."""
        x = torch.as_tensor(np.asarray(raw) if not isinstance(raw, torch.Tensor) else raw)
        x = x.to(torch.float32)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise ValueError(f"expected NCHW or NHW raw images, got shape {tuple(x.shape)}")
        if x.shape[1] != len(self.mean):
            raise ValueError(f"expected {len(self.mean)} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        x = x * self.scale
        kwargs = {"align_corners": False} if self.interpolation in _ALIGN_MODES else {}
        x = F.interpolate(x, size=tuple(self.resize), mode=self.interpolation, antialias=False, **kwargs)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()

    def apply_many(self, raw: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """``apply`` for a list of CHW images of mixed sizes: each size group is processed as a batch."""
        if not isinstance(raw, list):
            return self.apply(raw)
        out = torch.empty(len(raw), len(self.mean), *self.resize, dtype=torch.float32)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(raw):
            groups.setdefault(tuple(im.shape), []).append(i)
        for idx in groups.values():
            out[idx] = self.apply(np.stack([raw[i] for i in idx]))
        return out


@dataclass
class Dataset:
    """Whole splits as tensors: float32 NCHW preprocessed images and int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    labels: list[str]
    preprocessing: Preprocessing

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "train": int(self.x_train.shape[0]),
            "val": int(self.x_val.shape[0]),
            "test": int(self.x_test.shape[0]),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
        }


def load_dataset(source: str | None, image_size: int | None = None, seed: int = 0) -> Dataset:
    """Load, split 70/15/15 (stratified, seeded) and preprocess a dataset.

    ``source``: None or "digits" (embedded), an image folder (one subfolder per class) or a ``.npz``
    with ``x`` and ``y`` (optionally ``labels``). Images are resized to ``image_size`` squared; the
    default is 32 for digits and image folders and the native size for .npz arrays.
    """
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
        raise DataError(f"The image size must be a positive integer, got {image_size!r}.")
    if source is None or source == "digits":
        from hwkd.data.digits import load_digits_raw

        raw, name, default = load_digits_raw(), "digits", (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    else:
        path = Path(source).expanduser()
        fix = (
            "Pass an image folder (one subfolder per class), a .npz file with 'x' and 'y' arrays, "
            "or leave the data argument out to use the built-in digits."
        )
        if not path.exists():
            raise DataError(f"The dataset path {str(source)!r} does not exist.", fix)
        if path.is_dir():
            raw, default = load_image_folder(path), (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
        elif path.suffix.lower() == ".npz":
            raw = load_npz(path)
            default = raw.native_size() or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
        else:
            raise DataError(f"The dataset file {str(source)!r} has an unsupported type {path.suffix!r}.", fix)
        name = path.name
    size = (int(image_size), int(image_size)) if image_size is not None else default
    return build_dataset(raw, name, size, seed)


def split_indices(
    y: np.ndarray, seed: int, where: str, labels: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 70/15/15 train/val/test indices; every class lands in each split."""
    from sklearn.model_selection import train_test_split

    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise DataError(
            f"The dataset {where!r} has a single class; classification needs at least 2.",
            "Add examples of the other classes.",
        )
    if counts.min() < MIN_PER_CLASS:
        few = int(classes[counts.argmin()])
        raise DataError(
            f"Class {labels[few] if labels else few!r} of the dataset {where!r} has only {int(counts.min())} example(s); the "
            f"stratified 70/15/15 train/val/test split needs at least {MIN_PER_CLASS} per class.",
            f"Add examples so every class has at least {MIN_PER_CLASS}, or drop the small classes.",
        )
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, test_size=SPLIT[1] + SPLIT[2], stratify=y, random_state=seed)
    val, test = train_test_split(
        rest, test_size=SPLIT[2] / (SPLIT[1] + SPLIT[2]), stratify=y[rest], random_state=seed
    )
    return np.sort(train), np.sort(val), np.sort(test)


def build_dataset(raw: RawData, name: str, size: tuple[int, int], seed: int = 0) -> Dataset:
    """Split raw data, fit mean/std on the train split, and preprocess every split with that one recipe."""
    train, val, test = split_indices(raw.y, seed, raw.where, raw.labels)
    channels = raw.channels
    unit = Preprocessing(
        scale=float(raw.scale),
        resize=size,
        interpolation="bilinear",
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
    )
    x = unit.apply_many(raw.take(train))
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    # Rounded so the JSON metadata is readable; the rounded values are the ones actually applied.
    prep = dataclasses.replace(
        unit, mean=tuple(float(f"{v:.6g}") for v in mean), std=tuple(float(f"{v:.6g}") for v in std)
    )
    y = torch.as_tensor(raw.y, dtype=torch.int64)
    split = {
        k: (prep.apply_many(raw.take(i)), y[torch.as_tensor(i)])
        for k, i in zip(("train", "val", "test"), (train, val, test), strict=True)
    }
    for k, (xs, _) in split.items():  # finite pixels can still overflow float32 when normalized
        check_finite(xs.numpy(), f"{raw.where} ({k} split, after preprocessing)", what="example")
    return Dataset(
        name=name,
        x_train=split["train"][0],
        y_train=split["train"][1],
        x_val=split["val"][0],
        y_val=split["val"][1],
        x_test=split["test"][0],
        y_test=split["test"][1],
        labels=list(raw.labels),
        preprocessing=prep,
    )


def check_compatible(model: torch.nn.Module, dataset: Dataset) -> None:
    """Run ``model`` on two validation images; raise DataError if it fails or the output is not (2, K).

    The model runs in eval mode under no_grad (BatchNorm statistics are left untouched) and its
    train/eval mode is restored afterwards.
    """
    x = dataset.x_val[:2]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # any shape / dtype error inside user code
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise DataError(
            f"The model fails on the dataset's inputs of shape (C, H, W) = {dataset.input_shape} "
            f"({type(exc).__name__}: {first}).",
            "Check the model's input channels (1 = grayscale, 3 = RGB) and pass --image-size N to resize "
            "the images to the size the model expects.",
        ) from exc
    finally:
        model.train(was_training)
    expected = (x.shape[0], dataset.num_classes)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != expected:
        raise DataError(
            f"The model outputs {shape} for a batch of {x.shape[0]} but the dataset has "
            f"{dataset.num_classes} classes, so {expected} was expected.",
            f"Give the model a head with {dataset.num_classes} outputs returning one logits tensor.",
        )
