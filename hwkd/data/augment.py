"""Batched, CPU-friendly augmentation and batching over in-memory tensors.

Datasets here are small enough to live in memory as tensors, so there are no DataLoader workers: a
batch is an index into the tensor, and augmentation is one ``affine_grid`` + ``grid_sample`` call for
the whole batch (no per-image Python loops).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Randomly rotate (+-degrees), shift (+-translate of the image size) and zoom each image of a batch.

    Borders are filled by replicating the edge pixels, which for already-normalized tensors keeps the
    background value instead of introducing the (normalized) zero.

    Example::

        g = torch.Generator().manual_seed(0)
        xb = random_affine(xb, g)
    """
    n = x.shape[0]
    if n == 0:
        return x
    u = torch.rand(n, 4, generator=generator, dtype=torch.float32)
    angle = (u[:, 0] * 2 - 1) * math.radians(degrees)
    zoom = scale[0] + u[:, 1] * (scale[1] - scale[0])
    # affine_grid works in normalized coordinates [-1, 1], so a shift of t image sizes is 2t.
    tx = (u[:, 2] * 2 - 1) * translate * 2
    ty = (u[:, 3] * 2 - 1) * translate * 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], dim=1), torch.stack([sin, cos, ty], dim=1)], dim=1).to(
        device=x.device, dtype=x.dtype
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(xb, yb)`` mini-batches; a seeded ``generator`` makes the shuffle reproducible."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
