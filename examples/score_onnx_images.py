"""Score an hwkd model.onnx on labelled images using only what the ONNX file says about itself.

No hwkd and no torch: the preprocessing comes from the model's ``hwkd.preprocessing`` metadata (resize,
center crop, scale, channel order, normalize, with PIL and numpy) and the class names from ``hwkd.labels``,
as a deployer's code would do it. Two sources of labelled images:

- an image folder, one subfolder per class (``--folder DIR``), optionally only the files a list names
  (``--list FILE``: paths relative to DIR, one per line, e.g. the CIFAR-10 benchmark's
  ``benchmarks/results/cifar10/split_test.txt``);
- the official CIFAR-10 test set in its binary version (``--cifar-bin cifar-10-batches-bin/test_batch.bin``:
  records of one label byte and 3,072 pixel bytes, read with numpy; the pickled Python version is not read,
  since unpickling a downloaded file can run code). Its labels are CIFAR-10's class order, matched to the
  model's labels by name.

    python examples/score_onnx_images.py benchmarks/results/cifar10/e30/rpi4_int8.onnx \\
        --folder ../shared/data/cifar10/train --list benchmarks/results/cifar10/split_test.txt
    python examples/score_onnx_images.py MODEL.onnx --cifar-bin cifar-10-batches-bin/test_batch.bin
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

PIL_FILTERS = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


def resize_and_crop(img: Image.Image, meta: dict) -> Image.Image:
    """resize ("exact" to H x W, or "shorter": the shorter side, aspect kept), then the center crop."""
    h, w = meta["resize"]
    if meta.get("resize_mode", "exact") == "shorter":
        short = h
        h, w = (short, int(short * img.width / img.height)) if img.height <= img.width else (int(short * img.height / img.width), short)
    img = img.resize((w, h), PIL_FILTERS[meta["interpolation"]])
    if meta.get("crop"):
        ch, cw = meta["crop"]
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        img = img.crop((left, top, left + cw, top + ch))
    return img


def normalize(x: np.ndarray, meta: dict) -> np.ndarray:
    """N x C x H x W pixels -> model input: x * scale -> channel order -> (x - mean) / std."""
    x = x.astype(np.float32) * meta["scale"]
    if meta.get("channel_order", "rgb") == "bgr":
        x = x[:, ::-1]
    mean = np.asarray(meta["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def load_image(path: Path, meta: dict, channels: int) -> np.ndarray:
    with Image.open(path) as img:
        img = resize_and_crop(img.convert("L" if channels == 1 else "RGB"), meta)
        arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def folder_images(root: Path, listing: Path | None) -> list[tuple[Path, str]]:
    """(path, class name) for every image of a class-per-subfolder tree, or for the files a list names."""
    if listing is not None:
        rel = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        return [(root / r, Path(r).parts[0]) for r in rel]
    return sorted((p, d.name) for d in root.iterdir() if d.is_dir()
                  for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip


def cifar_bin_images(paths: list[Path], meta: dict) -> tuple[np.ndarray, list[str]]:
    """CIFAR-10 binary batches -> (N x 3 x H x W pixels after the metadata's resize and crop, class names)."""
    records = np.concatenate([np.fromfile(p, dtype=np.uint8).reshape(-1, 1 + 3072) for p in paths])
    pixels = records[:, 1:].reshape(-1, 3, 32, 32)
    names = [CIFAR10_CLASSES[i] for i in records[:, 0]]
    if list(meta["resize"]) == [32, 32] and not meta.get("crop"):
        return pixels, names  # already the model's size: no resampling, as with a 32 px image file
    out = [np.asarray(resize_and_crop(Image.fromarray(p.transpose(1, 2, 0)), meta)).transpose(2, 0, 1) for p in pixels]
    return np.stack(out), names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", type=Path, help="image folder, one subfolder per class")
    src.add_argument("--cifar-bin", type=Path, nargs="+", help="CIFAR-10 binary batch file(s), e.g. test_batch.bin")
    parser.add_argument("--list", type=Path, help="with --folder: only these files (paths relative to the folder)")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    props = {p.key: p.value for p in onnx.load(args.model, load_external_data=False).metadata_props}
    meta, labels = json.loads(props["hwkd.preprocessing"]), json.loads(props["hwkd.labels"])
    channels = json.loads(props["hwkd.input_shape"])[0]
    if args.folder is not None:
        items = folder_images(args.folder, args.list)
        pixels = np.stack([load_image(p, meta, channels) for p, _ in items])
        truth = [name for _, name in items]
    else:
        pixels, truth = cifar_bin_images(args.cifar_bin, meta)
    unknown = sorted(set(truth) - set(labels))
    if unknown:
        raise SystemExit(f"classes {unknown} are not among the model's labels {labels}")
    x = normalize(pixels, meta)
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i : i + args.batch]})[0] for i in range(0, len(x), args.batch)])
    predicted = np.asarray(labels)[logits.argmax(1)]
    correct = predicted == np.asarray(truth)
    print(json.dumps({"model": args.model, "images": len(x), "accuracy": round(float(correct.mean()), 4),
                      "correct": int(correct.sum())}))  # fmt: skip


if __name__ == "__main__":
    main()
