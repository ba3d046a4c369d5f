"""Readers that turn a user's data (image folder, .npz arrays) into raw pixels plus labels.

They stop at raw pixels on purpose: scaling, resizing and normalization are one ``Preprocessing`` applied
in ``hwkd.data.dataset``, the same one written into the exported ONNX model's metadata.
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


def check_finite(x, where: str, offset: int = 0, what: str = "image") -> None:
    """Raise DataError naming ``where`` and the example index if ``x`` (a batch, N first) holds NaN/inf.

    Works on one item (pass its index as ``offset`` and a batch of one) or on a whole array, so a lazy
    dataset can call it per decoded item and an in-memory one once at load; NaN pixels otherwise
    surface minutes later as a traceback deep inside fake-quant.
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "fc":
        return  # integer / bool pixels are always finite
    finite = np.isfinite(arr.reshape(len(arr), -1)) if arr.ndim > 1 else np.isfinite(arr)[:, None]
    bad = np.flatnonzero(~finite.all(axis=1))
    if len(bad):
        first = int(bad[0])
        value = arr.reshape(len(arr), -1)[first][~finite[first]][0]
        raise DataError(
            f"{what.capitalize()} {offset + first} of {where!r} holds a non-finite value ({value}); "
            f"{len(bad)} {what}(s) in all do.",
            "Fix or drop those examples (NaN / inf pixels cannot be trained on or quantized).",
        )


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def load_image_folder(root: Path) -> RawData:
    """Read ``root/<class>/*.png|jpg|...`` (nested folders allowed); class names are the folder names.

    Images become grayscale ("L") when every image is grayscale, else RGB, so a folder of mixed images
    still yields one channel count.
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
    if empty:
        raise DataError(
            f"The class folder {str(root / empty[0])!r} contains no images.",
            "Remove it or add images to it; every subfolder of the image folder is a class.",
        )
    if len(files) < 2:
        raise DataError(
            f"The image folder {where!r} has a single class ({class_dirs[0].name!r}); classification "
            "needs at least 2.",
            layout,
        )

    images: list[Image.Image] = []
    y: list[int] = []
    for label, name in enumerate(files):
        for path in files[name]:
            try:
                with Image.open(path) as im:
                    im.load()
                    images.append(im.copy())
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
                raise DataError(
                    f"Cannot read the image file {str(path)!r} ({type(exc).__name__}: {exc}).",
                    "Delete or replace the file; it is not a readable image.",
                ) from exc
            y.append(label)

    mode = "L" if all(im.mode in _GRAY_MODES for im in images) else "RGB"
    arrays = []
    for im in images:
        a = np.asarray(im.convert(mode), dtype=np.float32)
        arrays.append(a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1)))
    stacked: np.ndarray | list[np.ndarray] = arrays
    if len({a.shape for a in arrays}) == 1:
        stacked = np.stack(arrays)
    return RawData(
        images=stacked, y=np.asarray(y, dtype=np.int64), labels=list(files), scale=1.0 / 255.0, where=where
    )


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
    check_finite(x, where)
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
