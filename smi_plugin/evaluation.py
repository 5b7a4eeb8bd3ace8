"""Accuracy on real held-out images: the only yardstick this project reports."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .data import ImageSplit
from .images import frozen, normalize
from .tokens import cls_attention_scores, patch_grid

# Images per forward when judging a model: small enough that a ViT's activations stay in the CPU's caches
# (on a 2-core AVX-512 CPU, 10k Fashion-MNIST images: 128 per batch 22% faster than 500 in float32, 46% for
# torchao's eager int8 simulation), large enough that each matmul is still a real GEMM.
EVAL_BATCH_SIZE = 128


@torch.no_grad()
def predict_logits(forward: Callable[[torch.Tensor], torch.Tensor], split: ImageSplit,
                   mean: Sequence[float], std: Sequence[float], batch_size: int = EVAL_BATCH_SIZE,
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
                      mean: Sequence[float], std: Sequence[float], batch_size: int = EVAL_BATCH_SIZE,
                      device: torch.device | str | None = None) -> float:
    """Top-1 accuracy of ``forward`` on a real split (images normalized with ``mean``/``std``)."""
    return top1_accuracy(predict_logits(forward, split, mean, std, batch_size, device), split.labels)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approximation`` against ``reference``, in dB."""
    noise = (reference - approximation).pow(2).sum()
    signal = reference.pow(2).sum()
    return (10 * torch.log10(signal / noise.clamp_min(1e-20))).item()


@torch.no_grad()
def attention_foreground_auc(model: nn.Module, split: ImageSplit, mean: Sequence[float], std: Sequence[float],
                             background_level: float = 0.02, max_images: int = 1000) -> list[float]:
    """Per block, how well the head-averaged CLS attention picks foreground patches of real images.

    For each image, the probability that a random foreground patch gets more CLS attention than a
    random background patch (the AUC; 0.5 is chance), averaged over images holding both. Background
    patches are those whose mean pixel is at most ``background_level``, which fits datasets with an
    empty dark background (Fashion-MNIST, digits). SMI stops the least-attended patches by the last
    block's scores, so its last entry says whether the teacher's attention can find the foreground.
    """
    grid = patch_grid(model)
    images = split.images(slice(0, max_images))
    (ph, pw) = grid.patch_size
    level = images.mean(1).unfold(1, ph, ph).unfold(2, pw, pw).mean((-1, -2)).flatten(1)
    foreground = level > background_level
    scores: list[torch.Tensor] = []
    hooks = [block.attn.register_forward_pre_hook(
        lambda attn, args: scores.append(cls_attention_scores(attn, args[0], model.num_prefix_tokens)))
        for block in model.blocks]
    try:
        with frozen(model):
            model(normalize(images, mean, std))
    finally:
        for hook in hooks:
            hook.remove()
    both = foreground.any(1) & (~foreground).any(1)
    if not bool(both.any()):
        raise ValueError(f"no image has both foreground and background patches at background_level="
                         f"{background_level}; this diagnostic needs images on an empty background")
    pairs = foreground.unsqueeze(2) & ~foreground.unsqueeze(1)  # (B, i, j): i foreground, j background
    aucs = []
    for block_scores in scores:
        above = block_scores.unsqueeze(2) > block_scores.unsqueeze(1)  # (B, i, j): score_i > score_j
        per_image = (above & pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp_min(1)
        aucs.append(per_image[both].float().mean().item())
    return aucs
