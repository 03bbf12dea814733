"""Affine moves of whole batches as tensor ops on the batch's device (no per-image Python): random ones for
training, a fixed set of small ones for test-time augmentation."""

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
    grid = affine_grid(angle, zoom, draw[:, 2:] * shift, images.shape)
    if elastic:
        coarse = torch.rand(n, 2, 4, 4, generator=generator, device=images.device) * 2 - 1
        field = F.interpolate(coarse, size=images.shape[-2:], mode="bicubic", align_corners=True)
        grid = grid + field.permute(0, 2, 3, 1) * (elastic * 2 / height)
    # grid_sample fills with 0: shift so that 0 is the background, sample, shift back.
    return F.grid_sample(images - background, grid, align_corners=False) + background


def affine_grid(angle: torch.Tensor, zoom: torch.Tensor, shift: torch.Tensor, shape) -> torch.Tensor:
    """The sampling grid of a rotation by ``angle`` (radians), a scaling by ``zoom`` and a shift by ``shift``
    pixels (x, y) of each image (N values, N x 2) in a batch of ``shape`` (N x C x H x W)."""
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # the grid maps output to input: inverse zoom
    offset = shift * 2 / shape[-2]  # pixels -> affine_grid's [-1, 1] coordinates
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    return F.affine_grid(theta, list(shape), align_corners=False)


# Test-time augmentation: (degrees, x shift, y shift in pixels, zoom) of each view, in the order chosen on the
# validation split (docs/recipes.md, "Test-time augmentation"): --tta N averages the first N views.
TTA_VIEWS = (
    (0.0, 0.0, 0.0, 1.0),  # the image itself
    (0.0, 1.0, 0.0, 1.0),
    (0.0, -1.0, 0.0, 1.0),
    (0.0, 0.0, 1.0, 1.0),
    (0.0, 0.0, -1.0, 1.0),
    (8.0, 0.0, 0.0, 1.0),
    (-8.0, 0.0, 0.0, 1.0),
    (0.0, 0.0, 0.0, 1.1),
    (0.0, 0.0, 0.0, 0.9),
)


def tta_view(images: torch.Tensor, view: tuple[float, float, float, float]) -> torch.Tensor:
    """One view of pixel images (0..255, N x 28 x 28 or N x 1 x 28 x 28): float N x 1 x 28 x 28, moved as ``view``
    says, the uncovered border black (0)."""
    images = images.reshape(-1, 1, *images.shape[-2:]).float()
    if view == TTA_VIEWS[0]:
        return images
    degrees, dx, dy, zoom = view
    n, device = len(images), images.device
    angle, scale = torch.full((n,), math.radians(degrees), device=device), torch.full((n,), zoom, device=device)
    grid = affine_grid(angle, scale, torch.tensor([[dx, dy]], device=device).expand(n, 2), images.shape)
    return F.grid_sample(images, grid, align_corners=False)
