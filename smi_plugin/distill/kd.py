"""The pieces of a KD step, as functions: the loss, the sparse forward, batch sampling and augmentation,
the optimizer and its learning rate."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..tokens import UnsupportedModelError, check_vit, forward_kept_tokens
from .config import DistillConfig

FAILURE_FACTOR = 1.5  # a student under 1.5x chance accuracy has failed


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 20.0) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T)) * T^2``, averaged over the batch."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher, reduction="batchmean") * temperature ** 2


def forward_sparse(model: nn.Module, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None) -> torch.Tensor:
    """Logits on retained patches: kept tokens for supported ViTs, stopped patches zeroed otherwise."""
    try:
        check_vit(model)
    except UnsupportedModelError:
        if patch_mask is None:
            return model(pixel_values)
        gh, gw = patch_mask.shape[1:]
        keep = patch_mask.repeat_interleave(pixel_values.shape[2] // gh, 1)
        keep = keep.repeat_interleave(pixel_values.shape[3] // gw, 2).unsqueeze(1)
        return model(pixel_values * keep)
    return forward_kept_tokens(model, pixel_values, patch_mask)


class SparseForward(nn.Module):
    """``forward_sparse`` of ``model`` as a module's forward, so that a wrapper such as DDP (which
    averages gradients over processes in its forward and backward) sees the kept-token forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None) -> torch.Tensor:
        return forward_sparse(self.model, pixel_values, patch_mask)


def sample_batch(pixels: torch.Tensor, masks: torch.Tensor, batch_size: int, generator: torch.Generator, *,
                 flip: bool = True, mixup: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random rows (with replacement) of normalized ``pixels`` and their ``masks``,
    augmented by ``augment_batch``; everything is drawn from ``generator``, so a step is reproducible."""
    index = torch.randint(len(pixels), (batch_size,), generator=generator)
    return augment_batch(pixels[index], masks[index], generator, flip=flip, mixup=mixup)


def augment_batch(x: torch.Tensor, m: torch.Tensor, generator: torch.Generator, *, flip: bool = True,
                  mixup: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip rows (image and mask) with probability 1/2 when ``flip``; replace a ``mixup`` share of
    them by ``w * x + (1 - w) * x[partner]`` (``w ~ U(0, 1)``, a random partner in the batch) with
    the union of both masks."""
    n = len(x)
    if flip:
        flipped = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)
        m = torch.where(flipped.view(-1, 1, 1), m.flip(-1), m)
    if mixup > 0:
        partner = torch.randperm(n, generator=generator).to(x.device)
        weight = torch.rand(n, 1, 1, 1, generator=generator).to(x.device, x.dtype)
        mixed = (torch.rand(n, generator=generator) < mixup).to(x.device)
        weight = torch.where(mixed.view(-1, 1, 1, 1), weight, torch.ones_like(weight))
        x = weight * x + (1 - weight) * x[partner]
        m = torch.where(mixed.view(-1, 1, 1), m | m[partner], m)
    return x, m


def classifier_head(student: nn.Module) -> nn.Module:
    """The head a linear probe trains: ``student.get_classifier()``, which must have parameters."""
    head = student.get_classifier() if hasattr(student, "get_classifier") else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        raise ValueError("linear-probe mode needs a student with get_classifier() returning a head with "
                         "parameters (timm models have one); use mode='full' otherwise")
    return head


def build_optimizer(student: nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    """The KD optimizer over ``student``'s trainable parameters; in linear-probe mode only the head trains."""
    if config.mode == "linear-probe":
        head = classifier_head(student)
        student.requires_grad_(False)
        head.requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def learning_rate(config: DistillConfig, position: float, total: float) -> float:
    """The KD learning rate at ``position`` of ``total`` (steps, or seconds of a time budget):
    constant, or cosine to 0."""
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(position, total) / total))


def failed(accuracy: float, num_classes: int) -> bool:
    """Whether a student's accuracy is too close to chance to count as a result (< 1.5x chance)."""
    return accuracy < FAILURE_FACTOR / num_classes
