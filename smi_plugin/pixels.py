"""The optimised pixel parametrization: channels optimised -> the model's normalized channels.

``ChannelMap`` is the affine map from the optimised patches (one gray channel when channels are
tied, else the model's channels) to the model's normalized input, the clamp bounds that keep
pixels in ``[0, 1]``, and the conversion back to pixels. ``initial_noise`` is where an inversion
starts; ``patch_frequency_basis`` the cosine basis in which ``optim.BasisAdam`` steps a patch's pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .tokens import PatchGrid, images_to_patches, patches_to_images


@dataclass(frozen=True)
class ChannelMap:
    """How optimised patches ``(B, K, Cp*p*p)`` become the model's normalized patches ``(B, K, C*p*p)``.

    Attributes:
        param_channels: ``Cp``, 1 with tied channels, else the model's channel count.
        scale, shift: ``(1, 1, C, 1)`` affine map of the tied gray level to each channel (None untied).
        low, high: ``(1, 1, Cp, 1)`` clamp bounds in the optimised space (pixels 0 and 1).
        mean, std: ``(1, C, 1, 1)`` the model's input normalization.
    """

    param_channels: int
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    low: torch.Tensor
    high: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def build(cls, mean: Sequence[float], std: Sequence[float], tie_channels: bool,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "ChannelMap":
        """The map for normalization ``mean``/``std``; ``tie_channels`` optimises one gray level."""
        mean_t = torch.tensor(mean, dtype=dtype, device=device)
        std_t = torch.tensor(std, dtype=dtype, device=device)
        pixel_view = (mean_t.view(1, -1, 1, 1), std_t.view(1, -1, 1, 1))
        if tie_channels:
            # One gray level g (normalized with the average stats) drives every channel:
            # pixel = g * std_avg + mean_avg, then each channel renormalizes it.
            lo, hi = -mean_t.mean() / std_t.mean(), (1 - mean_t.mean()) / std_t.mean()
            return cls(1, (std_t.mean() / std_t).view(1, 1, -1, 1), ((mean_t.mean() - mean_t) / std_t).view(1, 1, -1, 1),
                       lo.view(1, 1, 1, 1), hi.view(1, 1, 1, 1), *pixel_view)
        return cls(len(mean), None, None, (-mean_t / std_t).view(1, 1, -1, 1), ((1 - mean_t) / std_t).view(1, 1, -1, 1),
                   *pixel_view)

    def to_model(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, K, Cp*p*p)`` optimised patches -> ``(B, K, C*p*p)`` in the model's normalized space."""
        if self.scale is None:
            return patches
        b, k, _ = patches.shape
        gray = patches.reshape(b, k, 1, -1)
        return (gray * self.scale + self.shift).reshape(b, k, -1)

    def clamp_(self, param: torch.Tensor) -> None:
        """Clamp optimised patches ``(B, K, Cp*p*p)`` in place to the valid pixel range."""
        with torch.no_grad():
            param.view(param.shape[0], param.shape[1], self.param_channels, -1).clamp_(self.low, self.high)

    def from_pixels(self, images: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
        """``(B, C, H, W)`` pixels in ``[0, 1]`` -> ``(B, N, Cp*p*p)`` optimised patches (``to_pixels``'s
        inverse; tied channels take the channels' average as the gray level)."""
        pixels = images.to(self.mean.dtype)
        if self.scale is None:
            return images_to_patches((pixels - self.mean) / self.std, grid.patch_size)
        gray = pixels.mean(1, keepdim=True)  # the tied level: pixel = g * std_avg + mean_avg
        return images_to_patches((gray - self.mean.mean()) / self.std.mean(), grid.patch_size)

    def to_pixels(self, patches: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
        """Every patch ``(B, N, Cp*p*p)`` -> detached ``(B, C, H, W)`` pixels in ``[0, 1]``."""
        normalized = patches_to_images(self.to_model(patches), grid)
        return (normalized * self.std + self.mean).clamp_(0, 1).detach()


def initial_noise(kind: str, batch: int, channels: int, grid: PatchGrid, generator: torch.Generator) -> torch.Tensor:
    """An inversion's starting point, ``(batch, channels, H, W)`` in normalized units with unit variance.

    ``pixel`` (the paper) draws a Gaussian per pixel. ``patch`` draws one per patch and upsamples the grid
    bilinearly, each image rescaled to unit variance: smooth blobs the size of a patch, so the first steps
    shape regions rather than sharpen pixel noise into texture the teacher reads as class evidence
    (full-KD students of the zoo teachers 6-8 points better at equal KD steps; benchmarks/README.md,
    "Patch noise").
    """
    if kind == "pixel":
        return torch.randn(batch, channels, *grid.image_size, generator=generator)
    coarse = torch.randn(batch, channels, *grid.grid_size, generator=generator)
    smooth = F.interpolate(coarse, size=grid.image_size, mode="bilinear", align_corners=False)
    return smooth / smooth.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)


def patch_frequency_basis(patch_size: tuple[int, int], decay: float) -> torch.Tensor:
    """``(P, P)`` basis of one channel of a patch (``P = ph * pw`` pixels, row-major) for ``BasisAdam``.

    Column ``(u, v)`` is the orthonormal 2-D cosine (DCT-II) of vertical frequency ``u`` and horizontal
    ``v`` (in cycles per two patch sides), scaled by ``(1 + sqrt(u^2 + v^2)) ** -decay``; the scales are
    normalized to unit root-mean-square, so a step of Adam's usual size per coefficient moves the pixels
    as much as per-pixel Adam on average, more of it in the patch's coarse shape. ``decay=0`` is the plain
    orthonormal cosine basis.
    """
    height, width = patch_size
    vertical, horizontal = _cosines(height), _cosines(width)
    cosines = torch.kron(vertical, horizontal)  # row u * width + v: the cosine (u, v) over row-major pixels
    u = torch.arange(height, dtype=torch.float64).view(-1, 1)
    v = torch.arange(width, dtype=torch.float64).view(1, -1)
    scale = (1 + (u ** 2 + v ** 2).sqrt()).pow(-decay).flatten()
    scale = scale / scale.pow(2).mean().sqrt()
    return (cosines.T * scale).float()


def _cosines(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``(n, n)``: row ``k`` is the cosine of frequency ``k`` over ``n`` samples."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    matrix = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix
