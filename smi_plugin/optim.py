"""Learning-rate schedules, the Adam-state surgery that sparse stopping needs, and Adam in a fixed basis.

Nothing here knows about images or models. ``cosine_lr`` counts integer steps; distillation's time
budget (float seconds) and the zoo's training recipe (multiplicative warm-up, the one that made the
shipped weights) keep their own cosines, as merging them would change behaviour. ``BasisAdam`` takes
its basis from the caller (``pixels.patch_frequency_basis`` for smooth image steps).
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


class BasisAdam(torch.optim.Optimizer):
    """Adam whose moments live in a fixed linear basis of blocks of each parameter's last dimension.

    For a parameter ``x`` whose last dimension is made of blocks of ``P`` values and a basis ``M``
    ``(P, P)`` (each block ``x_b = M @ c_b``), the gradient goes to the coefficients (``M.T @ g_b``), Adam
    normalizes each coefficient's step there, and the step comes back through ``M``. With ``M`` the
    identity this is ``torch.optim.Adam``; with a cosine basis whose high frequencies are scaled down
    (``pixels.patch_frequency_basis``) an image's steps are smooth, since Adam no longer gives every
    pixel a step of the same size. The state keeps ``torch.optim.Adam``'s names and shapes (``step``,
    ``exp_avg``, ``exp_avg_sq`` shaped like the parameter), so ``shrink_rows`` gathers it alike.
    """

    def __init__(self, params, basis: torch.Tensor, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        if basis.ndim != 2 or basis.shape[0] != basis.shape[1]:
            raise ValueError(f"BasisAdam's basis must be a square (P, P) matrix, got shape {tuple(basis.shape)}")
        # In the defaults, not an attribute: an Optimizer pickles only its defaults, state and groups.
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, basis=basis))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            raise ValueError("BasisAdam does not take a closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                basis = group["basis"].to(param.device, param.dtype)
                blocks = basis.shape[0]
                if param.shape[-1] % blocks:
                    raise ValueError(f"BasisAdam: the last dimension {param.shape[-1]} is not made of blocks of "
                                     f"{blocks} (the basis' size)")
                grad = (param.grad.reshape(-1, blocks) @ basis).view_as(param)
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = float(state["step"])
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denominator = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                coefficients = state["exp_avg"] / (1 - beta1 ** step) / denominator
                param.add_((coefficients.reshape(-1, blocks) @ basis.T).view_as(param), alpha=-group["lr"])
