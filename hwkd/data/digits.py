"""The embedded default dataset: scikit-learn's 1797 handwritten digits (8x8, values 0..16).

It ships inside scikit-learn, so ``hwkd compress`` works with no download and no data argument.
"""

from __future__ import annotations

import numpy as np

from hwkd.data.sources import RawData

DIGITS_SCALE = 1.0 / 16.0  # raw pixel values are integers 0..16
DIGITS_IMAGE_SIZE = 32  # upsampled so the zoo's strided stages have room; 8x8 is too small to downsample


def load_digits_raw() -> RawData:
    """Raw digits as NCHW float32 pixels in 0..16, int64 labels 0..9 and class names "0".."9"."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float32)[:, None]  # (1797, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    return RawData(
        images=x, y=y, labels=[str(int(t)) for t in bunch.target_names], scale=DIGITS_SCALE, where="digits"
    )
