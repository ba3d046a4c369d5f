"""The digits' augmentation: a random affine of a whole batch in one ``affine_grid`` + ``grid_sample``.

Natural images get torchvision's RandomResizedCrop + flip instead (hwkd.data.loading); the affine
stays for digits and other in-memory arrays, where a flip would change the class (2 vs 5).
"""

from __future__ import annotations

import math

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
