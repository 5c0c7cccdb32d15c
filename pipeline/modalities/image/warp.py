"""The random affine warp of augmentation (pipeline/modalities/image/augment.py views). One
combined warp is faster than chained ops (STACK.md)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.modalities.image.config import Augment

DRAWS = 5  # uniforms per image: rotation, zoom, shift x and y, mirror


def warp(images: torch.Tensor, p: Augment, draws: np.ndarray) -> torch.Tensor:
    """One random affine warp per image of a float (N, C, S, S) batch in [0, 1]: rotation about
    the centre, zoom and shift (and a mirror for half of them when p.hflip), from each image's
    DRAWS uniforms in [0, 1) (`draws`, (N, DRAWS)), applied by one bilinear grid_sample (zeros
    outside). An image's output depends on its own draws alone.

    The sampling grid is built here in closed form: F.affine_grid's batched matmul took 3x as
    long as the sampling itself on 2 CPU cores. On the CPU the images go through in chunks of
    p.chunk, whose grid stays in cache (fresh multi-MB tensors per call cost page faults); on
    a GPU, in one go. The output does not depend on p.chunk.
    """
    n, _, h, w = images.shape
    device = images.device
    u = torch.from_numpy(draws).to(device, torch.float32)
    angle = ((2 * u[:, 0] - 1) * p.rotation_deg).deg2rad()
    scale = p.scale_min + (p.scale_max - p.scale_min) * u[:, 1]
    shift = (2 * u[:, 2:4] - 1) * p.translate  # a fraction of the side
    mirror = (torch.where(u[:, 4] < 0.5, -1.0, 1.0) if p.hflip
              else torch.ones(n, device=device))
    # In pixels about the centre, destination = A source + shift with A = rotate zoom mirror_x.
    # grid_sample wants, per destination pixel, its source in coordinates normalised to
    # [-1, 1] (x 2/w, y 2/h): source = M destination + b, M = D A^-1 D^-1, b = -M D shift.
    cos, sin = angle.cos() / scale, angle.sin() / scale
    m = torch.stack([cos * mirror, sin * mirror * (h / w), -sin * (w / h), cos], 1)  # M row-major
    shift = shift * 2  # D shift: a fraction of the side is twice that in normalised units
    b = -torch.stack([m[:, 0] * shift[:, 0] + m[:, 1] * shift[:, 1],
                      m[:, 2] * shift[:, 0] + m[:, 3] * shift[:, 1]], 1)
    coefficients = torch.cat([m, b], 1).to(images.dtype)[:, :, None, None]  # (n, 6, 1, 1)
    xs = (torch.arange(w, device=device, dtype=images.dtype) * 2 + 1) / w - 1  # pixel centres
    ys = ((torch.arange(h, device=device, dtype=images.dtype) * 2 + 1) / h - 1)[:, None]
    out = torch.empty_like(images)
    step = max(n, 1) if images.is_cuda else p.chunk
    for i in range(0, n, step):
        m00, m01, m10, m11, bx, by = coefficients[i:i + step].unbind(1)  # each (k, 1, 1)
        grid = torch.stack([m00 * xs + (m01 * ys + bx), m10 * xs + (m11 * ys + by)], -1)
        out[i:i + step] = F.grid_sample(images[i:i + step], grid, mode="bilinear",
                                        padding_mode="zeros", align_corners=False)
    return out
