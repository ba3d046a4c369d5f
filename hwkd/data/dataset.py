"""The dataset: labels and split indices in memory, pixels read a batch at a time.

Image folders are listed (paths and headers only) and decoded per item by a torch DataLoader; the
embedded digits and .npz arrays stay in memory as raw pixels and are preprocessed a batch at a time.
Every tensor comes from the one ``Preprocessing`` (hwkd.data.preprocess) that the ONNX metadata carries.

Example::

    from hwkd.data import load_dataset
    ds = load_dataset(None)  # embedded digits, 1x32x32, 10 classes
    for xb, yb in ds.loader("train", train=True, batch_size=64):  # shuffled, augmented
        ...
    x, y = ds.sample("train", 256)  # e.g. PTQ calibration images
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hwkd.config import DataConfig
from hwkd.data.loading import EpochBatchSampler, SplitView, auto_workers, make_loader, set_epoch
from hwkd.data.preprocess import (
    Preprocessing,
    check_data_config,
    geometry_from,
    rounded,
    stated_normalization,
)
from hwkd.data.sources import FileList, RawData, folder_layout, list_image_folder, load_npz, read_image
from hwkd.errors import DataError

log = logging.getLogger("hwkd")

DEFAULT_IMAGE_SIZE = 32
SPLIT = (0.70, 0.15, 0.15)  # train / val / test, stratified
# Fewest examples per class for which the two-step stratified 70/15/15 split always puts every class
# in each of train, val and test (floor(0.3 * 7) = 2 go to val+test, one each).
MIN_PER_CLASS = 7
SPLITS = ("train", "val", "test")

__all__ = ["Dataset", "Preprocessing", "check_compatible", "load_dataset", "split_indices"]


class ArraySource:
    """Raw pixels in memory (digits, .npz): NCHW float32, ``scale`` maps them to [0, 1]."""

    kind = "arrays"

    def __init__(self, images: np.ndarray, y: np.ndarray):
        self.images = images
        self.y = np.asarray(y, dtype=np.int64)
        self.channels = int(images.shape[1])

    def digest(self, h) -> None:
        h.update(np.ascontiguousarray(self.images).tobytes())


class FileSource:
    """Image files, decoded one at a time (uint8 CHW) in the loader's workers."""

    kind = "files"

    def __init__(self, files: FileList):
        self.files = files
        self.y = files.y
        self.channels = files.channels

    def read(self, i: int) -> np.ndarray:
        return read_image(self.files.path(i), self.files.mode)

    def digest(self, h) -> None:
        for i in range(len(self.files)):
            path = self.files.path(i)
            st = os.stat(path)
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))


class Dataset:
    """Splits as index arrays over a source; batches come from ``loader`` / ``eval_batches`` / ``sample``.

    ``notes`` are what a user should know about how the data was read (layout, fitted statistics).
    """

    def __init__(
        self,
        name: str,
        source: ArraySource | FileSource,
        splits: dict[str, np.ndarray],
        labels: list[str],
        preprocessing: Preprocessing,
        *,
        augment: str = "affine",
        workers: int = -1,
        notes: list[str] | None = None,
    ):
        self.name = name
        self.source = source
        self.splits = {k: np.asarray(v, dtype=np.int64) for k, v in splits.items()}
        self.labels = list(labels)
        self.preprocessing = preprocessing
        self.augment = augment  # affine | crop_flip | none: what train=True adds
        self.workers = workers
        self.notes = list(notes or [])
        self._example: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, name: str, splits: dict[str, tuple[Any, Any]], labels: list[str] | None = None) -> Dataset:
        """Already-preprocessed float NCHW tensors per split (tests, benchmarks); identity preprocessing."""
        xs = [torch.as_tensor(splits[k][0], dtype=torch.float32) for k in SPLITS]
        ys = [torch.as_tensor(splits[k][1], dtype=torch.int64) for k in SPLITS]
        c, h, w = xs[0].shape[1:]
        bounds = np.cumsum([0] + [len(y) for y in ys])
        source = ArraySource(torch.cat(xs).numpy(), torch.cat(ys).numpy())
        prep = Preprocessing(scale=1.0, resize=(int(h), int(w)), interpolation="bilinear", mean=(0.0,) * c, std=(1.0,) * c)
        idx = {k: np.arange(bounds[i], bounds[i + 1]) for i, k in enumerate(SPLITS)}
        n_classes = int(max(int(y.max()) for y in ys if len(y)) + 1)
        return cls(name, source, idx, labels or [str(i) for i in range(n_classes)], prep)

    # --- shape ---------------------------------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w = self.preprocessing.output_size
        return int(self.source.channels), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def split_size(self, split: str) -> int:
        return len(self._indices(split))

    def targets(self, split: str) -> torch.Tensor:
        """The labels of a split, in ``eval_batches`` order (they are in memory; pixels are not)."""
        return torch.as_tensor(self.source.y[self._indices(split)], dtype=torch.int64)

    def _indices(self, split: str) -> np.ndarray:
        if split not in self.splits:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return self.splits[split]

    # --- batches -------------------------------------------------------------------------------------

    def loader(
        self,
        split: str,
        *,
        train: bool,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        augment: bool | None = None,
        workers: int | None = None,
        device: Any = None,
        persistent: bool | None = None,
    ) -> torch.utils.data.DataLoader:
        """A DataLoader of (x float32 NCHW, y int64) over ``split``.

        ``train=True``: shuffled with a generator seeded from (seed, epoch) (``hwkd.data.set_epoch``
        moves it on), augmented unless ``augment=False``, and a last batch of one is dropped.
        ``train=False``: in order, no augmentation. Pinned memory when ``device`` is CUDA.
        """
        idx = self._indices(split)
        aug = (self.augment if (train if augment is None else augment) else "none")
        view = SplitView(self.source, idx, self.preprocessing, None if aug == "none" else aug, seed)
        sampler = EpochBatchSampler(len(idx), batch_size, shuffle=train, seed=seed, epoch=epoch, drop_below=2 if train else 0)
        n_workers = self.workers if workers is None else workers
        accelerator = device is not None and torch.device(device).type == "cuda"
        if n_workers < 0:
            n_workers = auto_workers(self.source.kind, len(idx), batch_size, accelerator)
        elif len(idx) <= 2 * batch_size:
            n_workers = 0  # starting processes costs more than decoding two batches
        return make_loader(
            view,
            sampler,
            workers=n_workers,
            pin_memory=accelerator,
            persistent=train if persistent is None else persistent,
            seed=seed,
        )

    def eval_batches(self, split: str, batch_size: int = 256, limit: int | None = None, device: Any = None):
        """(x, y) batches of ``split`` in order, preprocessed, no augmentation (re-iterable).

        ``limit`` keeps only the first ``limit`` images (e.g. a quick teacher check on a big split).
        """
        if limit is not None and limit < self.split_size(split):
            sub = Dataset(self.name, self.source, {split: self._indices(split)[:limit]}, self.labels,
                          self.preprocessing, augment=self.augment, workers=self.workers)  # fmt: skip
            return sub.loader(split, train=False, batch_size=batch_size, device=device, persistent=False)
        return self.loader(split, train=False, batch_size=batch_size, device=device, persistent=False)

    def sample(self, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed random subset of ``n`` images (sorted by index), preprocessed, no augmentation."""
        idx = self._indices(split)
        if len(idx) == 0:
            raise DataError(f"The {split} split is empty; nothing to sample.")
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.permutation(len(idx))[: max(1, min(int(n), len(idx)))])
        view = SplitView(self.source, idx, self.preprocessing, None, seed)
        return view.__getitems__([(0, int(p)) for p in pick])

    def example_input(self, n: int = 1) -> torch.Tensor:
        """The first ``n`` validation images, (n, C, H, W): shapes for tracing, export and estimates."""
        if n == 1 and self._example is not None:
            return self._example
        split = "val" if self.split_size("val") else "train"
        view = SplitView(self.source, self._indices(split), self.preprocessing, None, 0)
        x = view.__getitems__([(0, p) for p in range(min(n, len(view)))])[0]
        if n == 1:
            self._example = x
        return x

    # --- description ---------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "train": self.split_size("train"),
            "val": self.split_size("val"),
            "test": self.split_size("test"),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "augment": self.augment,  # what training added (auto resolves by source and image size)
        }
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def fingerprint(self) -> str:
        """Hash of everything that decides the tensors (pixels or file stats, splits, preprocessing)."""
        h = hashlib.sha256()
        self.source.digest(h)
        h.update(np.ascontiguousarray(self.source.y).tobytes())
        for k in SPLITS:
            h.update(k.encode())
            h.update(self.splits[k].tobytes())
        h.update(self.preprocessing.to_json().encode())
        h.update(self.augment.encode())
        return h.hexdigest()[:16]


__all__ += ["set_epoch"]


def load_dataset(
    source: str | None,
    image_size: int | None = None,
    seed: int = 0,
    data_cfg: DataConfig | None = None,
    teacher_arch: str | None = None,
    user_teacher: bool = False,
) -> Dataset:
    """Read, split and decide the preprocessing of a dataset (nothing is decoded wholesale).

    ``source``: None or "digits" (embedded), an image folder (one subfolder per class, or an
    ImageNet-style ``train/`` + ``val/`` [+ ``test/``] layout, used as given) or a ``.npz`` with ``x``
    and ``y`` (optionally ``labels``). Without a layout the split is a stratified, seeded 70/15/15.
    ``teacher_arch`` (``torchvision:NAME`` / ``timm:NAME``) gives the default normalisation;
    ``user_teacher`` makes a fitted normalisation a warning (the teacher was trained elsewhere).
    """
    cfg = data_cfg or DataConfig()
    check_data_config(cfg)
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
        raise DataError(f"The image size must be a positive integer, got {image_size!r}.")
    notes: list[str] = []
    if source is None or source == "digits":
        from hwkd.data.digits import load_digits_raw

        raw = load_digits_raw()
        return _array_dataset(raw, "digits", (DEFAULT_IMAGE_SIZE,) * 2, seed, cfg, image_size, None, False, notes)
    path = Path(source).expanduser()
    fix = (
        "Pass an image folder (one subfolder per class), a .npz file with 'x' and 'y' arrays, "
        "or leave the data argument out to use the built-in digits."
    )
    if not path.exists():
        raise DataError(f"The dataset path {str(source)!r} does not exist.", fix)
    if path.is_dir():
        return _folder_dataset(path, seed, cfg, image_size, teacher_arch, user_teacher)
    if path.suffix.lower() == ".npz":
        raw = load_npz(path)
        default = raw.native_size() or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
        return _array_dataset(raw, path.name, default, seed, cfg, image_size, teacher_arch, user_teacher, notes)
    raise DataError(f"The dataset file {str(source)!r} has an unsupported type {path.suffix!r}.", fix)


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


def _array_dataset(raw: RawData, name, default, seed, cfg, image_size, arch, user_teacher, notes) -> Dataset:
    train, val, test = split_indices(raw.y, seed, raw.where, raw.labels)
    source = ArraySource(np.asarray(raw.images, dtype=np.float32), raw.y)
    geometry = geometry_from(cfg, image_size, default)
    prep = _preprocessing(cfg, raw.scale, source.channels, geometry, arch, antialias=False)
    splits = {"train": train, "val": val, "test": test}
    augment = "affine" if cfg.augment == "auto" else cfg.augment
    prep = _normalisation(prep, cfg, source, train, arch, user_teacher, name, notes)
    return Dataset(name, source, splits, raw.labels, prep, augment=augment, workers=cfg.workers, notes=notes)


def _folder_dataset(path: Path, seed, cfg, image_size, arch, user_teacher) -> Dataset:
    from hwkd.data.preprocess import vision

    vision()  # image folders decode through torchvision.transforms.v2: fail now, naming the extra
    notes: list[str] = []
    layout = folder_layout(path)
    if layout is None:
        files = list_image_folder(path)
        train, val, test = split_indices(files.y, seed, files.where, files.labels)
        notes.append("stratified 70/15/15 split (seeded)")
    else:
        parts = {"train": list_image_folder(layout["train"])}
        labels = parts["train"].labels
        for k in ("val", "test"):
            if k in layout:
                parts[k] = list_image_folder(layout[k], labels)
        files = _concat(parts)
        bounds = np.cumsum([0] + [len(parts[k]) for k in parts])
        ranges = {k: np.arange(bounds[i], bounds[i + 1]) for i, k in enumerate(parts)}
        if "val" not in parts:
            train, val, test = (ranges["train"][i] for i in split_indices(files.y, seed, files.where, files.labels))
            notes.append("train/ only: stratified 70/15/15 split of it (seeded)")
        else:
            train, val = ranges["train"], ranges["val"]
            test = ranges.get("test", val)
            notes.append("train/ and val/" + (" and test/ used as given" if "test" in parts else
                         " used as given; no test/, so test accuracy is measured on val/"))  # fmt: skip
    source = FileSource(files)
    geometry = geometry_from(cfg, image_size, (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))
    prep = _preprocessing(cfg, 1.0 / 255.0, source.channels, geometry, arch, antialias=True)
    augment = auto_augment(prep.output_size) if cfg.augment == "auto" else cfg.augment
    prep = _normalisation(prep, cfg, source, train, arch, user_teacher, str(path), notes, cfg.stats_images, seed)
    return Dataset(path.name, source, {"train": train, "val": val, "test": test}, files.labels, prep,
                   augment=augment, workers=cfg.workers, notes=notes)  # fmt: skip


# At or below this many pixels a side, image folders are augmented as CIFAR is (pad_crop_flip), above it as
# ImageNet is (RandomResizedCrop). On CIFAR-10 at 32 px, RandomResizedCrop cost the 23.6k student 3.1 points
# (docs/decisions-issue14.md, stop 21).
SMALL_IMAGE_PX = 64


def auto_augment(output_size) -> str:
    """``data.augment = auto`` for an image folder: the augmentation the field uses at this image size."""
    return "pad_crop_flip" if min(output_size) <= SMALL_IMAGE_PX else "crop_flip"


def _concat(parts: dict[str, FileList]) -> FileList:
    lists = list(parts.values())
    gray = all(f.mode == "L" for f in lists)
    return FileList(
        paths=np.concatenate([f.paths for f in lists]),
        y=np.concatenate([f.y for f in lists]),
        labels=lists[0].labels,
        mode="L" if gray else "RGB",
        where=lists[0].where,
        sizes=np.concatenate([f.sizes for f in lists]),
    )


def _preprocessing(cfg, scale, channels, geometry, arch, antialias) -> Preprocessing:
    """The recipe before mean/std are known (unit normalisation)."""
    stated = stated_normalization(cfg, channels, arch)
    interpolation = cfg.interpolation or (stated[3] if stated and stated[3] else "bilinear")
    return Preprocessing(
        scale=float(scale),
        resize=tuple(geometry["resize"]),
        interpolation=interpolation,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        resize_mode=geometry["resize_mode"],
        crop=geometry["crop"],
        channel_order=cfg.channel_order,
        antialias=antialias,
    )


def _normalisation(prep, cfg, source, train, arch, user_teacher, where, notes, limit=None, seed=0) -> Preprocessing:
    """Stated mean/std (flags, teacher architecture) or fitted on (a sample of) the training split."""
    stated = stated_normalization(cfg, source.channels, arch)
    if stated is not None:
        notes.append(f"normalisation: {stated[2]}")
        return dataclasses.replace(prep, mean=rounded(stated[0]), std=rounded(stated[1]))
    idx = np.asarray(train)
    if limit is not None and len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).permutation(idx)[:limit])
    mean, std = _fit_stats(SplitView(source, idx, prep, None, 0))
    prep = dataclasses.replace(prep, mean=rounded(mean), std=rounded(std))
    what = f"mean/std fitted on {len(idx)} training images"
    notes.append(f"normalisation: {what}")
    if user_teacher:
        log.warning(
            "normalising the data with %s (mean %s, std %s): if your teacher was trained with other values, "
            "pass them (e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225, or [data] mean/std in the recipe)",
            what,
            ",".join(f"{v:.4g}" for v in prep.mean),
            ",".join(f"{v:.4g}" for v in prep.std),
        )
    return prep


def _fit_stats(view: SplitView, batch: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std over a view, a batch at a time in float64."""
    total = sq = None
    count = 0
    for start in range(0, len(view), batch):
        x = view.__getitems__([(0, p) for p in range(start, min(len(view), start + batch))])[0].double()
        s, q = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    var = (sq - count * mean * mean) / max(1, count - 1)
    return mean.tolist(), var.clamp_min(1e-12).sqrt().clamp_min(1e-6).tolist()


def check_compatible(model: torch.nn.Module, dataset: Dataset) -> None:
    """Run ``model`` on two validation images; raise DataError if it fails or the output is not (2, K).

    The model runs in eval mode under no_grad (BatchNorm statistics are left untouched) and its
    train/eval mode is restored afterwards.
    """
    x = dataset.example_input(2)
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
