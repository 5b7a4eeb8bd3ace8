"""Accuracy on real held-out images: the only yardstick this project reports."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .data import ImageSplit


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Map ``[0, 1]`` RGB images to the model's normalized input space."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def model_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` a timm model expects, read from its ``pretrained_cfg``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" not in cfg or "std" not in cfg:
        raise ValueError(
            f"{type(model).__name__} has no mean/std in pretrained_cfg; pass them explicitly "
            "(e.g. InversionConfig(mean=..., std=...)) or create the model with timm so that "
            "pretrained_cfg carries its normalization."
        )
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


@torch.no_grad()
def predict_logits(forward: Callable[[torch.Tensor], torch.Tensor], split: ImageSplit,
                   mean: Sequence[float], std: Sequence[float], batch_size: int = 500,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of ``forward`` (any callable on normalized images) over a whole split, dense."""
    outputs = []
    for images, _ in split.batches(batch_size):
        if device is not None:
            images = images.to(device)
        outputs.append(forward(normalize(images, mean, std)).float().cpu())
    return torch.cat(outputs)


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return (logits.argmax(dim=1) == labels).float().mean().item()


def evaluate_accuracy(forward: Callable[[torch.Tensor], torch.Tensor], split: ImageSplit,
                      mean: Sequence[float], std: Sequence[float], batch_size: int = 500,
                      device: torch.device | str | None = None) -> float:
    """Top-1 accuracy of ``forward`` on a real split (images normalized with ``mean``/``std``)."""
    return top1_accuracy(predict_logits(forward, split, mean, std, batch_size, device), split.labels)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approximation`` against ``reference``, in dB."""
    noise = (reference - approximation).pow(2).sum()
    signal = reference.pow(2).sum()
    return (10 * torch.log10(signal / noise.clamp_min(1e-20))).item()
