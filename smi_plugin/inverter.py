"""The sparse inverter: attention-guided progressive patch stopping for timm ViTs.

Design, in brief (``../shared/notes/algorithm.md`` is the contract):

* The optimised parameter holds only the *retained* patches, ``(B, K, C*p*p)`` in normalized space;
  every patch's last value lives in a frozen canvas. When a stage stops patches, their final values
  are written to the canvas and the parameter (and Adam's moments) shrink to the survivors, so a
  stopped patch is never forwarded, back-propagated, updated, regularised or clamped again.
* Only retained patches are embedded (the patch-embedding conv as a matmul on those patches) and
  only their tokens, plus every prefix token, enter the blocks.
* Augmentation (roll "jitter" and horizontal flip) acts on whole patches: a roll by a multiple of
  the patch size is a permutation of the grid and a flip mirrors the grid and each patch. Both are
  applied to the retained patches and their grid positions, exactly equal to rolling/flipping the
  full image, without ever touching it. The authors' pixel rolls mix up to half a patch of stopped
  neighbours into retained tokens; whole-patch rolls never do. Dense inversion uses the same path.
* Patch importance is the last block's head-averaged CLS attention from the forward of the
  previous iteration (only the CLS row is computed, and only on iterations right before a stage).
  Tokens keep the retained patches' order under augmentation, so scores need no remapping.
* The pixel priors (TV, l2) are computed on the whole image (retained patches scattered into the
  canvas), so their values match the dense definition; gradients reach retained pixels only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .batch import InvertedBatch
from .config import InversionConfig
from .images import frozen, model_normalization
from .losses import BASE_METHODS, ImagePriors, jensen_shannon
from .priors import RetainedPixelPriors
from .progress import progress_bar
from .schedule import StoppingSchedule
from .tokens import (PatchGrid, check_vit, forward_patches, images_to_patches, indices_to_mask,
                     patch_grid, patches_to_images, position_tokens, record_cls_attention)

Callback = Callable[[dict[str, Any]], None]


def derive_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for work item ``index`` of a run seeded with ``seed``."""
    value = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    value ^= value >> 31
    return value & ((1 << 63) - 1)


@dataclass
class InversionState:
    """Everything one batch's optimisation carries between iterations.

    ``canvas`` holds every patch's latest committed value ``(B, N, Cp*p*p)``; ``param`` the retained
    patches ``(B, K, Cp*p*p)`` at grid indices ``kept`` ``(B, K)``, the only tensor Adam updates.
    """

    labels: torch.Tensor
    generator: torch.Generator
    canvas: torch.Tensor
    kept: torch.Tensor
    param: torch.Tensor
    optimizer: torch.optim.Optimizer
    positions: tuple[torch.Tensor, torch.Tensor]
    priors: RetainedPixelPriors | None = None  # None while every patch is retained

    def current_patches(self) -> torch.Tensor:
        """All patches at their current values (retained ones from ``param``), detached."""
        with torch.no_grad():
            return self.canvas.scatter(1, self.kept.unsqueeze(-1).expand_as(self.param), self.param)

    def commit(self) -> None:
        """Write the retained patches' values into the canvas."""
        with torch.no_grad():
            self.canvas.scatter_(1, self.kept.unsqueeze(-1).expand_as(self.param), self.param)


class SparseInverter:
    """Invert images from a frozen timm ViT, stopping uninformative patches on a schedule.

    Args:
        model: a supported timm ``VisionTransformer`` (see ``smi_plugin.tokens.check_vit``).
        config: the run's ``InversionConfig`` (defaults to the paper's settings).
        callback: called with a stats dict every ``config.log_every`` iterations.
        progress: show a progress bar.
        competitor: a student ViT (same patch grid) for ``config.competition_weight``; it sees the
            same retained tokens and is frozen while inverting.

    Example:
        >>> inverter = SparseInverter(teacher, InversionConfig(iterations=300,
        ...                           schedule=StoppingSchedule.paper_scaled(300)))
        >>> batch = inverter.invert([0, 1, 2, 3])
        >>> batch.images.shape, batch.patch_mask.shape
    """

    def __init__(self, model: nn.Module, config: InversionConfig | None = None, *,
                 callback: Callback | None = None, progress: bool = True,
                 competitor: nn.Module | None = None) -> None:
        check_vit(model)
        self.model = model
        self.competitor = competitor
        self.config = config or InversionConfig()
        self.grid: PatchGrid = patch_grid(model, self.config.image_size)
        if self.config.mean is not None:
            self.mean, self.std = self.config.mean, self.config.std
        else:
            self.mean, self.std = model_normalization(model)
        if len(self.mean) != self.grid.in_chans or len(self.std) != self.grid.in_chans:
            raise ValueError(f"mean/std have {len(self.mean)}/{len(self.std)} entries but the model takes "
                             f"{self.grid.in_chans} channels")
        self.kept_counts = self.config.schedule.check_run(self.config.iterations, self.grid.num_patches)
        if competitor is not None and patch_grid(competitor, self.grid.image_size) != self.grid:
            raise ValueError("the competitor must be a ViT with the teacher's patch grid and prefix layout")
        self.method = BASE_METHODS[self.config.base_method](self.config)
        self.callback = callback
        self.progress = progress
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if not self.dtype.is_floating_point:
            raise TypeError(f"the model's parameters are {self.dtype}; inversion needs a floating-point model")
        self._channel_map()

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def _channel_map(self) -> None:
        """Affine maps from the optimised channels to the model's normalized channels, and clamp bounds."""
        mean = torch.tensor(self.mean, dtype=self.dtype, device=self.device)
        std = torch.tensor(self.std, dtype=self.dtype, device=self.device)
        if self.config.tie_channels:
            # One gray level g (normalized with the average stats) drives every channel:
            # pixel = g * std_avg + mean_avg, then each channel renormalizes it.
            self.param_channels = 1
            self.channel_scale = (std.mean() / std).view(1, 1, -1, 1)
            self.channel_shift = ((mean.mean() - mean) / std).view(1, 1, -1, 1)
            lo, hi = -mean.mean() / std.mean(), (1 - mean.mean()) / std.mean()
            self.clamp_low, self.clamp_high = lo.view(1, 1, 1, 1), hi.view(1, 1, 1, 1)
        else:
            self.param_channels = self.grid.in_chans
            self.channel_scale = self.channel_shift = None
            self.clamp_low = (-mean / std).view(1, 1, -1, 1)
            self.clamp_high = ((1 - mean) / std).view(1, 1, -1, 1)

    def _to_model_channels(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, K, Cp*p*p)`` optimised patches -> ``(B, K, C*p*p)`` in the model's normalized space."""
        if self.channel_scale is None:
            return patches
        b, k, _ = patches.shape
        gray = patches.reshape(b, k, 1, -1)
        return (gray * self.channel_scale + self.channel_shift).reshape(b, k, -1)

    def _check_labels(self, labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(labels, torch.Tensor):
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
            if labels.device != self.device:
                raise ValueError(f"labels are on {labels.device} but the model is on {self.device}; "
                                 "move them with labels.to(device) or pass a list")
            labels = labels.flatten().long()
        else:
            labels = torch.as_tensor(list(labels), dtype=torch.long, device=self.device)
        if labels.numel() == 0:
            raise ValueError("no labels given: pass at least one target class")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"labels {sorted(set(bad.tolist()))[:5]} are outside the model's "
                             f"{self.num_classes} classes [0, {self.num_classes - 1}]")
        return labels

    def invert(self, labels: Sequence[int] | torch.Tensor, seed: int | None = None,
               snapshots: bool = False) -> InvertedBatch:
        """Invert one image per label.

        Args:
            labels: target classes; lists longer than ``config.batch_size`` are inverted in chunks.
            seed: overrides ``config.seed``; chunk ``j`` uses ``derive_seed(seed, j)``.
            snapshots: keep the images and masks at every stage (for pictures of the process).
        """
        labels = self._check_labels(labels)
        seed = self.config.seed if seed is None else seed
        chunks = labels.split(self.config.batch_size)
        bar = self._progress_bar(len(chunks) * self.config.iterations)
        try:
            parts = [self._invert_batch(chunk, derive_seed(seed, j), snapshots, bar)
                     for j, chunk in enumerate(chunks)]
        finally:
            if bar is not None:
                bar.close()
        batch = InvertedBatch.concatenate(parts)
        batch.provenance["seed"] = seed
        return batch

    def _progress_bar(self, total: int):
        return progress_bar(total, enabled=self.progress, desc="inverting", unit="it", leave=False)

    def _augment(self, kept: torch.Tensor, patches: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-patch roll and per-image flip: new grid positions, and patches mirrored where flipped."""
        cfg, (gh, gw) = self.config, self.grid.grid_size
        b = kept.shape[0]
        rows, cols = kept // gw, kept % gw
        max_shift = (round(cfg.jitter * gh), round(cfg.jitter * gw))
        if max(max_shift) > 0:
            shift = torch.stack([torch.randint(-m, m + 1, (b,), generator=generator) for m in max_shift], 1)
            shift = shift.to(kept.device)
            rows = (rows + shift[:, :1]) % gh
            cols = (cols + shift[:, 1:]) % gw
        if cfg.flip:
            flip = (torch.rand(b, generator=generator) < 0.5).to(kept.device)
            cols = torch.where(flip[:, None], gw - 1 - cols, cols)
            ph, pw = self.grid.patch_size
            shaped = patches.reshape(b, patches.shape[1], -1, ph, pw)
            patches = torch.where(flip.view(b, 1, 1, 1, 1), shaped.flip(-1), shaped).reshape(patches.shape)
        return rows * gw + cols, patches

    def _augment_pixels(self, state: "InversionState") -> tuple[torch.Tensor, torch.Tensor]:
        """Random resized crop + flip of the whole current image; the K cells best covering retained patches.

        Returns ``(positions (B, K), patches (B, K, C*p*p))`` in the model's channels. Stopped pixels
        can be seen inside a cell but get no update (only ``param`` is optimised).
        """
        cfg, grid = self.config, self.grid
        param, kept, generator = state.param, state.kept, state.generator
        b, k = kept.shape
        full = state.canvas.scatter(1, kept.unsqueeze(-1).expand_as(param), param)
        images = patches_to_images(self._to_model_channels(full), grid)
        retained = indices_to_mask(kept, grid).to(images.dtype)
        ph, pw = grid.patch_size
        retained = retained.repeat_interleave(ph, 1).repeat_interleave(pw, 2).unsqueeze(1)
        low, high = cfg.crop_scale
        area = low + torch.rand(b, generator=generator) * (high - low)
        log_ratio = (torch.rand(b, generator=generator) * 2 - 1) * math.log(4 / 3)
        sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sx)
        ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sy)
        if cfg.flip:
            sx = torch.where(torch.rand(b, generator=generator) < 0.5, -sx, sx)
        zero = torch.zeros(b)
        theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
        theta = theta.to(images.device, images.dtype)
        sampling = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        augmented = torch.nn.functional.grid_sample(images, sampling, mode="bilinear", align_corners=False)
        coverage = torch.nn.functional.grid_sample(retained, sampling, mode="bilinear", align_corners=False)
        coverage = torch.nn.functional.avg_pool2d(coverage, grid.patch_size).flatten(1)
        cells = coverage.topk(k, dim=1).indices.sort(dim=1).values
        patches = images_to_patches(augmented, grid.patch_size)
        return cells, patches.gather(1, cells.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))

    def _lr_at(self, iteration: int) -> float:
        cfg = self.config
        if cfg.lr_schedule == "constant":
            return cfg.lr
        if iteration < cfg.warmup_iterations:
            return cfg.lr * (iteration + 1) / cfg.warmup_iterations
        progress = (iteration - cfg.warmup_iterations) / max(1, cfg.iterations - cfg.warmup_iterations)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def _optimizer(self, param: torch.Tensor) -> torch.optim.Adam:
        return torch.optim.Adam([param], lr=self.config.lr, betas=self.config.betas)

    def start(self, labels: torch.Tensor, seed: int) -> "InversionState":
        """Fresh state for one batch: Gaussian noise in normalized space, every patch retained."""
        grid = self.grid
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(labels.numel(), self.param_channels, *grid.image_size, generator=generator)
        canvas = images_to_patches(noise.to(self.device, self.dtype), grid.patch_size)
        kept = torch.arange(grid.num_patches, device=self.device).expand(labels.numel(), -1).contiguous()
        param = canvas.clone().requires_grad_(True)
        return InversionState(labels=labels, generator=generator, canvas=canvas, kept=kept, param=param,
                              optimizer=self._optimizer(param),
                              positions=position_tokens(self.model, grid, self.dtype))

    def stop(self, state: "InversionState", ratio: float, scores: torch.Tensor) -> None:
        """Keep the most-attended patches; freeze the rest into the canvas; shrink param and Adam state."""
        param, kept = state.param, state.kept
        keep = StoppingSchedule.keep_count(kept.shape[1], ratio)
        survivors = scores.topk(keep, dim=1).indices.sort(dim=1).values
        expand = survivors.unsqueeze(-1).expand(-1, -1, param.shape[-1])
        with torch.no_grad():
            state.canvas.scatter_(1, kept.unsqueeze(-1).expand_as(param), param)
            new_param = param.gather(1, expand).requires_grad_(True)
        optimizer = self._optimizer(new_param)
        old = state.optimizer.state.get(param, {})
        optimizer.state[new_param] = {
            name: value.gather(1, expand) if torch.is_tensor(value) and value.shape == param.shape else value
            for name, value in old.items()}
        state.kept, state.param, state.optimizer = kept.gather(1, survivors), new_param, optimizer
        if self.method.needs_images():
            state.priors = RetainedPixelPriors.plan(state.canvas, state.kept, self.grid, self.param_channels)

    def step(self, state: "InversionState", iteration: int,
             scoring: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """One optimisation step on the retained patches. Returns ``(loss, logits, loss parts)``.

        ``scoring`` marks the iteration right before a stopping stage: with pixel augmentation it
        runs un-augmented so that each token's attention belongs to exactly one retained patch.
        """
        param, kept = state.param, state.kept
        for group in state.optimizer.param_groups:
            group["lr"] = self._lr_at(iteration)
        if self.config.augment == "pixel" and not scoring:
            positions, patches = self._augment_pixels(state)
        else:
            if self.config.augment == "patch":
                positions, patches = self._augment(kept, param, state.generator)
            else:
                positions, patches = kept, param
            patches = self._to_model_channels(patches)
        logits = forward_patches(self.model, self.grid, patches, positions, state.positions)
        priors = None
        if self.method.needs_images():
            # While every patch is retained, param is the whole image (kept is 0..N-1 in order).
            priors = (ImagePriors(patches_to_images(param, self.grid, self.param_channels))
                      if state.priors is None else state.priors.bind(param))
        loss, parts = self.method.loss(logits, state.labels, priors)
        if self.config.competition_weight > 0 and self.competitor is not None:
            divergence = jensen_shannon(forward_patches(self.competitor, self.grid, patches, positions), logits)
            loss = loss + self.config.competition_weight * (1 - divergence.clamp(0, 1))
            parts["competition_js"] = divergence.item()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        with torch.no_grad():
            shaped = param.view(param.shape[0], param.shape[1], self.param_channels, -1)
            torch.maximum(shaped, self.clamp_low, out=shaped)
            torch.minimum(shaped, self.clamp_high, out=shaped)
        return loss, logits, parts

    def _invert_batch(self, labels: torch.Tensor, seed: int, snapshots: bool, bar) -> InvertedBatch:
        cfg, grid = self.config, self.grid
        started = time.perf_counter()
        state = self.start(labels, seed)
        stages = dict(cfg.schedule.stages)
        history: list[dict[str, float]] = []
        shots: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        parts: dict[str, float] = {}
        with frozen(self.model), frozen(self.competitor or nn.Identity()), self.method.hooks(self.model), \
                record_cls_attention(self.model, enabled=bool(stages)) as attention:
            for iteration in range(cfg.iterations):
                ratio = stages.get(iteration)
                if ratio:
                    if snapshots:
                        shots.append(self._snapshot(iteration, state))
                    self.stop(state, ratio, attention.pop("scores"))
                scoring = (iteration + 1) in stages
                attention["active"] = scoring
                loss, logits, parts = self.step(state, iteration, scoring=scoring)
                if bar is not None:
                    bar.update(1)
                if iteration % cfg.log_every == 0 or iteration == cfg.iterations - 1:
                    record = {"iteration": iteration, "loss": loss.item(), "kept": int(state.kept.shape[1]),
                              "target_accuracy": (logits.argmax(1) == labels).float().mean().item(), **parts}
                    history.append(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", kept=record["kept"])
                    if self.callback is not None:
                        self.callback(record)
        state.commit()
        if snapshots:
            shots.append(self._snapshot(cfg.iterations, state))
        provenance = {
            "config": cfg.to_dict(), "teacher": _model_name(self.model), "seed": seed,
            "kept_counts": self.kept_counts, "num_patches": grid.num_patches,
            "final_losses": {**parts, "target_accuracy": history[-1]["target_accuracy"]},
            "seconds": round(time.perf_counter() - started, 3), "torch_version": torch.__version__,
        }
        return InvertedBatch(images=self._to_pixels(state.canvas), patch_mask=indices_to_mask(state.kept, grid),
                             labels=labels, kept_indices=state.kept, mean=tuple(self.mean), std=tuple(self.std),
                             provenance=provenance, history=history, snapshots=shots)

    def _to_pixels(self, canvas: torch.Tensor) -> torch.Tensor:
        normalized = patches_to_images(self._to_model_channels(canvas), self.grid)
        mean = torch.tensor(self.mean, dtype=self.dtype, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=self.dtype, device=self.device).view(1, -1, 1, 1)
        return (normalized * std + mean).clamp_(0, 1).detach()

    def _snapshot(self, iteration: int, state: "InversionState") -> tuple[int, torch.Tensor, torch.Tensor]:
        return iteration, self._to_pixels(state.current_patches()).cpu(), indices_to_mask(state.kept, self.grid).cpu()


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("zoo_name") or cfg.get("architecture") or type(model).__name__
