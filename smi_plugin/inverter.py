"""The sparse inverter: attention-guided progressive patch stopping for timm ViTs.

Design, in brief (``docs/design.md`` is the contract). The work is done by pure
functions elsewhere; this class only wires them together (the style of timm's ``patch_dropout``):

* The optimised parameter holds only the *retained* patches, ``(B, K, C*p*p)`` in normalized space;
  every patch's last value lives in a frozen canvas. When a stage stops patches, their final values
  are written to the canvas and the parameter and Adam's moments shrink to the survivors
  (``optim.shrink_rows``), so a stopped patch is never forwarded, back-propagated, updated,
  regularised or clamped again.
* *Which* patches a stage removes is a selection policy (``selection``: the paper's least-attended,
  random, dense, or Patch Rebirth, which emits the removed most-attended patches as finished samples);
  the exact-stopping machinery is the same for all of them.
* Only retained patches are embedded (the patch-embedding conv as a matmul on those patches) and
  only their tokens, plus every prefix token, enter the blocks.
* Augmentation (``augment``): whole-patch roll and flip, exactly equal to rolling/flipping the full
  image without touching it (dense inversion uses the same path), or random-resized-crop cells.
* Patch importance is the last block's head-averaged CLS attention from the forward of the
  previous iteration (only the CLS row is computed, and only on iterations right before a stage;
  the recording hook exists only during those forwards, so the other steps can be compiled).
  Tokens keep the retained patches' order under augmentation, so scores need no remapping.
* The pixel priors (TV, l2, input statistics) are those of the whole image, from the retained pixels
  plus constants planned at each stop (``priors.RetainedPixelPriors``), so their values match the
  dense definition; gradients reach retained pixels only.
* No host sync per iteration: loss parts stay tensors and become floats only on logging iterations.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .augment import random_resized_crop_cells, roll_flip_patches
from .batch import InvertedBatch
from .config import InversionConfig
from .images import frozen, model_normalization
from .losses import BASE_METHODS, class_similarity, competition_loss, dirichlet_targets, loss_floats
from .optim import BasisAdam, lr_at, set_lr, shrink_rows
from .pixels import ChannelMap, initial_noise, patch_frequency_basis
from .priors import RetainedPixelPriors
from .progress import progress_bar
from .selection import SELECTION_POLICIES, Stage
from .tokens import (
    PatchGrid,
    check_vit,
    forward_patches,
    images_to_patches,
    indices_to_mask,
    patch_grid,
    patches_to_images,
    position_tokens,
    record_cls_attention,
    vit_precision,
)

logger = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]


def derive_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for work item ``index`` of a run seeded with ``seed``."""
    value = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    value ^= value >> 31
    return value & ((1 << 63) - 1)


def check_labels(labels: Sequence[int] | torch.Tensor, num_classes: int, device: torch.device | str) -> torch.Tensor:
    """Target labels as a ``(B,)`` long tensor on ``device``, or a clear error before any work.

    Raises:
        TypeError: for non-integer tensors.
        ValueError: for labels on another device, an empty list, or classes outside ``[0, num_classes)``.
    """
    device = torch.device(device)
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
        if labels.device != device:
            raise ValueError(f"labels are on {labels.device} but the model is on {device}; "
                             "move them with labels.to(device) or pass a list")
        labels = labels.flatten().long()
    else:
        labels = torch.as_tensor(list(labels), dtype=torch.long, device=device)
    if labels.numel() == 0:
        raise ValueError("no labels given: pass at least one target class")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"labels {sorted(set(bad.tolist()))[:5]} are outside the model's "
                         f"{num_classes} classes [0, {num_classes - 1}]")
    return labels


def removed_slots(survivors: torch.Tensor, num_kept: int) -> torch.Tensor:
    """Ascending slots of ``range(num_kept)`` not in ``survivors`` ``(B, K')``, as ``(B, num_kept - K')``."""
    removed = torch.ones(survivors.shape[0], num_kept, dtype=torch.int8, device=survivors.device)
    removed.scatter_(1, survivors, 0)
    # A stable sort puts removed slots first, in ascending order, without reading anything on the host.
    order = torch.sort(removed, dim=1, descending=True, stable=True).indices
    return order[:, :num_kept - survivors.shape[1]]


@dataclass
class InversionState:
    """Everything one batch's optimisation carries between iterations.

    ``canvas`` holds every patch's latest committed value ``(B, N, Cp*p*p)``; ``param`` the retained
    patches ``(B, K, Cp*p*p)`` at grid indices ``kept`` ``(B, K)``, the only tensor Adam updates.
    ``emitted`` collects the finished samples of Patch Rebirth: ``(iteration, canvas then, grid
    positions (B, E))``.
    """

    labels: torch.Tensor
    generator: torch.Generator
    canvas: torch.Tensor
    kept: torch.Tensor
    param: torch.Tensor
    optimizer: torch.optim.Optimizer
    positions: tuple[torch.Tensor, torch.Tensor]
    priors: RetainedPixelPriors | None = None  # None when the base method has no pixel prior
    emitted: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    scores: torch.Tensor | None = None  # (B, K) CLS attention recorded by the latest scoring step
    targets: torch.Tensor | None = None  # (B, C) soft targets the loss aims at (None: the labels)

    def current_patches(self) -> torch.Tensor:
        """All patches at their current values (retained ones from ``param``), detached."""
        with torch.no_grad():
            return self.canvas.scatter(1, self.kept.unsqueeze(-1).expand_as(self.param), self.param)

    def commit(self) -> None:
        """Write the retained patches' values into the canvas."""
        with torch.no_grad():
            self.canvas.scatter_(1, self.kept.unsqueeze(-1).expand_as(self.param), self.param)

    def state_dict(self) -> dict[str, Any]:
        """The state as plain tensors, numbers and dicts (``torch.load(weights_only=True)`` reads it back);
        what the inverter derives from it (position tokens, the priors' plan) is not kept:
        ``SparseInverter.load_state`` rebuilds it."""
        return {"labels": self.labels, "generator": self.generator.get_state(), "canvas": self.canvas,
                "kept": self.kept, "param": self.param.detach(), "optimizer": self.optimizer.state_dict(),
                "emitted": [[iteration, canvas, positions] for iteration, canvas, positions in self.emitted],
                "scores": self.scores, "targets": self.targets}


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

    To time or count one step at a stage: ``state = inverter.state_at_stage(labels, seed, stage)``,
    then ``with inverter.session(): inverter.step(state, iteration)``.
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
        self.config.schedule.check_run(self.config.iterations, self.grid.num_patches)  # validates, warns
        self.policy = SELECTION_POLICIES[self.config.selection](self.config)
        self.stages: tuple[Stage, ...] = self.policy.plan(self.grid.num_patches)
        self.kept_counts = [self.grid.num_patches] + [stage.keep for stage in self.stages]
        if competitor is not None and patch_grid(competitor, self.grid.image_size) != self.grid:
            raise ValueError("the competitor must be a ViT with the teacher's patch grid and prefix layout")
        self.method = BASE_METHODS[self.config.base_method](self.config)
        self.callback = callback
        self.progress = progress
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if not self.dtype.is_floating_point:
            raise TypeError(f"the model's parameters are {self.dtype}; inversion needs a floating-point model")
        if self.config.precision == "bfloat16" and self.dtype != torch.float32:
            raise ValueError(f"precision='bfloat16' autocasts a float32 teacher, but its parameters are {self.dtype}; "
                             "convert it with .float() or keep precision='float32'")
        self.channels = ChannelMap.build(self.mean, self.std, self.config.tie_channels, self.device, self.dtype)
        # Adam's basis for each patch channel's pixels (None: plain Adam per pixel).
        self.step_basis = None
        if self.config.frequency_decay > 0:
            self.step_basis = patch_frequency_basis(self.grid.patch_size, self.config.frequency_decay).to(
                self.device, self.dtype)
        self.class_similarity = None
        if self.config.soft_targets > 0:
            head = model.get_classifier()
            head = head[0] if isinstance(head, tuple) else head
            if not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
                raise ValueError("soft_targets reads class similarity from a linear classifier head; this model has "
                                 "none (set soft_targets=0)")
            self.class_similarity = class_similarity(head.weight).cpu()
        self._objective_step = self._objective
        if self.config.compile_step:
            if self.config.base_method == "psaq":  # its loss reads features its hooks collect on the side
                raise ValueError("compile_step does not take base_method='psaq'; set compile_step=False")
            # Shapes that change (kept count, crossing pairs of a stage) become dynamic after their first
            # change, so a run compiles a handful of graphs and reuses them across stages and batches.
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._objective_step = torch.compile(self._objective, mode=mode)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def pixels(self, patches: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in ``[0, 1]`` of patches ``(B, N, Cp*p*p)`` in the optimised space (a
        state's ``canvas`` or ``current_patches()``)."""
        return self.channels.to_pixels(patches, self.grid)

    def invert(self, labels: Sequence[int] | torch.Tensor, seed: int | None = None,
               snapshots: bool = False, competitor: nn.Module | None = None) -> InvertedBatch:
        """Invert one image per label (``selection="rebirth"``: several sparse samples per label).

        Args:
            labels: target classes; lists longer than ``config.batch_size`` are inverted in chunks.
            seed: overrides ``config.seed``; chunk ``j`` uses ``derive_seed(seed, j)``.
            snapshots: keep the images and masks at every stage (for pictures of the process).
            competitor: a student for ``config.competition_weight`` in this call (default: the one
                given at construction).

        With Patch Rebirth each emitted sample is a row; ``provenance["trajectory"]`` gives each
        row's index into ``labels`` and ``provenance["emitted_at"]`` the iteration it finished.
        """
        labels = check_labels(labels, self.num_classes, self.device)
        seed = self.config.seed if seed is None else seed
        chunks = labels.split(self.config.batch_size)
        bar = progress_bar(len(chunks) * self.config.iterations, enabled=self.progress, desc="inverting",
                           unit="it", leave=False)
        try:
            parts = [self._invert_batch(chunk, derive_seed(seed, j), snapshots, bar, competitor)
                     for j, chunk in enumerate(chunks)]
        finally:
            if bar is not None:
                bar.close()
        batch = InvertedBatch.concatenate(parts)
        if "trajectory" in parts[0].provenance:
            offsets = [j * self.config.batch_size for j in range(len(parts))]
            batch.provenance["trajectory"] = [t + o for p, o in zip(parts, offsets) for t in p.provenance["trajectory"]]
            batch.provenance["emitted_at"] = [i for p in parts for i in p.provenance["emitted_at"]]
        batch.provenance["seed"] = seed
        return batch

    def _optimizer(self, param: torch.Tensor) -> torch.optim.Optimizer:
        if self.step_basis is not None:
            return BasisAdam([param], self.step_basis, lr=self.config.lr, betas=self.config.betas)
        # The fused kernel updates the parameter and both moments in one pass (CPU and CUDA).
        fused = param.device.type in ("cpu", "cuda")
        return torch.optim.Adam([param], lr=self.config.lr, betas=self.config.betas, fused=fused)

    def start(self, labels: torch.Tensor, seed: int, images: torch.Tensor | None = None) -> InversionState:
        """Fresh state for one batch, every patch retained: noise in normalized space
        (``config.initial_noise``), or ``images`` (``(B, C, H, W)`` pixels in ``[0, 1]``) as the starting
        point (a warm start)."""
        grid = self.grid
        generator = torch.Generator().manual_seed(seed)
        if images is None:
            noise = initial_noise(self.config.initial_noise, labels.numel(), self.channels.param_channels, grid,
                                  generator)
            canvas = images_to_patches(noise.to(self.device, self.dtype), grid.patch_size)
        else:
            canvas = self.channels.from_pixels(images.to(self.device), grid).to(self.dtype)
        kept = torch.arange(grid.num_patches, device=self.device).expand(labels.numel(), -1).contiguous()
        param = canvas.clone().requires_grad_(True)
        targets = None
        if self.class_similarity is not None:
            targets = dirichlet_targets(labels, self.class_similarity, self.config.soft_targets, generator,
                                        self.dtype)
        return InversionState(labels=labels, generator=generator, canvas=canvas, kept=kept, param=param,
                              optimizer=self._optimizer(param),
                              positions=position_tokens(self.model, grid, self.dtype),
                              priors=self._plan_priors(canvas, kept), targets=targets)

    def load_state(self, saved: dict[str, Any]) -> InversionState:
        """The ``InversionState`` whose ``state_dict()`` is ``saved``, on this inverter's device: its Adam
        state restored, position tokens and the priors' plan derived again, so the run goes on exactly."""
        device = self.device
        tensors = {name: None if saved[name] is None else saved[name].to(device)
                   for name in ("labels", "canvas", "kept", "param", "scores", "targets")}
        generator = torch.Generator()
        generator.set_state(saved["generator"])
        param = tensors["param"].clone().requires_grad_(True)
        optimizer = self._optimizer(param)
        optimizer.load_state_dict(saved["optimizer"])
        return InversionState(labels=tensors["labels"], generator=generator, canvas=tensors["canvas"],
                              kept=tensors["kept"], param=param, optimizer=optimizer,
                              positions=position_tokens(self.model, self.grid, self.dtype),
                              priors=self._plan_priors(tensors["canvas"], tensors["kept"]),
                              emitted=[(int(i), c.to(device), p.to(device)) for i, c, p in saved["emitted"]],
                              scores=tensors["scores"], targets=tensors["targets"])

    def _plan_priors(self, canvas: torch.Tensor, kept: torch.Tensor) -> RetainedPixelPriors | None:
        if not self.method.needs_images():
            return None
        return RetainedPixelPriors.plan(canvas, kept, self.grid, self.channels.param_channels)

    def state_at_stage(self, labels: Sequence[int] | torch.Tensor, seed: int, stage: int) -> InversionState:
        """A fresh state taken through the first ``stage`` planned stops, with random scores.

        No optimisation step is run: the state has the retained-patch count (and parameter, Adam
        state and prior plan) of stage ``stage`` (0: every patch), for timing or FLOP-counting one
        ``step`` there. The scores are drawn from a generator seeded with ``seed``.
        """
        if not 0 <= stage <= len(self.stages):
            raise ValueError(f"stage {stage} is not in [0, {len(self.stages)}] (the run's planned stages)")
        state = self.start(check_labels(labels, self.num_classes, self.device), seed)
        generator = torch.Generator().manual_seed(seed)
        for planned in self.stages[:stage]:
            self.stop(state, planned, torch.rand(state.kept.shape, generator=generator).to(self.device))
        return state

    def stop(self, state: InversionState, stage: Stage, scores: torch.Tensor | None = None) -> None:
        """Apply one planned stage: the policy picks the survivors (``scores`` default to the ones the
        last scoring step recorded); the rest are frozen into the canvas for good (and, for an emitting
        stage, recorded as a finished sample); param and Adam shrink."""
        scores = state.scores if scores is None else scores
        survivors = self.policy.select(scores, state.kept, stage.keep, state.generator)
        state.scores = None
        state.commit()
        if stage.emit:
            removed = state.kept.gather(1, removed_slots(survivors, state.kept.shape[1]))
            state.emitted.append((stage.iteration, state.canvas.clone(), removed))
        state.param, state.optimizer = shrink_rows(state.param, state.optimizer, survivors, self._optimizer)
        state.kept = state.kept.gather(1, survivors)
        state.priors = self._plan_priors(state.canvas, state.kept)

    def step(self, state: InversionState, iteration: int,
             scoring: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step on the retained patches. Returns ``(loss, logits, loss parts)``.

        Everything returned is a tensor (no host sync). ``scoring`` marks the iteration right before
        a stopping stage: it records the last block's CLS attention into ``state.scores`` (for
        policies that read it), eagerly, and with pixel augmentation it runs un-augmented so that
        each token's attention belongs to exactly one retained patch.
        """
        cfg = self.config
        set_lr(state.optimizer, lr_at(cfg.lr_schedule, cfg.lr, iteration, cfg.iterations, cfg.warmup_iterations))
        positions, patches = self._augmented(state, scoring)
        targets = state.labels if state.targets is None else state.targets
        inputs = (state.param, patches, positions, targets, state.positions, state.priors)
        if scoring and self.policy.needs_scores:
            with record_cls_attention(self.model) as attention:
                loss, logits, parts = self._objective(*inputs)
            state.scores = attention["scores"]
        else:
            loss, logits, parts = self._objective_step(*inputs)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        self.channels.clamp_(state.param)
        return loss, logits, parts

    def _augmented(self, state: InversionState, scoring: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grid positions (B, K), patches (B, K, C*p*p) in the model's channels)`` of this step."""
        cfg, grid, param = self.config, self.grid, state.param
        if cfg.augment == "pixel" and not scoring:
            full = state.canvas.scatter(1, state.kept.unsqueeze(-1).expand_as(param), param)
            images = patches_to_images(self.channels.to_model(full), grid)
            return random_resized_crop_cells(images, state.kept, grid, cfg.crop_scale, cfg.flip, state.generator)
        positions, patches = state.kept, param
        if cfg.augment == "patch":
            positions, patches = roll_flip_patches(state.kept, param, grid, cfg.jitter, cfg.flip, state.generator)
        return positions, self.channels.to_model(patches)

    def _objective(self, param: torch.Tensor, patches: torch.Tensor, positions: torch.Tensor,
                   labels: torch.Tensor, position_cache: tuple[torch.Tensor, torch.Tensor],
                   priors: RetainedPixelPriors | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, logits, parts)`` of one step: the base method's loss on the logits of ``patches`` at
        ``positions`` and on the whole image (``priors`` bound to ``param``), plus the competition
        term. Tensors in, tensors out: the part ``compile_step`` compiles."""
        logits = self._logits(self.model, patches, positions, position_cache)
        image_priors = None if priors is None else priors.bind(param, with_abs=self.config.tv_l1_weight > 0)
        loss, parts = self.method.loss(logits, labels, image_priors)
        if self.config.competition_weight > 0 and self.competitor is not None:
            competition, parts["competition_js"] = competition_loss(
                self._logits(self.competitor, patches, positions), logits)
            loss = loss + self.config.competition_weight * competition
        return loss, logits, parts

    def _logits(self, model: nn.Module, patches: torch.Tensor, positions: torch.Tensor,
                position_cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``model``'s logits on the patches at ``config.precision``, handed back in the pixels' dtype."""
        with vit_precision(self.device.type, self.config.precision):
            logits = forward_patches(model, self.grid, patches, positions, position_cache)
        return logits.to(self.dtype)

    @contextmanager
    def session(self, competitor: nn.Module | None = None) -> Iterator[None]:
        """The context ``step`` runs in: teacher (and competitor) frozen, the base method's hooks on.
        ``competitor`` replaces the constructor's for the session (a student that changes as it learns)."""
        previous = self.competitor
        self.competitor = competitor or previous
        try:
            with ExitStack() as stack:
                stack.enter_context(frozen(self.model))
                stack.enter_context(frozen(self.competitor or nn.Identity()))
                stack.enter_context(self.method.hooks(self.model))
                yield
        finally:
            self.competitor = previous

    def advance(self, state: InversionState, start: int, steps: int, *,
                before_stop: Callable[[int, InversionState], None] | None = None,
                after_step: Callable[[int, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], None] | None = None
                ) -> None:
        """Iterations ``start .. start + steps - 1`` of a run: the loop of ``invert`` and of every caller
        that inverts in pieces (the online distillation pool). Call it within ``session()``.

        At an iteration where a stage is planned the stage stops its patches first (``before_stop`` sees
        the state just before); the step before a stage records the attention scores the policy reads.
        Iterations past ``config.iterations`` repeat the last one's learning rate (a sample kept under
        inversion). ``after_step`` gets ``(iteration, loss, logits, loss parts)`` after each step.
        """
        stages = {stage.iteration: stage for stage in self.stages}
        last = self.config.iterations - 1
        for iteration in range(start, start + steps):
            stage = stages.get(iteration)
            if stage is not None:
                if before_stop is not None:
                    before_stop(iteration, state)
                self.stop(state, stage)
            # Attention is scored only on the forward right before a stage, for policies that read it.
            scoring = (iteration + 1) in stages and self.policy.needs_scores
            loss, logits, parts = self.step(state, min(iteration, last), scoring=scoring)
            if after_step is not None:
                after_step(iteration, loss, logits, parts)

    def _invert_batch(self, labels: torch.Tensor, seed: int, snapshots: bool, bar,
                      competitor: nn.Module | None) -> InvertedBatch:
        cfg = self.config
        started = time.perf_counter()
        state = self.start(labels, seed)
        history: list[dict[str, Any]] = []
        shots: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def record(iteration: int, loss: torch.Tensor, logits: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
            if bar is not None:
                bar.update(1)
            if iteration % cfg.log_every == 0 or iteration == cfg.iterations - 1:
                history.append(self._log(iteration, state, loss, logits, parts, bar))

        def snapshot(iteration: int, state: InversionState) -> None:
            shots.append(self._snapshot(iteration, state))

        with self.session(competitor):
            self.advance(state, 0, cfg.iterations, before_stop=snapshot if snapshots else None, after_step=record)
        state.commit()
        if snapshots:
            shots.append(self._snapshot(cfg.iterations, state))
        final = {name: value for name, value in history[-1].items() if name not in ("iteration", "loss", "kept")}
        return self._finish(state, seed, final, history, shots, time.perf_counter() - started)

    def _log(self, iteration: int, state: InversionState, loss: torch.Tensor, logits: torch.Tensor,
             parts: dict[str, torch.Tensor], bar) -> dict[str, Any]:
        """One history record: the only place the loop reads values on the host (one sync)."""
        accuracy = (logits.argmax(1) == state.labels).float().mean()
        record = loss_floats({"iteration": iteration, "loss": loss.detach(), "kept": int(state.kept.shape[1]),
                              "target_accuracy": accuracy, **parts})
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", kept=record["kept"])
        if self.callback is not None:
            self.callback(record)
        logger.debug("iteration %d: %s", iteration, record)
        return record

    def _finish(self, state: InversionState, seed: int, final_losses: dict[str, float],
                history: list[dict[str, Any]], shots: list, seconds: float) -> InvertedBatch:
        """The batch: one row per image, or per emitted sample with Patch Rebirth."""
        provenance = {
            "config": self.config.to_dict(), "teacher": _model_name(self.model), "seed": seed,
            "kept_counts": self.kept_counts, "num_patches": self.grid.num_patches,
            "final_losses": final_losses, "seconds": round(seconds, 3), "torch_version": torch.__version__,
        }
        samples = [*state.emitted, (self.config.iterations, state.canvas, state.kept)]
        rows = len(state.labels)
        if len(samples) > 1:
            provenance["trajectory"] = list(range(rows)) * len(samples)
            provenance["emitted_at"] = [iteration for iteration, _, _ in samples for _ in range(rows)]
        kept = [positions for _, _, positions in samples]
        same = len({k.shape[1] for k in kept}) == 1
        return InvertedBatch(
            images=torch.cat([self.pixels(canvas) for _, canvas, _ in samples]),
            patch_mask=torch.cat([indices_to_mask(k, self.grid) for k in kept]),
            labels=state.labels.repeat(len(samples)),
            kept_indices=torch.cat(kept) if same else torch.zeros(rows * len(samples), 0, dtype=torch.long),
            mean=tuple(self.mean), std=tuple(self.std), provenance=provenance, history=history, snapshots=shots)

    def _snapshot(self, iteration: int, state: InversionState) -> tuple[int, torch.Tensor, torch.Tensor]:
        return (iteration, self.pixels(state.current_patches()).cpu(),
                indices_to_mask(state.kept, self.grid).cpu())


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("zoo_name") or cfg.get("architecture") or type(model).__name__
