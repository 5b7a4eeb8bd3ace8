"""Pixel priors (total variation, l2, input statistics) of the whole image at the cost of the retained pixels only.

The priors are sums over pixels and neighbouring pixel pairs of the *whole* image. Between two
stopping stages, every pair of two frozen pixels contributes a constant, so at each stage we
precompute, per image, those constants and the list of pairs touching a retained pixel. Each
iteration then gathers just those pairs from a small working vector, ``[retained pixels, frozen
pixels bordering them, 0]``, and adds the constants: values and gradients equal the dense
definition exactly (``tests/test_priors.py``), with work and memory proportional to the retained
patches instead of the image. Pairs inside a retained patch are plain slices of the parameter;
only the few pairs that cross a patch border are gathered by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import moment_distance, pixel_differences
from .tokens import PatchGrid

# Neighbour offsets (dy, dx) of DeepInversion's four TV directions: right, down, down-left, down-right.
_DIRECTIONS = ((0, 1), (1, 0), (1, -1), (1, 1))


def _pair_indices(grid: PatchGrid, channels: int, device: torch.device
                  ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each TV direction, the patch-layout flat indices ``(b, a)`` of every neighbour pair
    (the difference is ``b - a``) and whether the pair crosses a patch border."""
    (gh, gw), (ph, pw) = grid.grid_size, grid.patch_size
    h, w = gh * ph, gw * pw
    c = torch.arange(channels, device=device).view(-1, 1, 1)
    y = torch.arange(h, device=device).view(1, -1, 1)
    x = torch.arange(w, device=device).view(1, 1, -1)
    patch = (y // ph) * gw + x // pw
    offset = c * ph * pw + (y % ph) * pw + (x % pw)
    flat = patch * (channels * ph * pw) + offset  # (C, H, W): where each pixel lives in (N, D) layout
    pairs = []
    for dy, dx in _DIRECTIONS:
        ys, ye = 0, h - dy
        xs, xe = max(0, -dx), w - max(0, dx)
        a = flat[:, ys:ye, xs:xe].reshape(-1)
        b = flat[:, ys + dy:ye + dy, xs + dx:xe + dx].reshape(-1)
        patch_dim = channels * ph * pw
        pairs.append((b, a, b // patch_dim != a // patch_dim))
    return pairs


def _compact(mask: torch.Tensor, values: torch.Tensor, fill: int) -> torch.Tensor:
    """Per row, the entries of ``values`` where ``mask`` holds, left-aligned and padded with ``fill``."""
    counts = mask.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    picked = values.gather(1, order)
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(valid, picked, torch.full_like(picked, fill))


@dataclass
class RetainedPixelPriors:
    """Whole-image TV, l2 and input statistics of the current images, from the retained pixels and fixed
    constants.

    Built by ``plan`` at each stage; ``bind(param)`` gives the priors of one iteration.
    """

    border: torch.Tensor          # (B, M + 1) frozen pixels bordering retained ones, then a 0
    pairs: list[tuple[torch.Tensor, torch.Tensor]]  # per direction, (B, P) border-crossing pair indices
    fixed_square: torch.Tensor    # (4, B) sum of squared differences over frozen-frozen pairs
    fixed_abs: torch.Tensor       # (4, B) sum of absolute differences over frozen-frozen pairs
    pair_counts: list[int]        # per direction, pairs in the whole image (for TV_l1's means)
    frozen_square: torch.Tensor   # (B,) sum of squared frozen pixels
    frozen_channel_sums: torch.Tensor  # (2, C) sums of frozen pixels and of their squares, whole batch
    patch_shape: tuple[int, int, int]  # (C, ph, pw) of one patch
    pixels_per_channel: int       # B * H * W

    @classmethod
    def plan(cls, canvas: torch.Tensor, kept: torch.Tensor, grid: PatchGrid, channels: int) -> "RetainedPixelPriors":
        """Precompute for retained patches ``kept`` ``(B, K)`` of ``canvas`` ``(B, N, D)`` (values of every patch)."""
        b, n, d = canvas.shape
        k = kept.shape[1]
        device = canvas.device
        values = canvas.detach().reshape(b, n * d)
        retained = torch.zeros(b, n, dtype=torch.bool, device=device).scatter_(1, kept, True)
        slot = torch.full((b, n), -1, dtype=torch.long, device=device)
        slot.scatter_(1, kept, torch.arange(k, device=device).expand(b, -1))
        pixel_retained = retained.repeat_interleave(d, 1)  # (B, N*D)
        within = torch.arange(n * d, device=device) % d
        position = torch.where(pixel_retained, slot.repeat_interleave(d, 1) * d + within,
                               torch.full_like(slot.repeat_interleave(d, 1), -1))
        pairs_flat = _pair_indices(grid, channels, device)
        touches = torch.zeros(b, n * d, dtype=torch.int32, device=device)
        crossing_active, fixed_square, fixed_abs, crossing_pairs = [], [], [], []
        for a, c, crossing in pairs_flat:
            active = pixel_retained[:, a] | pixel_retained[:, c]
            diff = values[:, a] - values[:, c]
            fixed_square.append(diff.pow(2).masked_fill(active, 0).sum(1))
            fixed_abs.append(diff.abs().masked_fill(active, 0).sum(1))
            # Active pairs inside a patch are slices of the parameter; gather only border-crossing ones.
            a, c, active = a[crossing], c[crossing], active[:, crossing]
            for end in (a, c):
                touches.scatter_add_(1, end.expand(b, -1), (active & ~pixel_retained[:, end]).to(torch.int32))
            crossing_pairs.append((a, c))
            crossing_active.append(active)
        # Working vector: [retained pixels (K*D), frozen pixels bordering them (M), zero]. Padding
        # entries point at a dummy column n*d, so they never collide with real pixels.
        border_ids = _compact(touches > 0, torch.arange(n * d, device=device).expand(b, -1).contiguous(), n * d)
        m = border_ids.shape[1]
        border = torch.cat([values, values.new_zeros(b, 1)], 1).gather(1, border_ids)
        position = torch.cat([position, position.new_full((b, 1), -1)], 1)
        position.scatter_(1, border_ids, (torch.arange(m, device=device) + k * d).expand(b, -1))
        zero_slot = k * d + m
        pairs = [(_compact(active, position[:, a], zero_slot), _compact(active, position[:, c], zero_slot))
                 for (a, c), active in zip(crossing_pairs, crossing_active)]
        border = torch.cat([border, border.new_zeros(b, 1)], 1)
        frozen = values.masked_fill(pixel_retained, 0).view(b, n, channels, -1)
        frozen_square = frozen.pow(2).sum(dim=(1, 2, 3))
        channel_sums = torch.stack([frozen.sum(dim=(0, 1, 3)), frozen.pow(2).sum(dim=(0, 1, 3))])
        return cls(border=border, pairs=pairs, fixed_square=torch.stack(fixed_square),
                   fixed_abs=torch.stack(fixed_abs), pair_counts=[a.numel() for a, _, _ in pairs_flat],
                   frozen_square=frozen_square, frozen_channel_sums=channel_sums,
                   patch_shape=(channels, *grid.patch_size), pixels_per_channel=b * n * d // channels)

    def bind(self, param: torch.Tensor) -> "BoundPriors":
        """The priors of the images whose retained patches hold ``param`` ``(B, K, D)``."""
        return BoundPriors(self, param)


class BoundPriors:
    """TV and l2 values of one iteration (same interface as ``ImagePriors``)."""

    def __init__(self, plan: RetainedPixelPriors, param: torch.Tensor) -> None:
        self.plan, self.param = plan, param
        self._diffs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _differences(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per direction: ``(differences inside retained patches (B, K, ...), crossing differences (B, P))``."""
        if self._diffs is None:
            b, k, _ = self.param.shape
            inside = pixel_differences(self.param.reshape(b * k, *self.plan.patch_shape))
            work = torch.cat([self.param.reshape(b, -1), self.plan.border], 1)
            self._diffs = [(d.reshape(b, -1), work.gather(1, a) - work.gather(1, c))
                           for d, (a, c) in zip(inside, self.plan.pairs)]
        return self._diffs

    def tv_l2(self) -> torch.Tensor:
        fixed = self.plan.fixed_square
        return sum((inside.pow(2).sum(1) + crossing.pow(2).sum(1) + fixed[i]).clamp_min(1e-20).sqrt()
                   for i, (inside, crossing) in enumerate(self._differences())).mean()

    def tv_l1(self) -> torch.Tensor:
        plan = self.plan
        return sum((inside.abs().sum(1) + crossing.abs().sum(1) + plan.fixed_abs[i]) / plan.pair_counts[i]
                   for i, (inside, crossing) in enumerate(self._differences())).mean()

    def l2(self) -> torch.Tensor:
        return (self.param.pow(2).flatten(1).sum(1) + self.plan.frozen_square).clamp_min(1e-20).sqrt().mean()

    def input_stats(self) -> torch.Tensor:
        b, k, _ = self.param.shape
        channels = self.param.view(b, k, self.plan.patch_shape[0], -1)
        frozen_sum, frozen_square = self.plan.frozen_channel_sums
        return moment_distance(channels.sum(dim=(0, 1, 3)) + frozen_sum,
                               channels.pow(2).sum(dim=(0, 1, 3)) + frozen_square, self.plan.pixels_per_channel)
