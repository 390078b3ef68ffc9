"""Batch augmentation in torch: one random affine per sample, applied to image and mask alike.

Geometry (horizontal flip, rotation, isotropic scale) goes through one ``affine_grid`` so the
image (bilinear) and its class map (nearest) stay aligned; then intensity scale/shift and
Gaussian noise on the image only. Runs on whatever device the batch is on; the random draws come
from a CPU generator, so a seed gives the same augmentations on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of the random transforms; zero disables one. Intensities are in model units."""

    flip_prob: float = 0.5  # left-right
    vflip_prob: float = 0.0  # front-back (up-down in the image)
    max_rotate_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    intensity_scale: float = 0.05  # multiply by 1 +- this
    intensity_shift: float = 0.05  # add +- this
    noise_std: float = 0.02
    #: through-plane (head-foot) flip: the channels (2.5D context, above and below the slice)
    #: in reverse order; the centre slice and the mask are unchanged
    depth_flip_prob: float = 0.0


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def random_affine(n: int, spec: AugmentSpec, gen: torch.Generator) -> torch.Tensor:
    """``n`` affine matrices (n, 2, 3) in ``affine_grid``'s normalised coordinates."""
    angle = _uniform(n, -1.0, 1.0, gen) * math.radians(spec.max_rotate_deg)
    scale = _uniform(n, *spec.scale_range, gen)
    flip = torch.where(torch.rand(n, generator=gen) < spec.flip_prob, -1.0, 1.0)
    # Drawn only when asked for, so runs without it keep their random stream.
    vflip = (torch.where(torch.rand(n, generator=gen) < spec.vflip_prob, -1.0, 1.0)
             if spec.vflip_prob > 0 else torch.ones(n))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin * vflip
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos * vflip
    return theta


def augment_batch(images: torch.Tensor, masks: torch.Tensor | None, spec: AugmentSpec,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment ``images`` (N, 1, H, W) float and optional ``masks`` (N, H, W) integer.

    Raises:
        ValueError: the shapes do not match.
    """
    if images.ndim != 4:
        raise ValueError(f"augment: images must be (N, C, H, W), got {tuple(images.shape)}")
    if masks is not None and (masks.shape[0], *masks.shape[1:]) != (images.shape[0],
                                                                     *images.shape[2:]):
        raise ValueError(f"augment: mask shape {tuple(masks.shape)} does not match images "
                         f"{tuple(images.shape)}")
    n, device = images.shape[0], images.device
    theta = random_affine(n, spec, gen).to(device=device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    out_masks = None
    if masks is not None:
        warped = F.grid_sample(masks[:, None].to(images.dtype), grid, mode="nearest",
                               padding_mode="zeros", align_corners=False)
        out_masks = warped[:, 0].round().to(masks.dtype)
    gain = (1.0 + _uniform(n, -spec.intensity_scale, spec.intensity_scale, gen)).to(device)
    shift = _uniform(n, -spec.intensity_shift, spec.intensity_shift, gen).to(device)
    out = out * gain.view(n, 1, 1, 1).to(out.dtype) + shift.view(n, 1, 1, 1).to(out.dtype)
    if spec.noise_std > 0:
        noise = torch.randn(out.shape, generator=gen).to(device=device, dtype=out.dtype)
        out = out + spec.noise_std * noise
    if spec.depth_flip_prob > 0:  # drawn last, so the other draws stay those of runs without
        flip = (torch.rand(n, generator=gen) < spec.depth_flip_prob).to(device)
        out = torch.where(flip.view(n, 1, 1, 1), out.flip(1), out)
    return out, out_masks
