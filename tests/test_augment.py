"""mnist_lit.augment: random affine of whole batches."""

import torch

from mnist_lit.augment import random_affine


def blob_batch(n=8):
    images = torch.full((n, 1, 28, 28), -0.4)
    images[:, :, 10:18, 12:16] = 2.8
    return images


def test_identity_when_nothing_is_drawn():
    images = blob_batch()
    out = random_affine(images, torch.Generator().manual_seed(0), -0.4, degrees=0, shift=0, scale=(1, 1))
    assert torch.allclose(out, images, atol=1e-5)


def test_affine_moves_the_digit_keeps_the_background_and_is_seeded():
    images = blob_batch()
    out = random_affine(images, torch.Generator().manual_seed(1), background=-0.4)
    assert out.shape == images.shape
    assert torch.allclose(out[:, :, :3, :], torch.tensor(-0.4), atol=1e-5)  # the border stays background
    assert not torch.allclose(out, images, atol=1e-3)  # something moved
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # each image its own transform
    again = random_affine(images, torch.Generator().manual_seed(1), background=-0.4)
    assert torch.equal(out, again)
    mass = (images + 0.4).sum(dim=(1, 2, 3))
    assert torch.allclose((out + 0.4).sum(dim=(1, 2, 3)), mass, rtol=0.3)  # scaled by at most ~1.1^2


def test_elastic_bends_each_image_by_at_most_the_given_pixels():
    images = blob_batch()
    no_affine = {"degrees": 0, "shift": 0, "scale": (1, 1)}
    out = random_affine(images, torch.Generator().manual_seed(2), -0.4, elastic=1.5, **no_affine)
    assert not torch.allclose(out, images, atol=1e-3) and not torch.allclose(out[0], out[1], atol=1e-3)
    assert torch.allclose(out[:, :, :6, :], torch.tensor(-0.4), atol=1e-5)  # the blob (rows 10-17) moves <= 1.5 px
    assert torch.allclose(out[:, :, 20:, :], torch.tensor(-0.4), atol=1e-5)
    assert torch.equal(out, random_affine(images, torch.Generator().manual_seed(2), -0.4, elastic=1.5, **no_affine))
