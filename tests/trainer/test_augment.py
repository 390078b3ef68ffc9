"""Batch augmentation: flips move image and mask together."""

from __future__ import annotations

import torch

from trainer.augment import AugmentSpec, augment_batch, random_affine

STILL = dict(max_rotate_deg=0.0, scale_range=(1.0, 1.0), intensity_scale=0.0,
             intensity_shift=0.0, noise_std=0.0)


def test_vertical_flip_moves_image_and_mask_together() -> None:
    image = torch.zeros(1, 2, 8, 8)
    image[0, :, 1, 5] = 1.0
    mask = torch.zeros(1, 8, 8, dtype=torch.uint8)
    mask[0, 1, 5] = 2
    spec = AugmentSpec(flip_prob=0.0, vflip_prob=1.0, **STILL)
    out, out_mask = augment_batch(image, mask, spec, torch.Generator().manual_seed(0))
    assert out_mask is not None and out_mask[0, 6, 5] == 2 and int(out_mask.sum()) == 2
    torch.testing.assert_close(out, image.flip(2))


def test_vertical_flip_is_drawn_after_the_other_transforms() -> None:
    # the angle, scale and left-right flip come first, so runs without the vertical flip
    # keep their transforms; with it every draw's y column is negated (flip, then rotate)
    plain = random_affine(16, AugmentSpec(), torch.Generator().manual_seed(3))
    flipped = random_affine(16, AugmentSpec(vflip_prob=1.0), torch.Generator().manual_seed(3))
    torch.testing.assert_close(flipped[:, :, 0], plain[:, :, 0])
    torch.testing.assert_close(flipped[:, :, 1], -plain[:, :, 1])


def test_depth_flip_reverses_the_context_channels_and_is_drawn_last() -> None:
    torch.manual_seed(0)
    image = torch.rand(6, 5, 8, 8)
    mask = (torch.rand(6, 8, 8) > 0.5).to(torch.uint8)
    out, out_mask = augment_batch(image, mask, AugmentSpec(flip_prob=0.0, depth_flip_prob=1.0,
                                                           **STILL),
                                  torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, image.flip(1))  # the centre channel stays in the middle
    assert out_mask is not None and torch.equal(out_mask, mask)
    # every other draw as without it; about half the samples flipped at 0.5
    plain, _ = augment_batch(image, mask, AugmentSpec(), torch.Generator().manual_seed(1))
    half, _ = augment_batch(image, mask, AugmentSpec(depth_flip_prob=0.5),
                            torch.Generator().manual_seed(1))
    flipped = [bool(torch.equal(h, p.flip(0))) for h, p in zip(half, plain, strict=True)]
    kept = [bool(torch.equal(h, p)) for h, p in zip(half, plain, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)
