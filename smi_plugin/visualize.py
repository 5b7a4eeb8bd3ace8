"""Pictures people would rather see than read: image grids, stopping stages, learning curves.

Every picture explains itself: grids title each image with its class and the fraction of patches
kept and carry a legend for stopped patches, stage strips say how many patches each stage kept,
and curves can carry labelled reference lines (teacher accuracy, chance).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from .io import atomic_path

if TYPE_CHECKING:
    from .batch import InvertedBatch

STOPPED_LABEL = "stopped patch (black: never updated after it was stopped)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed (or present on servers)
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    return path


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return f"class {label}"


def grid_titles(batch: "InvertedBatch", class_names: Sequence[str] | None = None) -> list[str]:
    """One title per image: its class name and the percentage of patches kept (``"Trouser · 22% kept"``).

    ``class_names`` defaults to the batch's provenance (``class_names``), else ``class N``.
    """
    names = class_names if class_names is not None else batch.provenance.get("class_names")
    kept = batch.patch_mask.flatten(1).float().mean(1)
    return [f"{_class_name(int(label), names)} · {fraction:.0%} kept"
            for label, fraction in zip(batch.labels.tolist(), kept.tolist())]


def _image_array(image: torch.Tensor):
    """A ``(C, H, W)`` ``[0, 1]`` tensor as what ``imshow`` takes."""
    array = image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def save_grid(batch: "InvertedBatch", path: str | os.PathLike, nrow: int = 8, scale: int = 4,
              masked: bool = True, *, class_names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Write a PNG grid of a batch, each image titled with its class and kept fraction.

    Args:
        batch: the images (``InvertedBatch``).
        path: PNG file to write.
        nrow: images per row.
        scale: size of each image in the figure (``scale * 0.4`` inches a side); 32x32 images stay crisp
            (nearest-neighbour display).
        masked: stopped patches blacked out (with a legend entry); ``False`` shows every pixel.
        class_names: names for the labels (default: the batch's provenance, else ``class N``).
        title: figure title (default: the number of images and the mean kept fraction).
    """
    from matplotlib.patches import Patch

    plt = _pyplot()
    images = batch.masked_images() if masked else batch.images
    count = len(batch)
    cols = max(1, min(nrow, count))
    rows = max(1, math.ceil(count / cols))
    side = max(1.2, scale * 0.4)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * side, rows * side + 0.8), dpi=100, squeeze=False)
    for ax, image, text in zip(axes.flat, images, grid_titles(batch, class_names)):
        ax.imshow(_image_array(image), interpolation="nearest", cmap="gray", vmin=0, vmax=1)
        ax.set_title(text, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    kept = batch.patch_mask.float().mean().item() if count else 0.0
    fig.suptitle(title or f"{count} inverted images, {kept:.0%} of patches kept", fontsize=10)
    if masked and kept < 1.0:
        fig.legend(handles=[Patch(facecolor="black", edgecolor="gray", label=STOPPED_LABEL)], loc="lower center",
                   fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 if masked else 0, 1, 0.96))
    return _save_figure(fig, path)


def stage_titles(batch: "InvertedBatch", index: int = 0) -> list[str]:
    """One title per snapshot: its iteration and the patches kept (``"it 50: 44/64 (69%)"``)."""
    titles = []
    for iteration, _, mask in batch.snapshots:
        kept, total = int(mask[index].sum()), mask[index].numel()
        titles.append(f"it {iteration}: {kept}/{total} ({kept / total:.0%})")
    return titles


def save_stage_strip(batch: "InvertedBatch", path: str | os.PathLike, index: int = 0, scale: int = 4, *,
                     class_names: Sequence[str] | None = None) -> Path:
    """One image at each stopping stage (from ``invert(..., snapshots=True)``), stopped patches black,
    each frame titled with its iteration and the patches kept."""
    from matplotlib.patches import Patch

    if not batch.snapshots:
        raise ValueError("the batch has no snapshots; invert with snapshots=True")
    plt = _pyplot()
    frames = []
    for _, images, mask in batch.snapshots:
        image = images[index]
        gh, gw = mask.shape[1:]
        keep = mask[index].repeat_interleave(image.shape[1] // gh, 0).repeat_interleave(image.shape[2] // gw, 1)
        frames.append(image * keep)
    side = max(1.2, scale * 0.4)
    fig, axes = plt.subplots(1, len(frames), figsize=(len(frames) * side, side + 1.0), dpi=100, squeeze=False)
    for ax, frame, text in zip(axes.flat, frames, stage_titles(batch, index)):
        ax.imshow(_image_array(frame), interpolation="nearest", cmap="gray", vmin=0, vmax=1)
        ax.set_title(text, fontsize=8)
        ax.axis("off")
    label = int(batch.labels[index])
    names = class_names if class_names is not None else batch.provenance.get("class_names")
    fig.suptitle(f"stopping stages of one {_class_name(label, names)} inversion", fontsize=10)
    fig.legend(handles=[Patch(facecolor="black", edgecolor="gray", label=STOPPED_LABEL)], loc="lower center",
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.92))
    return _save_figure(fig, path)


def save_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *,
                xlabel: str, ylabel: str, title: str = "",
                references: Mapping[str, float] | None = None) -> Path:
    """Line plot of named ``(x, y)`` series (learning curves, loss curves) to a PNG.

    ``references`` adds labelled horizontal lines, e.g. ``{"teacher": 0.83, "chance": 0.1}``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    styles = ("--", ":", "-.")
    for i, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, color="gray", linestyle=styles[i % len(styles)], linewidth=1,
                   label=f"{name} ({value:.3g})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return _save_figure(fig, path)
