"""Augmentations of a sparse image: whole-patch roll/flip and random-resized-crop cells.

Both are pure functions of the retained patches, their grid positions and a generator, so the
inverter only calls them and tests check them against rolling/cropping the full image.

* ``roll_flip_patches``: a roll by a multiple of the patch size is a permutation of the grid and a
  flip mirrors the grid and each patch; applied to the retained patches and their positions it
  equals rolling/flipping the whole image without touching it, and never mixes stopped neighbours
  into retained tokens (the authors' pixel rolls mix in up to half a patch).
* ``random_resized_crop_cells``: a random resized crop (and flip) of the whole image, then the K
  grid cells that best cover retained patches, so the token count stays K.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .tokens import PatchGrid, images_to_patches, indices_to_mask


def roll_flip_patches(kept: torch.Tensor, patches: torch.Tensor, grid: PatchGrid, jitter: float, flip: bool,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-patch roll (up to ``jitter`` of each side, rounded to patches) and per-image flip.

    Args:
        kept: ``(B, K)`` grid positions of ``patches``.
        patches: ``(B, K, C*p*p)`` patch values (any channel count).
        generator: CPU generator; draws the shifts, then the flips (the run's order of draws).

    Returns:
        ``(positions (B, K), patches)``: new grid positions, and the patches mirrored where flipped.
    """
    (gh, gw), (ph, pw) = grid.grid_size, grid.patch_size
    b = kept.shape[0]
    rows, cols = kept // gw, kept % gw
    max_shift = (round(jitter * gh), round(jitter * gw))
    if max(max_shift) > 0:
        shift = torch.stack([torch.randint(-m, m + 1, (b,), generator=generator) for m in max_shift], 1)
        # non_blocking: a small copy from pageable host memory needs no wait for the device queue.
        shift = shift.to(kept.device, non_blocking=True)
        rows = (rows + shift[:, :1]) % gh
        cols = (cols + shift[:, 1:]) % gw
    if flip:
        flipped = (torch.rand(b, generator=generator) < 0.5).to(kept.device, non_blocking=True)
        cols = torch.where(flipped[:, None], gw - 1 - cols, cols)
        # Mirroring a patch permutes its values: one gather per step (a flip then a select would take
        # two passes forward and three backward).
        within = torch.arange(patches.shape[-1], device=kept.device).view(-1, ph, pw)
        order = torch.where(flipped.view(b, 1, 1, 1), within.flip(-1), within).view(b, 1, -1)
        patches = patches.gather(2, order.expand(-1, patches.shape[1], -1))
    return rows * gw + cols, patches


def random_resized_crop_cells(images: torch.Tensor, kept: torch.Tensor, grid: PatchGrid,
                              crop_scale: tuple[float, float], flip: bool, generator: torch.Generator
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop (area in ``crop_scale``, aspect in [3/4, 4/3]) and flip of whole images.

    Args:
        images: ``(B, C, H, W)`` current images (retained and stopped pixels).
        kept: ``(B, K)`` retained grid positions.
        generator: CPU generator for the crop parameters.

    Returns:
        ``(cells (B, K), patches (B, K, C*p*p))``: the K cells of the augmented image that best
        cover retained patches (ascending), and their values. Stopped pixels can be seen inside a
        cell; gradients only reach whatever ``images`` was built from.
    """
    b, k = kept.shape
    ph, pw = grid.patch_size
    retained = indices_to_mask(kept, grid).to(images.dtype)
    retained = retained.repeat_interleave(ph, 1).repeat_interleave(pw, 2).unsqueeze(1)
    low, high = crop_scale
    area = low + torch.rand(b, generator=generator) * (high - low)
    log_ratio = (torch.rand(b, generator=generator) * 2 - 1) * math.log(4 / 3)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sx)
    ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sy)
    if flip:
        sx = torch.where(torch.rand(b, generator=generator) < 0.5, -sx, sx)
    zero = torch.zeros(b)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    theta = theta.to(images.device, images.dtype, non_blocking=True)
    sampling = F.affine_grid(theta, list(images.shape), align_corners=False)
    augmented = F.grid_sample(images, sampling, mode="bilinear", align_corners=False)
    coverage = F.grid_sample(retained, sampling, mode="bilinear", align_corners=False)
    coverage = F.avg_pool2d(coverage, grid.patch_size).flatten(1)
    cells = coverage.topk(k, dim=1).indices.sort(dim=1).values
    patches = images_to_patches(augmented, grid.patch_size)
    return cells, patches.gather(1, cells.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
