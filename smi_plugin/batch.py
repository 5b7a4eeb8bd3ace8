"""The one in-memory type for images with patch masks, labels and provenance.

``InvertedBatch`` holds inverted images (the inverter returns one), and just as well real images
or Gaussian noise with every patch retained, so every consumer (calibration, distillation, export,
pictures) takes one type. The torch ``Dataset`` view is ``SparseInvertedCalibrationDataset``; the
on-disk form is a Hugging Face dataset (``smi_plugin.export``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .images import denormalize, mask_to_pixels, normalize
from .tokens import PatchGrid, mask_to_indices


@dataclass
class InvertedBatch:
    """Images inverted from a teacher, with the truth about which patches were kept.

    Attributes:
        images: ``(B, 3, H, W)`` pixels in ``[0, 1]``; stopped patches hold their last values (the
            mask, not the pixels, says what was stopped).
        patch_mask: ``(B, H/p, W/p)`` bool, True for retained patches.
        labels: ``(B,)`` target classes.
        kept_indices: ``(B, K)`` retained patch indices (row-major), ascending.
        mean, std: the normalization the teacher expects (``normalized()`` applies it).
        provenance: config, teacher, seed, kept counts per stage, final losses, timing, versions.
        history: loss records every ``log_every`` iterations.
        snapshots: optional ``(iteration, images, patch_mask)`` at each stage (for the stage strip).
    """

    images: torch.Tensor
    patch_mask: torch.Tensor
    labels: torch.Tensor
    kept_indices: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    snapshots: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def num_kept(self) -> int:
        return self.kept_indices.shape[1]

    def normalized(self) -> torch.Tensor:
        """Images in the teacher's normalized input space (what ``forward_kept_tokens`` takes)."""
        return normalize(self.images, self.mean, self.std)

    def masked_images(self, fill: float = 0.0) -> torch.Tensor:
        """Images with stopped patches set to ``fill`` (black by default): what was really inverted."""
        keep = mask_to_pixels(self.patch_mask, self.images.shape[2:])
        return torch.where(keep, self.images, torch.full_like(self.images, fill))

    def to(self, device: torch.device | str) -> "InvertedBatch":
        """The same batch with its tensors on ``device`` (provenance and history shared)."""
        return InvertedBatch(images=self.images.to(device), patch_mask=self.patch_mask.to(device),
                             labels=self.labels.to(device), kept_indices=self.kept_indices.to(device),
                             mean=self.mean, std=self.std, provenance=self.provenance, history=self.history,
                             snapshots=self.snapshots)

    def select(self, rows: Sequence[int] | torch.Tensor) -> "InvertedBatch":
        """The rows ``rows`` as a new batch (kept indices dropped where their counts differ)."""
        index = torch.as_tensor(list(rows) if not torch.is_tensor(rows) else rows, dtype=torch.long)
        mask = self.patch_mask[index.to(self.patch_mask.device)]
        return InvertedBatch(images=self.images[index.to(self.images.device)], patch_mask=mask,
                             labels=self.labels[index.to(self.labels.device)], kept_indices=kept_indices_for(mask),
                             mean=self.mean,
                             std=self.std, provenance=self.provenance, history=self.history)

    def state_dict(self) -> dict[str, Any]:
        """The batch as plain tensors, numbers, strings, lists and dicts, which ``torch.load(weights_only=True)``
        reads back (``from_state_dict``); stage snapshots are left out (they are for pictures)."""
        return {"images": self.images, "patch_mask": self.patch_mask, "labels": self.labels,
                "kept_indices": self.kept_indices, "mean": list(self.mean), "std": list(self.std),
                # JSON values only (provenance holds e.g. torch's version, a str subclass the safe loader refuses)
                "provenance": json.loads(json.dumps(self.provenance, default=str)),
                "history": json.loads(json.dumps(self.history, default=str))}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "InvertedBatch":
        """The batch ``state_dict()`` wrote."""
        return cls(images=state["images"], patch_mask=state["patch_mask"], labels=state["labels"],
                   kept_indices=state["kept_indices"], mean=tuple(state["mean"]), std=tuple(state["std"]),
                   provenance=state["provenance"], history=state["history"])

    @staticmethod
    def concatenate(batches: Sequence["InvertedBatch"]) -> "InvertedBatch":
        """One batch from several inverted with the same teacher and config.

        History and stage snapshots are the first part's (each part has its own; one is enough for pictures).
        """
        first = batches[0]
        if len(batches) == 1:
            return first
        same_k = len({b.num_kept for b in batches}) == 1
        return InvertedBatch(
            images=torch.cat([b.images for b in batches]),
            patch_mask=torch.cat([b.patch_mask for b in batches]),
            labels=torch.cat([b.labels for b in batches]),
            kept_indices=(torch.cat([b.kept_indices for b in batches]) if same_k
                          else torch.zeros(sum(len(b) for b in batches), 0, dtype=torch.long)),
            mean=first.mean, std=first.std,
            provenance={**first.provenance, "parts": [b.provenance for b in batches]},
            history=first.history, snapshots=first.snapshots,
        )

    @classmethod
    def from_images(cls, images: torch.Tensor, grid: PatchGrid, mean: Sequence[float], std: Sequence[float],
                    labels: torch.Tensor | None = None, source: str = "real") -> "InvertedBatch":
        """Real (or any) ``[0, 1]`` images with every patch retained; ``-1`` labels where unknown."""
        count = images.shape[0]
        mask = torch.ones(count, *grid.grid_size, dtype=torch.bool)
        labels = torch.full((count,), -1, dtype=torch.long) if labels is None else labels.long()
        return cls(images=images.float(), patch_mask=mask, labels=labels, kept_indices=mask_to_indices(mask),
                   mean=tuple(mean), std=tuple(std), provenance={"source": source})

    @classmethod
    def gaussian(cls, grid: PatchGrid, count: int, mean: Sequence[float], std: Sequence[float],
                 seed: int = 0) -> "InvertedBatch":
        """The noise baseline: N(0, 1) images in the normalized space, every patch retained.

        Stored in pixel units like every batch, unclamped, so ``normalized()`` gives back the noise.
        """
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(count, grid.in_chans, *grid.image_size, generator=generator)
        batch = cls.from_images(denormalize(noise, mean, std), grid, mean, std, source="gaussian")
        batch.provenance["seed"] = seed
        return batch


def balanced_labels(num_images: int, num_classes: int) -> list[int]:
    """``num_images`` labels cycling over the classes (0, 1, ..., C-1, 0, 1, ...)."""
    return [i % num_classes for i in range(num_images)]


def kept_indices_for(patch_mask: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` kept indices of a mask whose images keep equal counts, else ``(B, 0)`` (the convention
    for batches that mix kept counts: ``patch_mask`` stays the truth)."""
    counts = patch_mask.flatten(1).sum(1)
    if counts.numel() == 0 or bool((counts == counts[0]).all()):
        return mask_to_indices(patch_mask)
    return torch.zeros(patch_mask.shape[0], 0, dtype=torch.long, device=patch_mask.device)
