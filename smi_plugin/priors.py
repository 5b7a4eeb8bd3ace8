"""Pixel priors (total variation, l2, input statistics) of the whole image at the cost of the retained pixels only.

The priors are sums over pixels and over neighbouring pixel pairs of the *whole* image. A pair of
neighbours lies inside one patch or crosses into a neighbouring patch; the crossing pairs fall into
eight groups (a TV direction and the neighbour's offset on the grid), and within a group every edge
between two patches pairs the same in-patch pixels. Between two stopping stages a pair of two frozen
pixels contributes a constant, so ``RetainedPixelPriors.plan`` computes, per image and per stage:

* the constants (frozen-frozen pairs, frozen pixels' squares and channel sums);
* the crossing pairs that touch a retained patch, listed edge by edge (patch granularity, then the
  group's fixed pixel offsets), as indices into ``[param, 0]`` plus the frozen end's value.

Each iteration then takes the pairs inside retained patches as slices of the parameter and gathers
the listed crossing pairs; ``_SquaredDifferences`` does the forward and the backward of all four
directions with a handful of tensor operations (autograd would create and zero-fill a buffer per
slice and per gather). Values and gradients equal the dense definition exactly
(``tests/test_priors.py``); dense inversion is the case where every patch is retained.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .losses import moment_distance, pixel_differences
from .tokens import PatchGrid, images_to_patches, patches_to_images

# DeepInversion's four TV directions as (dy, dx) from a pair's first pixel to its second:
# right, down, down-left, down-right (the order of ``losses.pixel_differences``).
DIRECTIONS = ((0, 1), (1, 0), (1, -1), (1, 1))
# Per direction, (second, first) slices of a (..., h, w) tile: second - first is the difference.
_FULL, _HEAD, _TAIL = slice(None), slice(None, -1), slice(1, None)
_SLICES = (((..., _FULL, _TAIL), (..., _FULL, _HEAD)), ((..., _TAIL, _FULL), (..., _HEAD, _FULL)),
           ((..., _TAIL, _HEAD), (..., _HEAD, _TAIL)), ((..., _TAIL, _TAIL), (..., _HEAD, _HEAD)))


@dataclass(frozen=True)
class CrossingGroup:
    """Pairs of one direction that cross from a patch into its neighbour at one grid offset.

    ``first``/``second``: ``(E,)`` patch indices of every such edge on the grid; ``first_offset``/
    ``second_offset``: ``(L,)`` the paired pixels' offsets inside their patches (``(C, ph, pw)`` layout).
    """

    direction: int
    first: torch.Tensor
    second: torch.Tensor
    first_offset: torch.Tensor
    second_offset: torch.Tensor


@lru_cache(maxsize=16)
def crossing_groups(grid: PatchGrid, channels: int) -> tuple[CrossingGroup, ...]:
    """The crossing-pair groups of a grid (static; cached), in direction order."""
    (gh, gw), (ph, pw) = grid.grid_size, grid.patch_size
    groups = []
    for direction, (dy, dx) in enumerate(DIRECTIONS):
        offsets: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        for i in range(ph):
            for j in range(pw):
                y, x = i + dy, j + dx
                step = (y // ph, x // pw)
                if step != (0, 0):
                    first, second = offsets.setdefault(step, ([], []))
                    first.append(i * pw + j)
                    second.append((y % ph) * pw + x % pw)
        for (oy, ox), (first, second) in sorted(offsets.items()):
            rows = torch.arange(max(0, -oy), gh - max(0, oy))
            cols = torch.arange(max(0, -ox), gw - max(0, ox))
            edges = (rows.view(-1, 1) * gw + cols.view(1, -1)).reshape(-1)
            channel = torch.arange(channels).view(-1, 1) * (ph * pw)
            groups.append(CrossingGroup(direction, edges, edges + oy * gw + ox,
                                        (channel + torch.tensor(first)).reshape(-1),
                                        (channel + torch.tensor(second)).reshape(-1)))
    return tuple(groups)


def _first_true(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the column indices where ``mask`` holds, left-aligned, and which of them are real
    (``(B, W)`` each, ``W`` the largest count)."""
    counts = mask.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    return order, torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)


@dataclass
class RetainedPixelPriors:
    """Whole-image TV, l2 and input statistics of the current images, from the retained pixels and
    per-stage constants.

    Built by ``plan`` at each stage (and at the start, with every patch retained); ``bind(param)``
    gives the priors of one iteration.
    """

    first: torch.Tensor            # (B, P) crossing pairs' first pixels in [param, 0] (frozen ends: the 0)
    second: torch.Tensor           # (B, P) their second pixels
    ends: torch.Tensor             # (B, 2P) second, then first: where the backward scatters
    points_at_zero: bool           # whether any index is the appended 0 (else param is read in place)
    frozen_difference: torch.Tensor  # (B, P) second - first of the frozen ends' values (0 for retained ends)
    widths: tuple[int, ...]        # P split by direction
    fixed_square: torch.Tensor     # (B, 4) sum of squared differences over frozen-frozen pairs
    fixed_abs: torch.Tensor        # (B, 4) sum of absolute differences over frozen-frozen pairs
    pair_counts: tuple[int, ...]   # per direction, pairs in the whole image (for TV_l1's means)
    frozen_square: torch.Tensor    # (B,) sum of squared frozen pixels
    frozen_channel_sums: torch.Tensor  # (2, C) sums of frozen pixels and of their squares, whole batch
    patch_shape: tuple[int, int, int]  # (C, ph, pw) of one patch
    pixels_per_channel: int        # B * H * W
    whole_images: PatchGrid | None = None  # set when param is every patch in grid order: pairs are read
    # from the image itself (no crossing lists), which is cheaper than gathering every patch border

    @classmethod
    def plan(cls, canvas: torch.Tensor, kept: torch.Tensor, grid: PatchGrid, channels: int) -> "RetainedPixelPriors":
        """Precompute for retained patches ``kept`` ``(B, K)`` of ``canvas`` ``(B, N, D)`` (values of every patch)."""
        b, n, d = canvas.shape
        k = kept.shape[1]
        device = canvas.device
        values = canvas.detach()
        retained = torch.zeros(b, n, dtype=torch.bool, device=device).scatter_(1, kept, True)
        slot = torch.zeros(b, n, dtype=torch.long, device=device).scatter_(1, kept, torch.arange(k, device=device)
                                                                         .expand(b, -1).contiguous())
        frozen = ~retained
        inside = pixel_differences(values.reshape(b, n, channels, *grid.patch_size))
        fixed_square = torch.stack([(diff.pow(2).flatten(2).sum(2) * frozen).sum(1) for diff in inside], 1)
        fixed_abs = torch.stack([(diff.abs().flatten(2).sum(2) * frozen).sum(1) for diff in inside], 1)
        whole = k == n and bool((kept == torch.arange(n, device=device)).all())
        flat = values.reshape(b, n * d)
        zero = k * d  # the index of the 0 appended to the flattened parameter
        no_pairs = flat.new_zeros(b, 0, dtype=torch.long)
        firsts, seconds, differences = [no_pairs], [no_pairs], [flat.new_zeros(b, 0)]
        widths = [0] * len(DIRECTIONS)
        for group in () if whole else crossing_groups(grid, channels):
            first_patch, second_patch = group.first.to(device), group.second.to(device)
            first_offset, second_offset = group.first_offset.to(device), group.second_offset.to(device)
            first_values, second_values = (
                flat.index_select(1, (patch.view(-1, 1) * d + offset).reshape(-1)).view(b, -1, offset.numel())
                for patch, offset in ((first_patch, first_offset), (second_patch, second_offset)))
            difference = second_values - first_values
            active = retained.index_select(1, first_patch) | retained.index_select(1, second_patch)  # (B, E)
            fixed_square[:, group.direction] += (difference.pow(2).sum(2) * ~active).sum(1)
            fixed_abs[:, group.direction] += (difference.abs().sum(2) * ~active).sum(1)
            edges, real = _first_true(active)  # the active edges, left-aligned per image
            ends = []
            for patch, offset, end_values in ((first_patch, first_offset, first_values),
                                              (second_patch, second_offset, second_values)):
                patch = patch[edges]  # (B, W)
                live = retained.gather(1, patch) & real
                index = torch.where(live.unsqueeze(-1), (slot.gather(1, patch) * d).unsqueeze(-1) + offset,
                                    torch.full((), zero, device=device))
                fixed = end_values.gather(1, edges.unsqueeze(-1).expand(-1, -1, offset.numel()))
                ends.append((index.flatten(1), torch.where((live | ~real).unsqueeze(-1), 0.0, fixed).flatten(1)))
            (first_index, first_fixed), (second_index, second_fixed) = ends
            firsts.append(first_index)
            seconds.append(second_index)
            differences.append(second_fixed - first_fixed)
            widths[group.direction] += first_index.shape[1]
        h, w = grid.image_size
        pair_counts = tuple(channels * (h - dy) * (w - abs(dx)) for dy, dx in DIRECTIONS)
        frozen_pixels = values.masked_fill(retained.unsqueeze(-1), 0).view(b, n, channels, -1)
        first, second = torch.cat(firsts, 1), torch.cat(seconds, 1)
        return cls(first=first, second=second, ends=torch.cat([second, first], 1),
                   points_at_zero=bool((first == zero).any() or (second == zero).any()),
                   frozen_difference=torch.cat(differences, 1), widths=tuple(widths),
                   fixed_square=fixed_square, fixed_abs=fixed_abs, pair_counts=pair_counts,
                   frozen_square=frozen_pixels.pow(2).sum(dim=(1, 2, 3)),
                   frozen_channel_sums=torch.stack([frozen_pixels.sum(dim=(0, 1, 3)),
                                                    frozen_pixels.pow(2).sum(dim=(0, 1, 3))]),
                   patch_shape=(channels, *grid.patch_size), pixels_per_channel=b * n * d // channels,
                   whole_images=grid if whole else None)

    def bind(self, param: torch.Tensor, with_abs: bool = False) -> "BoundPriors":
        """The priors of the images whose retained patches hold ``param`` ``(B, K, D)``; ``with_abs``
        also sums absolute differences (needed by ``tv_l1`` only)."""
        return BoundPriors(self, param, with_abs)


class _SquaredDifferences(torch.autograd.Function):
    """Per image and direction, the sums of squared (and, optionally, absolute) neighbour differences
    of the whole image, ``(B, 4)`` each; forward and backward in a few whole-tensor operations."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, plan: RetainedPixelPriors, with_abs: bool):
        b, k, _ = param.shape
        values = param.detach()
        if plan.whole_images is not None:
            tiles = patches_to_images(values, plan.whole_images, plan.patch_shape[0])
        else:
            tiles = values.reshape(b, k * plan.patch_shape[0], *plan.patch_shape[1:])
        inside = [tiles[second] - tiles[first] for second, first in _SLICES]
        work = values.reshape(b, -1)
        if plan.points_at_zero:  # frozen ends and padding read the appended 0
            work = torch.cat([work, param.new_zeros(b, 1)], 1)
        crossing = work.gather(1, plan.second) - work.gather(1, plan.first) + plan.frozen_difference
        parts = crossing.split(plan.widths, 1)
        square = torch.stack([torch.linalg.vector_norm(diff.view(b, -1), dim=1) for diff in inside], 1).square()
        square = square + torch.stack([part.square().sum(1) for part in parts], 1) + plan.fixed_square
        absolute = square.new_zeros(0)
        if with_abs:
            absolute = torch.stack([diff.abs().view(b, -1).sum(1) for diff in inside], 1)
            absolute = absolute + torch.stack([part.abs().sum(1) for part in parts], 1) + plan.fixed_abs
        ctx.save_for_backward(*inside, crossing, plan.ends)
        ctx.plan, ctx.tiles_shape, ctx.param_shape = plan, tiles.shape, param.shape
        return square, absolute

    @staticmethod
    def backward(ctx, grad_square: torch.Tensor, grad_abs: torch.Tensor):
        *inside, crossing, ends = ctx.saved_tensors
        plan: RetainedPixelPriors = ctx.plan
        b = crossing.shape[0]
        with_abs = grad_abs.numel() > 0  # autograd hands zeros for an unused output, never None

        def weights(diff: torch.Tensor, square_grad: torch.Tensor, abs_grad: torch.Tensor | None) -> torch.Tensor:
            # d(sum diff^2)/d diff = 2 diff; d(sum |diff|)/d diff = sign(diff).
            out = diff * (2 * square_grad)
            return out if abs_grad is None else out + abs_grad * diff.sign()

        if plan.whole_images is not None:
            grad = crossing.new_zeros(ctx.tiles_shape)
        else:
            # The crossing pairs scatter into a flat buffer (with the appended 0's slot when there is
            # one); the inside pairs then accumulate into the same buffer seen as tiles.
            widths = torch.tensor(plan.widths, device=crossing.device)

            def per_pair(direction_grad: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (B, P)
                return direction_grad.repeat_interleave(widths, dim=1, output_size=crossing.shape[1])

            w = weights(crossing, per_pair(grad_square), per_pair(grad_abs) if with_abs else None)
            size = ctx.tiles_shape.numel() // b
            flat = crossing.new_zeros(b, size + int(plan.points_at_zero))
            flat.scatter_add_(1, ends, torch.cat([w, -w], 1))
            grad = flat[:, :size].view(ctx.tiles_shape)
        for direction, (diff, (second_slice, first_slice)) in enumerate(zip(inside, _SLICES)):
            w = weights(diff, grad_square[:, direction].view(b, 1, 1, 1),
                        grad_abs[:, direction].view(b, 1, 1, 1) if with_abs else None)
            grad[second_slice] += w
            grad[first_slice] -= w
        if plan.whole_images is not None:
            return images_to_patches(grad, plan.whole_images.patch_size), None, None
        return grad.view(ctx.param_shape), None, None


class BoundPriors:
    """TV, l2 and input-statistics values of one iteration."""

    def __init__(self, plan: RetainedPixelPriors, param: torch.Tensor, with_abs: bool = False) -> None:
        self.plan, self.param, self.with_abs = plan, param, with_abs
        self._sums: tuple[torch.Tensor, torch.Tensor] | None = None

    def _difference_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sums of squared differences, sums of absolute differences)``, ``(B, 4)`` each, computed once."""
        if self._sums is None:
            self._sums = _SquaredDifferences.apply(self.param, self.plan, self.with_abs)
        return self._sums

    def tv_l2(self) -> torch.Tensor:
        square, _ = self._difference_sums()
        return square.clamp_min(1e-20).sqrt().sum(1).mean()

    def tv_l1(self) -> torch.Tensor:
        _, absolute = self._difference_sums()
        if absolute.numel() == 0:
            raise ValueError("tv_l1 needs the absolute differences: bind the plan with with_abs=True")
        counts = absolute.new_tensor(self.plan.pair_counts)
        return (absolute / counts).sum(1).mean()

    def l2(self) -> torch.Tensor:
        return (self.param.pow(2).flatten(1).sum(1) + self.plan.frozen_square).clamp_min(1e-20).sqrt().mean()

    def input_stats(self) -> torch.Tensor:
        b, k, _ = self.param.shape
        channels = self.param.view(b, k, self.plan.patch_shape[0], -1)
        frozen_sum, frozen_square = self.plan.frozen_channel_sums
        return moment_distance(channels.sum(dim=(0, 1, 3)) + frozen_sum,
                               channels.pow(2).sum(dim=(0, 1, 3)) + frozen_square, self.plan.pixels_per_channel)
