"""A tiny RGB image folder (one subfolder per class) that a small teacher learns at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_image_folder(root: Path, per_class: int = 12, size: int = 32) -> Path:
    """Three classes: a dominant colour channel plus stripes of a class-specific period, with noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("red", "green", "blue")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.int16)
            img[..., c] += 150
            img[np.arange(size) % (c + 2) == 0] += 40
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root
