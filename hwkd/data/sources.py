"""Readers that turn a user's data into raw pixels plus labels: .npz arrays in memory, image folders
as a list of files (decoded one item at a time by the loader, never all at once).

They stop at raw pixels on purpose: scaling, resizing and normalization are one ``Preprocessing``
(hwkd.data.preprocess), the same one written into the exported ONNX model's metadata.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hwkd.errors import DataError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})
_LAYOUT_HINT = "x must be (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3."


@dataclass
class RawData:
    """Pixels before preprocessing.

    ``images`` is one NCHW array when all images share a size, else a list of CHW arrays (image folders
    with mixed sizes); ``scale`` maps the raw values to [0, 1]; ``where`` names the source in messages.
    """

    images: np.ndarray | list[np.ndarray]
    y: np.ndarray  # int64 class indices into labels
    labels: list[str]
    scale: float
    where: str

    def __len__(self) -> int:
        return len(self.y)

    @property
    def channels(self) -> int:
        return int(self.images[0].shape[0]) if isinstance(self.images, list) else int(self.images.shape[1])

    def native_size(self) -> tuple[int, int] | None:
        """(H, W) when every image has the same size, else None."""
        shapes = {tuple(im.shape[-2:]) for im in self.images} if isinstance(self.images, list) else None
        if shapes is None:
            return int(self.images.shape[2]), int(self.images.shape[3])
        return next(iter(shapes)) if len(shapes) == 1 else None

    def take(self, idx: np.ndarray) -> np.ndarray | list[np.ndarray]:
        if isinstance(self.images, list):
            return [self.images[int(i)] for i in idx]
        return self.images[idx]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


@dataclass
class FileList:
    """An image folder as paths and labels, nothing decoded: images are read per item by the loader.

    ``paths`` is a NumPy bytes array (not a list of str) so DataLoader workers forked from the main
    process do not copy it page by page through Python refcounts. ``mode`` is "L" when every image is
    grayscale, else "RGB"; ``sizes`` holds each image's (H, W) from its header.
    """

    paths: np.ndarray
    y: np.ndarray
    labels: list[str]
    mode: str
    where: str
    sizes: np.ndarray  # (N, 2) int32

    def __len__(self) -> int:
        return len(self.y)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def native_size(self) -> tuple[int, int] | None:
        if len(self.sizes) and (self.sizes == self.sizes[0]).all():
            return int(self.sizes[0, 0]), int(self.sizes[0, 1])
        return None

    def path(self, i: int) -> str:
        return self.paths[int(i)].decode("utf-8", "surrogateescape")


SPLIT_DIRS = ("train", "val", "test")


def folder_layout(root: Path) -> dict[str, Path] | None:
    """``{"train": root/train, "val": root/val[, "test": root/test]}`` for an ImageNet-style layout
    (``valid`` / ``validation`` also name the validation folder), ``{"train": ...}`` for a folder with
    only ``train/``, else None (a plain class-per-subfolder folder)."""
    sub = {d.name.lower(): d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if "train" not in sub or not any(d.is_dir() for d in sub["train"].iterdir()):
        return None
    layout = {"train": sub["train"]}
    for name, key in (("val", "val"), ("valid", "val"), ("validation", "val"), ("test", "test")):
        if name in sub and key not in layout:
            layout[key] = sub[name]
    extra = set(sub) - {"train", "val", "valid", "validation", "test"}
    if extra and "val" not in layout:
        return None  # "train" is one class among others
    return layout


def list_image_folder(root: Path, labels: list[str] | None = None) -> FileList:
    """List ``root/<class>/*.png|jpg|...`` (nested folders allowed); class names are the folder names.

    Only image headers are read (mode and size), so listing 50,000 files takes seconds and no pixels.
    ``labels`` fixes the class order (a val/ folder uses train/'s classes).
    """
    from PIL import Image, UnidentifiedImageError

    where = str(root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {d.name: sorted(p for p in d.rglob("*") if _is_image(p)) for d in class_dirs}
    total = sum(len(v) for v in files.values())
    layout = f"Put the images in one subfolder per class, e.g. {where}/cat/001.png and {where}/dog/001.png."
    if total == 0:
        loose = [p for p in root.iterdir() if _is_image(p)]
        problem = (
            f"The image folder {where!r} has images but no class subfolders."
            if loose
            else f"The image folder {where!r} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})."
        )
        raise DataError(problem, layout)
    empty = [name for name, v in files.items() if not v]
    if empty and labels is None:
        raise DataError(
            f"The class folder {str(root / empty[0])!r} contains no images.",
            "Remove it or add images to it; every subfolder of the image folder is a class.",
        )
    if labels is None:
        labels = list(files)
        if len(labels) < 2:
            raise DataError(
                f"The image folder {where!r} has a single class ({class_dirs[0].name!r}); classification "
                "needs at least 2.",
                layout,
            )
    else:
        unknown = [name for name, v in files.items() if v and name not in labels]
        if unknown:
            raise DataError(
                f"The folder {str(root / unknown[0])!r} is a class that the train/ folder does not have.",
                "Every class folder of val/ and test/ must also be in train/ (same names).",
            )
    paths: list[str] = []
    y: list[int] = []
    sizes: list[tuple[int, int]] = []
    gray = True
    for name, group in files.items():
        for path in group:
            try:
                with Image.open(path) as im:  # lazy: reads the header only
                    sizes.append((im.height, im.width))
                    gray = gray and im.mode in _GRAY_MODES
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
                raise DataError(
                    f"Cannot read the image file {str(path)!r} ({type(exc).__name__}: {exc}).",
                    "Delete or replace the file; it is not a readable image.",
                ) from exc
            paths.append(str(path))
            y.append(labels.index(name))
    return FileList(
        paths=np.array([p.encode("utf-8", "surrogateescape") for p in paths]),
        y=np.asarray(y, dtype=np.int64),
        labels=list(labels),
        mode="L" if gray else "RGB",
        where=where,
        sizes=np.asarray(sizes, dtype=np.int32).reshape(-1, 2),
    )


def read_image(path: str, mode: str) -> np.ndarray:
    """Decode one image file into a uint8 CHW array in ``mode`` ("L" or "RGB")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert(mode), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"Cannot read the image file {path!r} ({type(exc).__name__}: {exc}).",
            "Delete or replace the file; it is not a readable image.",
        ) from exc
    return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] in (1, 3):
            return x  # NCHW (also wins the ambiguous (N, 3, H, 3) case: channels-first is PyTorch's layout)
        if x.shape[3] in (1, 3):
            return x.transpose(0, 3, 1, 2)
    raise DataError(f"The array 'x' in {where!r} has shape {tuple(x.shape)}.", _LAYOUT_HINT)


def _scale_for(dtype: np.dtype) -> float:
    if dtype == np.uint8:
        return 1.0 / 255.0
    if dtype == np.uint16:
        return 1.0 / 65535.0
    return 1.0  # floats (assumed already in a sensible range), bools, other integers


def load_npz(path: Path) -> RawData:
    """Read a .npz with ``x`` (images) and ``y`` (labels), and optionally ``labels`` (class names).

    ``y`` holds integers (indices into ``labels`` when given) or strings; uint8 pixels are scaled by 1/255.
    """
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            missing = [k for k in ("x", "y") if k not in keys]
            if missing:
                raise DataError(
                    f"The file {where!r} has no array {missing[0]!r} (it has: {', '.join(keys) or 'none'}).",
                    "Save it with np.savez(PATH, x=images, y=labels), optionally labels=class_names.",
                )
            x = np.asarray(npz["x"])
            y = np.asarray(npz["y"])
            names = np.asarray(npz["labels"]) if "labels" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"Cannot read {where!r} as a NumPy .npz archive ({type(exc).__name__}: {exc}).",
            "Save it with np.savez(PATH, x=images, y=labels); object arrays are not accepted.",
        ) from exc

    if x.dtype.kind not in "biuf":
        raise DataError(f"The array 'x' in {where!r} has dtype {x.dtype}; pixels must be numbers.")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"In {where!r}, 'x' has {len(x)} examples but 'y' has shape {tuple(y.shape)}.",
            "'y' must be a 1-D array with one label per image in 'x'.",
        )
    images = _to_nchw(x, where)
    scale = _scale_for(x.dtype)

    if y.dtype.kind in "US":  # string labels: classes are the sorted unique names
        labels, y_idx = np.unique(y.astype(str), return_inverse=True)
        return RawData(np.asarray(images, np.float32), y_idx.astype(np.int64), list(labels), scale, where)
    if y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iub":
        raise DataError(f"The labels 'y' in {where!r} have dtype {y.dtype}; use integers or strings.")
    y = y.astype(np.int64)
    if names is not None:
        names = [str(n) for n in names.reshape(-1)]
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise DataError(
                f"The labels 'y' in {where!r} range over {y.min()}..{y.max()} but 'labels' names "
                f"{len(names)} classes.",
                "With a 'labels' array, 'y' must hold indices 0..len(labels)-1.",
            )
        return RawData(np.asarray(images, np.float32), y, names, scale, where)
    values, y_idx = np.unique(y, return_inverse=True)
    return RawData(
        np.asarray(images, np.float32), y_idx.astype(np.int64), [str(int(v)) for v in values], scale, where
    )
