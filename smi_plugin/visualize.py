"""Pictures people would rather see than read: image grids, stopping stages, learning curves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from .io import atomic_path

if TYPE_CHECKING:
    from .batch import InvertedBatch


def _save_png(grid: torch.Tensor, path: str | os.PathLike) -> Path:
    from PIL import Image

    array = grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def save_grid(batch: "InvertedBatch", path: str | os.PathLike, nrow: int = 8, scale: int = 4,
              masked: bool = True) -> Path:
    """Write a PNG grid of a batch, stopped patches blacked out (``masked=False`` shows all pixels).

    ``scale`` enlarges small images (nearest neighbour) so 32x32 inversions stay visible.
    """
    from torchvision.utils import make_grid

    images = batch.masked_images() if masked else batch.images
    images = images.detach().float().cpu()
    if scale > 1:
        images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    return _save_png(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), path)


def save_stage_strip(batch: "InvertedBatch", path: str | os.PathLike, index: int = 0, scale: int = 4) -> Path:
    """One image at each stopping stage (from ``invert(..., snapshots=True)``), stopped patches black."""
    from torchvision.utils import make_grid

    if not batch.snapshots:
        raise ValueError("the batch has no snapshots; invert with snapshots=True")
    frames = []
    for _, images, mask in batch.snapshots:
        image = images[index]
        gh, gw = mask.shape[1:]
        keep = mask[index].repeat_interleave(image.shape[1] // gh, 0).repeat_interleave(image.shape[2] // gw, 1)
        frames.append(image * keep)
    stack = torch.stack(frames).float()
    if scale > 1:
        stack = stack.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    return _save_png(make_grid(stack, nrow=len(frames), padding=2, pad_value=1.0), path)


def save_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *,
                xlabel: str, ylabel: str, title: str = "") -> Path:
    """Line plot of named ``(x, y)`` series (learning curves, loss curves) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
