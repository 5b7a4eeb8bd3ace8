"""Calibration data for post-training quantization, from sparsely inverted images.

Each item is a normalized image, its patch mask (True = retained foreground patch) and its label.
Calibration forwards run only the retained tokens (``forward_kept_tokens``), so background patches
never shape an activation range. A dense mode, a Gaussian-noise baseline and real images share the
interface, so a quantization recipe can be compared across calibration sources unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from .evaluation import normalize
from .tokens import patch_grid

if TYPE_CHECKING:
    from .config import InversionConfig
    from .inverter import InvertedBatch

MODES = ("sparse", "dense")


class SparseInvertedCalibrationDataset(Dataset):
    """Map-style dataset of ``{"pixel_values", "patch_mask", "label"}`` items.

    Args:
        pixel_values: ``(N, 3, H, W)`` images normalized as the model expects.
        patch_mask: ``(N, H/p, W/p)`` bool masks of retained patches.
        labels: ``(N,)`` classes (``-1`` where unknown).
        source: a short description kept for reports (``"sparse-inverted"``, ``"gaussian"``, ...).

    Example:
        >>> data = SparseInvertedCalibrationDataset.from_batches([batch])   # InvertedBatch list
        >>> for item in data.batches(batch_size=32):
        ...     forward_kept_tokens(model, item["pixel_values"], item["patch_mask"])
    """

    def __init__(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor, labels: torch.Tensor | None = None,
                 source: str = "custom") -> None:
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (N, C, H, W), got shape {tuple(pixel_values.shape)}")
        if patch_mask.dim() != 3 or patch_mask.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"patch_mask must be (N, H/p, W/p) with N={pixel_values.shape[0]}, "
                             f"got {tuple(patch_mask.shape)}")
        gh, gw = patch_mask.shape[1:]
        if pixel_values.shape[2] % gh or pixel_values.shape[3] % gw:
            raise ValueError(f"a {gh}x{gw} patch grid does not tile {tuple(pixel_values.shape[2:])} images")
        if pixel_values.shape[0] == 0:
            raise ValueError("the calibration dataset is empty: invert (or load) at least one image")
        patch_mask = patch_mask.to(torch.bool)
        if bool((patch_mask.flatten(1).sum(1) == 0).any()):
            raise ValueError("some images retain no patch at all; every image needs at least one")
        self.pixel_values = pixel_values.float()
        self.patch_mask = patch_mask
        self.labels = (labels if labels is not None else torch.full((pixel_values.shape[0],), -1)).long()
        self.source = source

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "patch_mask": self.patch_mask[index],
                "label": self.labels[index]}

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_mask.shape[1:])

    @property
    def kept_fraction(self) -> float:
        return self.patch_mask.float().mean().item()

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise unless the masks match ``model``'s patch grid at these images' size."""
        grid = patch_grid(model, tuple(self.pixel_values.shape[2:]))
        if grid.grid_size != self.grid_size:
            raise ValueError(f"the dataset's patch masks are {self.grid_size} but the model's patch grid at "
                             f"{tuple(self.pixel_values.shape[2:])} is {grid.grid_size}; invert with this model "
                             "or rebuild the masks for its patch size")

    def dense(self) -> "SparseInvertedCalibrationDataset":
        """The same images with every patch retained (dense calibration)."""
        return SparseInvertedCalibrationDataset(self.pixel_values, torch.ones_like(self.patch_mask), self.labels,
                                                source=f"{self.source}, all patches")

    def batches(self, batch_size: int = 32, num_replicas: int = 1, rank: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches whose images all retain the same number of patches (so no padding is needed)."""
        for indices in KeptCountBatchSampler(self, batch_size, num_replicas, rank):
            index = torch.as_tensor(indices)
            yield {"pixel_values": self.pixel_values[index], "patch_mask": self.patch_mask[index],
                   "label": self.labels[index]}

    @classmethod
    def from_batches(cls, batches: Sequence["InvertedBatch"], mode: str = "sparse") -> "SparseInvertedCalibrationDataset":
        """From inverted batches, normalized with the mean/std recorded in them."""
        if not batches:
            raise ValueError("no inverted batches given: invert at least one image")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        pixels = torch.cat([normalize(b.images.float().cpu(), b.mean, b.std) for b in batches])
        masks = torch.cat([b.patch_mask.cpu() for b in batches])
        labels = torch.cat([b.labels.cpu() for b in batches])
        data = cls(pixels, masks, labels, source="sparse-inverted")
        return data if mode == "sparse" else data.dense()

    @classmethod
    def from_inverter(cls, model: torch.nn.Module, num_images: int, config: "InversionConfig | None" = None,
                      labels: Sequence[int] | None = None, seed: int | None = None, mode: str = "sparse",
                      progress: bool = True) -> "SparseInvertedCalibrationDataset":
        """Invert ``num_images`` images (labels balanced over classes unless given) and wrap them."""
        from .inverter import SparseInverter

        inverter = SparseInverter(model, config, progress=progress)
        if labels is None:
            labels = balanced_labels(num_images, inverter.num_classes)
        batch = inverter.invert(list(labels), seed=seed)
        return cls.from_batches([batch], mode=mode)

    @classmethod
    def gaussian(cls, model: torch.nn.Module, num_images: int, seed: int = 0) -> "SparseInvertedCalibrationDataset":
        """The noise baseline: N(0, 1) images in normalized space, every patch retained."""
        grid = patch_grid(model)
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randn(num_images, grid.in_chans, *grid.image_size, generator=generator)
        return cls(pixels, torch.ones(num_images, *grid.grid_size, dtype=torch.bool), source="gaussian")

    @classmethod
    def from_images(cls, model: torch.nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    labels: torch.Tensor | None = None, source: str = "real") -> "SparseInvertedCalibrationDataset":
        """Real (or any) ``[0, 1]`` images, every patch retained."""
        grid = patch_grid(model, tuple(images.shape[2:]))
        masks = torch.ones(images.shape[0], *grid.grid_size, dtype=torch.bool)
        return cls(normalize(images.float(), mean, std), masks, labels, source=source)

    @classmethod
    def from_hf(cls, dataset: Any) -> "SparseInvertedCalibrationDataset":
        """From a Hugging Face dataset written by ``smi invert`` (or a path to one)."""
        from .export import load_inverted

        return load_inverted(dataset).calibration_dataset()


def balanced_labels(num_images: int, num_classes: int) -> list[int]:
    """``num_images`` labels cycling over the classes (0, 1, ..., C-1, 0, 1, ...)."""
    return [i % num_classes for i in range(num_images)]


class KeptCountBatchSampler(Sampler[list[int]]):
    """Batches of indices with equal retained-patch counts, in a fixed order; sharded over replicas.

    Use with ``DataLoader(dataset, batch_sampler=KeptCountBatchSampler(dataset, 32))``.
    """

    def __init__(self, dataset: SparseInvertedCalibrationDataset, batch_size: int, num_replicas: int = 1,
                 rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        counts = dataset.patch_mask.flatten(1).sum(1)
        batches = []
        for count in counts.unique().tolist():
            group = (counts == count).nonzero().squeeze(1).tolist()
            batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
        self._batches = batches[rank::num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)
