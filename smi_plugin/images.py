"""Pixels and models: normalization, patch masks as pixel masks, and a frozen-model context.

The small pieces every layer needs (the inverter, evaluation, calibration, export), kept in one
place so that none of them imports another for them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn


def _channel_view(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Map ``[0, 1]`` images ``(B, C, H, W)`` to the model's normalized input space."""
    return (images - _channel_view(mean, images)) / _channel_view(std, images)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of ``normalize``: normalized images back to ``[0, 1]`` pixel units (not clamped)."""
    return images * _channel_view(std, images) + _channel_view(mean, images)


def mask_to_pixels(patch_mask: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """``(B, gh, gw)`` patch mask -> ``(B, 1, H, W)`` pixel mask (each patch's value over its pixels)."""
    gh, gw = patch_mask.shape[1:]
    height, width = image_size
    return patch_mask.repeat_interleave(height // gh, 1).repeat_interleave(width // gw, 2).unsqueeze(1)


def model_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` a timm model expects, read from its ``pretrained_cfg``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" not in cfg or "std" not in cfg:
        raise ValueError(
            f"{type(model).__name__} has no mean/std in pretrained_cfg; pass them explicitly "
            "(InversionConfig(mean=..., std=...) or --mean/--std) or create the model with timm so that "
            "pretrained_cfg carries its normalization."
        )
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no weight gradients for the duration; restores both afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
