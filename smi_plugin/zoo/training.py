"""Training a zoo teacher from its recipe, on the CPU, reproducibly."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import load_split
from ..evaluation import evaluate_accuracy
from ..images import normalize
from .errors import TeacherError
from .loading import load_teacher
from .registry import BASE_ARCHITECTURE, RECIPES, ZOO_DIR, TeacherRecipe, load_card, zoo_names
from .saved import save_student


def _augment(images: torch.Tensor, recipe: TeacherRecipe, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random affine (rotation, scale, translation) and optional horizontal flip."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(recipe.max_rotation_deg)
    low, high = recipe.scale_range
    scale = low + torch.rand(n, generator=generator) * (high - low)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * recipe.max_translate * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    if recipe.hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        theta[flip, :, 0] *= -1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _train_phase(model: nn.Module, train, recipe: TeacherRecipe, mean, std, epochs: int, lr: float,
                 warmup_epochs: int, generator: torch.Generator, desc: str, log_every: int) -> None:
    """AdamW with linear warm-up then cosine decay over ``epochs``."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total, warmup = epochs * steps_per_epoch, max(1, warmup_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / total))))
    bar = tqdm(total=total, desc=desc, unit="step")
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), recipe.batch_size):
            index = order[start:start + recipe.batch_size]
            images = _augment(train.images(index), recipe, generator)
            loss = F.cross_entropy(model(normalize(images, mean, std)), train.labels[index],
                                   label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            if bar.n % log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def train_teacher(name: str, out_dir: str | Path = ZOO_DIR, epochs: int | None = None, log_every: int = 100,
                  phase1_checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Train a zoo teacher from its recipe and save it to ``out_dir/NAME`` as ``save_student`` does.

    ``phase1_checkpoint`` skips the first phase by loading its result (written by this recipe);
    the warm-restart phase uses its own generator, so the outcome matches a full run.
    Returns the card (which records the measured held-out top-1).
    """
    import timm
    from safetensors.torch import load_file

    if name not in RECIPES:
        raise TeacherError(f"unknown zoo teacher {name!r}; zoo teachers are {zoo_names()}")
    recipe = RECIPES[name]
    if epochs is not None:
        recipe = recipe.replace(epochs=epochs)
    torch.manual_seed(recipe.seed)
    started = time.time()
    train, test = load_split(recipe.dataset, "train"), load_split(recipe.dataset, "test")
    mean, std = train.channel_stats()
    if recipe.init_from:
        mean, std = (tuple(v) for v in (load_card(recipe.init_from)["mean"], load_card(recipe.init_from)["std"]))
    if recipe.classes is not None:
        train = train.subset(torch.isin(train.labels, torch.tensor(recipe.classes)))
    model_kwargs = recipe.model_kwargs(train.num_classes)
    model = timm.create_model(BASE_ARCHITECTURE, pretrained=False, **model_kwargs)
    if recipe.init_from:
        model.load_state_dict(load_teacher(recipe.init_from).state_dict())
    if phase1_checkpoint is not None:
        model.load_state_dict(load_file(str(phase1_checkpoint)))
    else:
        _train_phase(model, train, recipe, mean, std, recipe.epochs, recipe.lr, recipe.warmup_epochs,
                     torch.Generator().manual_seed(recipe.seed), f"training {name}", log_every)
    if recipe.restart_epochs:
        gentle = recipe.replace(max_rotation_deg=0.0, scale_range=(1.0, 1.0))
        _train_phase(model, train, gentle, mean, std, recipe.restart_epochs, recipe.restart_lr, 0,
                     torch.Generator().manual_seed(recipe.seed + 1), f"training {name} (restart)", log_every)
    accuracy = evaluate_accuracy(model, test, mean, std)
    trained_classes = list(recipe.classes) if recipe.classes is not None else list(range(train.num_classes))
    accuracy_trained = evaluate_accuracy(model, test.subset(torch.isin(test.labels, torch.tensor(trained_classes))),
                                         mean, std)
    card = dict(name=name, architecture=BASE_ARCHITECTURE, model_kwargs=model_kwargs,
                num_classes=train.num_classes, class_names=list(train.class_names), dataset=recipe.dataset,
                mean=list(mean), std=list(std), recipe=recipe.to_dict(), heldout_top1=accuracy,
                trained_classes=trained_classes, heldout_top1_trained_classes=accuracy_trained,
                heldout_images=len(test), train_seconds=round(time.time() - started, 1),
                phase1_from_checkpoint=phase1_checkpoint is not None,
                parameters=sum(p.numel() for p in model.parameters()),
                torch_version=torch.__version__, timm_version=timm.__version__)
    save_student(model, Path(out_dir) / name, card)
    return card
