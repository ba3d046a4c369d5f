"""examples/score_onnx_images.py: a deployer's scorer (no hwkd, no torch) for the committed CIFAR-10 models."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image

from hwkd.data.preprocess import Preprocessing

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "score_onnx_images.py"
MODEL = ROOT / "benchmarks" / "results" / "cifar10" / "e30" / "small_rpi4_0.32x_distill.epochs70_int8.onnx"


def _script():
    spec = importlib.util.spec_from_file_location("score_onnx_images", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(tmp_path: Path, n: int = 24):
    """n random 32 px RGB images as PNG files in class subfolders and as one CIFAR-10 binary batch."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    script = _script()
    listing = []
    for i, (img, label) in enumerate(zip(pixels, labels, strict=True)):
        rel = Path(script.CIFAR10_CLASSES[label]) / f"{i:03d}.png"
        (tmp_path / "folder" / rel.parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(tmp_path / "folder" / rel)
        listing.append(str(rel))
    (tmp_path / "list.txt").write_text("\n".join(listing[::2]) + "\n")
    records = np.concatenate([labels[:, None], pixels.reshape(n, -1)], axis=1)
    records.tofile(tmp_path / "test_batch.bin")
    return pixels, labels


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(MODEL), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cifar_binary_batch_reads_the_same_pixels_and_labels_as_the_image_files(tmp_path):
    pixels, labels = _images(tmp_path)
    script = _script()
    meta = json.loads({p.key: p.value for p in onnx.load(MODEL).metadata_props}["hwkd.preprocessing"])
    from_bin, names = script.cifar_bin_images([tmp_path / "test_batch.bin"], meta)
    assert np.array_equal(from_bin, pixels) and names == [script.CIFAR10_CLASSES[i] for i in labels]
    items = script.folder_images(tmp_path / "folder", None)
    from_files = np.stack([script.load_image(p, meta, 3) for p, _ in items])
    order = [int(p.stem) for p, _ in items]
    assert np.array_equal(from_files, pixels[order]) and [c for _, c in items] == [names[i] for i in order]
    # The script's normalisation is hwkd's own for these images (32 px: no resampling on either side).
    hwkd_input = Preprocessing.from_json(json.dumps(meta)).apply(torch.from_numpy(pixels)).numpy()
    assert np.allclose(script.normalize(pixels, meta), hwkd_input, atol=1e-6)


def test_folder_list_and_binary_batch_score_alike_from_the_command_line(tmp_path):
    _images(tmp_path)
    folder = _run("--folder", str(tmp_path / "folder"))
    binary = _run("--cifar-bin", str(tmp_path / "test_batch.bin"))
    assert folder["images"] == binary["images"] == 24 and folder["correct"] == binary["correct"]
    listed = _run("--folder", str(tmp_path / "folder"), "--list", str(tmp_path / "list.txt"))
    assert listed["images"] == 12
