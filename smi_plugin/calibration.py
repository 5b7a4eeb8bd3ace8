"""Calibration data for post-training quantization: a torch ``Dataset`` view of inverted images.

Each item is a normalized image, its patch mask (True = retained foreground patch) and its label.
Calibration forwards run only the retained tokens (``forward_kept_tokens``), so background patches
never shape an activation range. The data itself is an ``InvertedBatch``, whatever its source
(sparse or dense inversions, Gaussian noise, real images), so a quantization recipe can be compared
across calibration sources unchanged.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from .batch import InvertedBatch, balanced_labels
from .config import InversionConfig
from .export import load_inverted
from .images import model_normalization
from .inverter import SparseInverter
from .recipes import get_recipe
from .tokens import mask_to_indices, patch_grid

MODES = ("sparse", "dense")


class SparseInvertedCalibrationDataset(Dataset):
    """Map-style dataset of ``{"pixel_values", "patch_mask", "label"}`` items over an ``InvertedBatch``.

    Args:
        batch: the images (any source) with their masks, labels and provenance.
        source: a short description kept for reports; default: the batch's provenance source.

    Example:
        >>> data = SparseInvertedCalibrationDataset.from_batches([batch])   # InvertedBatch list
        >>> for item in data.batches(batch_size=32):
        ...     forward_kept_tokens(model, item["pixel_values"], item["patch_mask"])
    """

    def __init__(self, batch: InvertedBatch, source: str | None = None) -> None:
        images, patch_mask = batch.images, batch.patch_mask
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if patch_mask.dim() != 3 or patch_mask.shape[0] != images.shape[0]:
            raise ValueError(f"patch_mask must be (N, H/p, W/p) with N={images.shape[0]}, "
                             f"got {tuple(patch_mask.shape)}")
        gh, gw = patch_mask.shape[1:]
        if images.shape[2] % gh or images.shape[3] % gw:
            raise ValueError(f"a {gh}x{gw} patch grid does not tile {tuple(images.shape[2:])} images")
        if images.shape[0] == 0:
            raise ValueError("the calibration dataset is empty: invert (or load) at least one image")
        if bool((patch_mask.flatten(1).sum(1) == 0).any()):
            raise ValueError("some images retain no patch at all; every image needs at least one")
        self.batch = batch
        self.pixel_values = batch.normalized().float().cpu()
        self.patch_mask = patch_mask.to(torch.bool).cpu()
        self.labels = batch.labels.long().cpu()
        self.source = source or batch.provenance.get("source", "sparse-inverted")

    @classmethod
    def from_tensors(cls, pixel_values: torch.Tensor, patch_mask: torch.Tensor, labels: torch.Tensor | None = None,
                     source: str = "custom") -> "SparseInvertedCalibrationDataset":
        """From already normalized ``pixel_values`` (stored with an identity normalization)."""
        channels = pixel_values.shape[1] if pixel_values.dim() == 4 else 3
        labels = torch.full((pixel_values.shape[0],), -1) if labels is None else labels
        batch = InvertedBatch(images=pixel_values.float(), patch_mask=patch_mask.to(torch.bool), labels=labels.long(),
                              kept_indices=torch.zeros(pixel_values.shape[0], 0, dtype=torch.long),
                              mean=(0.0,) * channels, std=(1.0,) * channels, provenance={"source": source})
        return cls(batch)

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
        mask = torch.ones_like(self.batch.patch_mask)
        batch = InvertedBatch(images=self.batch.images, patch_mask=mask, labels=self.batch.labels,
                              kept_indices=mask_to_indices(mask), mean=self.batch.mean, std=self.batch.std,
                              provenance=self.batch.provenance)
        return SparseInvertedCalibrationDataset(batch, source=f"{self.source}, all patches")

    def batches(self, batch_size: int = 32, num_replicas: int = 1, rank: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches whose images all retain the same number of patches (so no padding is needed)."""
        for indices in KeptCountBatchSampler(self, batch_size, num_replicas, rank):
            index = torch.as_tensor(indices)
            yield {"pixel_values": self.pixel_values[index], "patch_mask": self.patch_mask[index],
                   "label": self.labels[index]}

    @classmethod
    def from_batches(cls, batches: Sequence[InvertedBatch], mode: str = "sparse") -> "SparseInvertedCalibrationDataset":
        """From inverted batches (each normalized with the mean/std recorded in it)."""
        if not batches:
            raise ValueError("no inverted batches given: invert at least one image")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        data = cls(InvertedBatch.concatenate([b.to("cpu") for b in batches]))
        return data if mode == "sparse" else data.dense()

    @classmethod
    def from_inverter(cls, model: torch.nn.Module, num_images: int, config: InversionConfig | None = None,
                      labels: Sequence[int] | None = None, seed: int | None = None, mode: str = "sparse",
                      progress: bool = True) -> "SparseInvertedCalibrationDataset":
        """Invert ``num_images`` images (labels balanced over classes unless given) and wrap them; ``config``
        defaults to the ``"calibration"`` recipe (``smi quantize``'s)."""
        config = config or get_recipe("calibration").inversion_config(model)
        inverter = SparseInverter(model, config, progress=progress)
        if labels is None:
            labels = balanced_labels(num_images, inverter.num_classes)
        return cls.from_batches([inverter.invert(list(labels), seed=seed)], mode=mode)

    @classmethod
    def gaussian(cls, model: torch.nn.Module, num_images: int, seed: int = 0) -> "SparseInvertedCalibrationDataset":
        """The noise baseline: N(0, 1) images in normalized space, every patch retained."""
        grid = patch_grid(model)
        identity = ((0.0,) * grid.in_chans, (1.0,) * grid.in_chans)  # the noise is already normalized
        return cls(InvertedBatch.gaussian(grid, num_images, *identity, seed=seed))

    @classmethod
    def from_images(cls, model: torch.nn.Module, images: torch.Tensor, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, labels: torch.Tensor | None = None,
                    source: str = "real") -> "SparseInvertedCalibrationDataset":
        """Real (or any) ``[0, 1]`` images, every patch retained; normalization defaults to the model's."""
        if mean is None or std is None:
            mean, std = model_normalization(model)
        grid = patch_grid(model, tuple(images.shape[2:]))
        return cls(InvertedBatch.from_images(images, grid, mean, std, labels, source=source))

    @classmethod
    def from_hf(cls, dataset: Any) -> "SparseInvertedCalibrationDataset":
        """From a Hugging Face dataset written by ``smi invert`` (or a path to one)."""
        return cls(load_inverted(dataset).to_batch())


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
