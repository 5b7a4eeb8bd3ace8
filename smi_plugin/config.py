"""Typed, validated configuration of an inversion run, stored with every result."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from .schedule import StoppingSchedule

LR_SCHEDULES = ("constant", "cosine")
AUGMENTATIONS = ("patch", "pixel")


@dataclass
class InversionConfig:
    """How to invert a batch of images from a ViT teacher.

    Defaults follow the paper and the authors' code (Adam, lr 0.25, betas (0.5, 0.99), CE + 1e-4 TV,
    4000 iterations, 30% of the retained patches stopped at iterations 50/100/200/300).

    Args:
        iterations: optimisation steps per batch.
        batch_size: images inverted together (the inverter splits longer label lists).
        lr: Adam learning rate, in normalized pixel units.
        betas: Adam betas.
        lr_schedule: ``"constant"`` (the paper) or ``"cosine"`` (DeepInversion, with warm-up).
        warmup_iterations: linear warm-up length for ``"cosine"``.
        schedule: a ``StoppingSchedule`` or its text form (``"paper"``, ``"dense"``, ``"50:0.3,..."``).
        base_method: the dense method being sped up: ``"deepinversion"`` or ``"psaq"``.
        ce_weight: weight of the cross-entropy to the target labels.
        tv_l2_weight: weight of the l2 total variation (sum of the 4 directional difference norms).
        tv_l1_weight: weight of the l1 total variation (mean absolute differences).
        l2_weight: weight of the per-image l2 norm of the (normalized) image.
        input_stats_weight: weight of the distance between the batch's per-channel pixel mean and
            variance and the teacher's input normalization (0 and 1 once normalized): DeepInversion's
            statistics prior on the only statistics a ViT keeps (with ``tie_channels``, the gray
            channel is normalized with the average mean/std).
        patch_similarity_weight: weight of PSAQ-ViT's patch-similarity entropy (``base_method="psaq"``).
        competition_weight: DeepInversion's adaptive competition: weight of ``1 - JS(student, teacher)``
            (T = 3), which pushes images to where a student (``SparseInverter(competitor=...)``)
            still disagrees with the teacher; 0 disables it.
        augment: ``"patch"``: roll ("jitter") and flip in whole patches, exact and free (see
            ``smi_plugin.inverter``); ``"pixel"``: random resized crops and flips of the whole image
            (Plug-in Inversion style), forwarding the cells that best cover retained patches.
        jitter: random roll, as a fraction of the image side (``augment="patch"``).
        flip: random horizontal flips (per image).
        crop_scale: area range of the random resized crops (``augment="pixel"``).
        tie_channels: optimise one gray channel replicated over RGB (a prior for grayscale teachers).
        seed: seed of the initial noise and the augmentation.
        mean, std: normalization overriding the teacher's ``pretrained_cfg``.
        image_size: ``(H, W)`` to invert at; defaults to the teacher's input size.
        log_every: iterations between loss records (history and callback).
    """

    iterations: int = 4000
    batch_size: int = 32
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.99)
    lr_schedule: str = "constant"
    warmup_iterations: int = 0
    schedule: StoppingSchedule = field(default_factory=StoppingSchedule.paper)
    base_method: str = "deepinversion"
    ce_weight: float = 1.0
    tv_l2_weight: float = 1e-4
    tv_l1_weight: float = 0.0
    l2_weight: float = 0.0
    input_stats_weight: float = 0.0
    patch_similarity_weight: float = 1.0
    competition_weight: float = 0.0
    augment: str = "patch"
    jitter: float = 0.125
    flip: bool = True
    crop_scale: tuple[float, float] = (0.25, 1.0)
    tie_channels: bool = False
    seed: int = 0
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    image_size: Optional[tuple[int, int]] = None
    log_every: int = 10

    def __post_init__(self) -> None:
        from .losses import BASE_METHODS

        self.schedule = StoppingSchedule.parse(self.schedule)
        self.betas = tuple(float(b) for b in self.betas)
        self.crop_scale = tuple(float(c) for c in self.crop_scale)
        for name in ("mean", "std", "image_size"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (int, float)):
                    value = (value, value) if name == "image_size" else (value,) * 3
                setattr(self, name, tuple(value))
        positive_ints = ("iterations", "batch_size", "log_every")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InversionConfig.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"InversionConfig.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"InversionConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"InversionConfig.lr_schedule {self.lr_schedule!r} is unknown; use one of {LR_SCHEDULES}")
        if self.warmup_iterations < 0 or self.warmup_iterations >= self.iterations:
            raise ValueError("InversionConfig.warmup_iterations must be in [0, iterations)")
        if self.base_method not in BASE_METHODS:
            raise ValueError(f"InversionConfig.base_method {self.base_method!r} is unknown; "
                             f"use one of {sorted(BASE_METHODS)}")
        for name in ("ce_weight", "tv_l2_weight", "tv_l1_weight", "l2_weight", "input_stats_weight",
                     "patch_similarity_weight", "competition_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"InversionConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"InversionConfig.augment {self.augment!r} is unknown; use one of {AUGMENTATIONS}")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"InversionConfig.crop_scale must be (low, high) with 0 < low <= high <= 1, "
                             f"got {self.crop_scale}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"InversionConfig.jitter is a fraction of the image side in [0, 1), got {self.jitter}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("InversionConfig.mean and .std must be given together (or both left to the teacher)")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"InversionConfig.std must be positive, got {self.std}")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"InversionConfig.image_size must be (H, W), got {self.image_size}")

    def replace(self, **changes: Any) -> "InversionConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``InversionConfig.from_dict`` restores an equal config."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["schedule"] = str(self.schedule)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InversionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown InversionConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "InversionConfig":
        return cls.from_dict(json.loads(text))
