"""Random affine augmentation of whole batches, as tensor ops on the batch's device (no per-image Python)."""

import math

import torch
import torch.nn.functional as F


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator,
    background: float,
    degrees: float = 10.0,
    shift: float = 2.0,
    scale: tuple[float, float] = (0.9, 1.1),
    elastic: float = 0.0,
) -> torch.Tensor:
    """Rotate by up to ``degrees``, shift by up to ``shift`` pixels and scale each image (N x 1 x H x W) on its
    own; the uncovered border is filled with ``background`` (the value of a black pixel after normalisation).

    ``elastic`` > 0 also bends each image smoothly: every pixel moves by up to ``elastic`` pixels, along a
    random displacement field drawn on a coarse 4 x 4 grid and upsampled (a cheap elastic distortion)."""
    n, _, height, _ = images.shape
    draw = torch.rand(n, 4, generator=generator, device=images.device) * 2 - 1  # uniform in [-1, 1)
    angle = draw[:, 0] * math.radians(degrees)
    zoom = (scale[0] + scale[1]) / 2 + draw[:, 1] * (scale[1] - scale[0]) / 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # the grid maps output to input: inverse zoom
    offset = draw[:, 2:] * shift * 2 / height  # pixels -> affine_grid's [-1, 1] coordinates
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if elastic:
        coarse = torch.rand(n, 2, 4, 4, generator=generator, device=images.device) * 2 - 1
        field = F.interpolate(coarse, size=images.shape[-2:], mode="bicubic", align_corners=True)
        grid = grid + field.permute(0, 2, 3, 1) * (elastic * 2 / height)
    # grid_sample fills with 0: shift so that 0 is the background, sample, shift back.
    return F.grid_sample(images - background, grid, align_corners=False) + background
