"""Learning-rate schedules and the Adam-state surgery that sparse stopping needs.

Pure functions: nothing here knows about images or models, so other trainers (distillation, the
zoo's teachers) can share ``cosine_lr`` instead of keeping their own copies.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

LR_SCHEDULES = ("constant", "cosine")


def cosine_lr(base: float, step: int, total: int, warmup: int = 0) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` steps, after a linear warm-up of ``warmup`` steps.

    Warm-up step ``s`` (0-based) gives ``base * (s + 1) / warmup`` so the first step already moves;
    after it, ``base * (1 + cos(pi * progress)) / 2`` with ``progress`` from 0 at the end of the
    warm-up to 1 at step ``total``.

    Example:
        >>> cosine_lr(1.0, 0, 10), cosine_lr(1.0, 5, 10)
        (1.0, 0.5)
    """
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(schedule: str, base: float, step: int, total: int, warmup: int = 0) -> float:
    """The learning rate of ``step`` under ``schedule`` (one of ``LR_SCHEDULES``)."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return cosine_lr(base, step, total, warmup)
    raise ValueError(f"unknown lr schedule {schedule!r}; use one of {list(LR_SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def shrink_rows(param: torch.Tensor, optimizer: torch.optim.Optimizer, index: torch.Tensor,
                make_optimizer: Callable[[torch.Tensor], torch.optim.Optimizer]
                ) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    """Keep rows ``index`` ``(B, K')`` along dim 1 of ``param`` ``(B, K, D)``, Adam moments included.

    Returns a new leaf parameter and a fresh optimizer (from ``make_optimizer``) whose per-parameter
    state is the old state gathered at the same rows, so the survivors continue exactly where they
    were: same moments, same step count. Any state entry not shaped like ``param`` (Adam's ``step``)
    is copied unchanged (cloned: Adam increments it in place, and the old optimizer may live on).
    """
    expand = index.unsqueeze(-1).expand(-1, -1, param.shape[-1])
    with torch.no_grad():
        new_param = param.gather(1, expand).requires_grad_(True)
    new_optimizer = make_optimizer(new_param)
    old = optimizer.state.get(param, {})
    new_optimizer.state[new_param] = {
        name: (value.gather(1, expand) if value.shape == param.shape else value.clone()) if torch.is_tensor(value)
        else value
        for name, value in old.items()}
    return new_param, new_optimizer
