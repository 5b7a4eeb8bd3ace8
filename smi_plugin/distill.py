"""Data-free knowledge distillation: a KD trainer over inverted images, judged on real held-out images.

* ``kd_loss``: ``KL(softmax(t/T) || softmax(s/T)) * T^2`` (T = 20 by default, as the paper).
* ``DistillConfig``: every setting, one set of defaults for Python and ``smi distill`` (whose
  flags are generated from it); ``DistillConfig.for_mode("full")`` is the from-scratch recipe.
* ``sample_batch``/``augment_batch``, ``build_optimizer``, ``learning_rate``: the trainer's pieces, as functions.
* ``LeastSquaresHead``: a linear probe's head solved exactly for the teacher's logits over every finished
  sample (``DistillConfig.probe_head``'s default); ``headless`` runs a model without its head.
* ``KDTrainer``: any teacher and student ``nn.Module`` on accelerate (CPU, one GPU or many). ViT
  students see only retained tokens (``forward_kept_tokens``), others see images with stopped
  patches set to 0 (the dataset mean). Data sources (``DistillConfig.source``): ``pool`` (a fixed
  pool of inverted images, an ``InvertedBatch``), ``alternating`` (the paper's: invert a batch,
  take KD steps, repeat) and ``online`` (a pool under continual sparse inversion whose finished
  samples are replaced by fresh ones, ``OnlinePool``; ``smi distill``'s default). ``minutes`` trains
  for a wall-clock budget instead of ``steps``.
* ``save_student``: the student as ``student.safetensors`` + ``student.json``, which
  ``load_teacher(DIR)`` loads back as any timm user would.

The inverted-data streams moved to ``smi_plugin.stream`` (re-exported here).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import monotonic
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batch import InvertedBatch, balanced_labels
from .config import ConfigBase, check_choice, check_positive_ints, option
from .data import ImageSplit
from .evaluation import evaluate_accuracy
from .inverter import SparseInverter, derive_seed
from .io import atomic_path, atomic_write_text
from .online import OnlinePool
from .progress import progress_bar
from .stream import distillation_stream, stream_from_inverted  # noqa: F401  (public here too)
from .tokens import UnsupportedModelError, check_vit, forward_kept_tokens
from .zoo import SAVED_CARD, SAVED_FORMAT, SAVED_WEIGHTS

logger = logging.getLogger(__name__)

MODES = ("linear-probe", "full")
SOURCES = ("pool", "alternating", "online")
OPTIMIZERS = ("sgd", "adamw")
PROBE_HEADS = ("least-squares", "gradient")
FAILURE_FACTOR = 1.5  # a student under 1.5x chance accuracy has failed


class CheckpointMismatchError(ValueError):
    """An output directory's checkpoint was written by a run with other settings, so it cannot be resumed."""


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


# ------------------------------------------------------------------------------------- config
@dataclass
class DistillConfig(ConfigBase):
    """How to distil (the paper's linear probe by default; ``for_mode("full")`` trains from scratch)."""

    mode: str = option("linear-probe", "linear-probe: frozen pretrained backbone + new head (the paper); "
                       "full: train every weight", choices=MODES)
    probe_head: str = option("least-squares", "linear-probe mode: least-squares solves the head exactly for the "
                             "teacher's logits on every inverted sample (and its mirror, with flips) once it is "
                             "finished (KD's high-temperature limit; KD steps only report the loss, the optimizer "
                             "flags are unused); gradient trains it by KD steps with the optimizer (the paper)",
                             choices=PROBE_HEADS)
    source: str = option("pool", "pool: invert --num-images first, then distil; alternating: invert a batch, "
                         "take KD steps, repeat; online: a pool kept under inversion while the student learns "
                         "(each step: --inversion-steps on one inversion batch, then KD on it plus --kd-batch-size "
                         "replayed pool samples)", choices=SOURCES)
    steps: int = option(500, "KD optimisation steps")
    minutes: float | None = option(None, "wall-clock budget in minutes instead of --steps: training stops once "
                                   "it is spent and the learning rate follows its elapsed share (a resumed run "
                                   "gets what is left; not bit-reproducible, unlike --steps)")
    epochs: float | None = option(None, "source pool: this many passes over the pool instead of --steps")
    batch_size: int = option(32, "KD batch (paper: 32); source online: the replayed samples added to the "
                             "freshly inverted batch (0: no replay)")
    temperature: float = option(20.0, "KD temperature (paper: 20)")
    optimizer: str = option("sgd", "KD optimizer (paper: SGD)", choices=OPTIMIZERS)
    lr: float = option(0.1, "KD learning rate (paper: 0.1)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(1e-4, "weight decay")
    lr_schedule: str = option("constant", "KD learning-rate schedule", choices=("constant", "cosine"))
    flip: bool = option(True, "random horizontal flips of the inverted images (and masks)")
    mixup: float = option(0.0, "share of KD inputs replaced by a random convex mix of two pool images "
                          "(union of their masks), each labelled by the teacher on the fly; 0 disables")
    images_per_round: int = option(32, "source alternating: images inverted per round")
    kd_steps_per_round: int = option(4, "source alternating: KD steps per round")
    pool_size: int = option(2048, "source online: images kept under inversion (and as many finished ones kept "
                            "for replay)")
    inversion_steps: int = option(2, "source online: inversion iterations per KD step")
    renew: bool = option(True, "source online: a pool slot that has run the inversion's --iterations starts "
                         "again (from noise, or --warm-start), its images kept for replay (fresh samples); "
                         "otherwise slots are inverted for the whole run")
    warm_start: bool = option(False, "source online: a renewed slot starts from mixes of two finished samples "
                              "(one of each image's class, one of another, weight U(0, 1)) instead of noise")
    competition_start: float = option(0.1, "with --competition-weight: share of the budget (steps or minutes) "
                                      "trained before the student competes; a student that has learnt nothing "
                                      "yet disagrees everywhere, which teaches nothing")
    eval_every: int = option(50, "KD steps between evaluations on the real held-out images")
    checkpoint_every: int = option(100, "KD steps between checkpoints (with an output directory)")
    seed: int = option(0, "seed of batch sampling, flips and mixes (resume continues the sequence)")

    def __post_init__(self) -> None:
        check_choice(self, "mode", MODES)
        check_choice(self, "probe_head", PROBE_HEADS)
        check_choice(self, "source", SOURCES)
        check_choice(self, "optimizer", OPTIMIZERS)
        check_choice(self, "lr_schedule", ("constant", "cosine"))
        if not (self.source == "online" and self.batch_size == 0):  # online: 0 replays nothing
            check_positive_ints(self, "batch_size")
        check_positive_ints(self, "steps", "images_per_round", "kd_steps_per_round", "pool_size",
                            "inversion_steps", "eval_every", "checkpoint_every")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError("DistillConfig.temperature and .lr must be > 0")
        if not 0.0 <= float(self.mixup) <= 1.0:
            raise ValueError(f"DistillConfig.mixup is a share of the KD inputs in [0, 1], got {self.mixup}")
        self.mixup = float(self.mixup)
        if not 0.0 <= float(self.competition_start) < 1.0:
            raise ValueError(f"DistillConfig.competition_start is a share of the budget in [0, 1), "
                             f"got {self.competition_start}")
        self.competition_start = float(self.competition_start)
        if self.minutes is not None:
            if not self.minutes > 0:
                raise ValueError(f"DistillConfig.minutes must be > 0 (or None to use steps), got {self.minutes}")
            if self.epochs is not None:
                raise ValueError("DistillConfig.minutes and .epochs both set the training length: give one")
            self.minutes = float(self.minutes)
        if self.epochs is not None:
            if self.epochs <= 0:
                raise ValueError(f"DistillConfig.epochs must be > 0 (or None to use steps), got {self.epochs}")
            if self.source != "pool":
                raise ValueError(f"DistillConfig.epochs counts passes over a fixed pool; with source="
                                 f"{self.source!r} the pool changes as it trains: set steps instead")

    @classmethod
    def for_mode(cls, mode: str, **overrides: Any) -> DistillConfig:
        """The recipe for ``mode`` (``MODE_DEFAULTS``) and for ``overrides["source"]`` when given
        (``SOURCE_DEFAULTS``), with some fields overridden."""
        if mode not in MODES:
            raise ValueError(f"DistillConfig.mode {mode!r} is unknown; use one of {list(MODES)}")
        source = SOURCE_DEFAULTS.get(overrides.get("source", ""), {})
        return cls(**{"mode": mode, **MODE_DEFAULTS[mode], **source, **overrides})

    def total_steps(self, pool_size: int) -> int:
        """KD steps for a pool of ``pool_size`` images: ``steps``, or ``epochs`` passes over the pool."""
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * pool_size / self.batch_size))


# What each mode changes from the field defaults: a from-scratch student needs AdamW and a schedule.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear-probe": {},
    "full": {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "lr_schedule": "cosine", "batch_size": 64},
}
# What the online source changes on top (the prototype's recipe: 128 replayed samples, half of the
# inputs mixed, a low temperature).
SOURCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "online": {"batch_size": 128, "mixup": 0.5, "temperature": 4.0, "eval_every": 250},
}


# ------------------------------------------------------------------------------------- pieces
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


class LeastSquaresHead:
    """A linear head on frozen features, solved exactly: the ridge least-squares map from the features to the
    teacher's logits over every sample accumulated so far.

    Matching logits in the mean-square sense is KD's high-temperature limit (Hinton et al., 2015; the paper's
    T = 20 is near it), and for a linear head on a frozen backbone it is a convex quadratic whose optimum two
    running sums determine (``gram`` of the features with a constant column, ``cross`` with the logits). Gradient
    descent stalls on it: a ViT's pooled features are LayerNorm outputs whose covariance spans many decades of
    eigenvalues, so SGD fits the leading directions only (on the same 1024 Fashion-MNIST inversions, a head from
    2000 SGD steps reached 61.5% on real images, the solved one 67.0%).

    Args:
        head: the ``nn.Linear`` to solve; ``solve()`` overwrites its weight (and bias).
        ridge: added to the features' diagonal, relative to its mean (the bias is not shrunk).
    """

    def __init__(self, head: nn.Module, ridge: float = 1e-5) -> None:
        if not isinstance(head, nn.Linear):
            raise ValueError(f"probe_head='least-squares' solves an nn.Linear head, not {type(head).__name__}; "
                             "use probe_head='gradient'")
        self.head, self.ridge = head, ridge
        columns = head.in_features + (head.bias is not None)
        self.gram = torch.zeros(columns, columns, dtype=torch.float64, device=head.weight.device)
        self.cross = torch.zeros(columns, head.out_features, dtype=torch.float64, device=head.weight.device)

    def design(self, features: torch.Tensor) -> torch.Tensor:
        """The least-squares design matrix of ``features``: float64, with a constant column for the bias."""
        features = features.to(torch.float64)
        if self.head.bias is None:
            return features
        return torch.cat([features, features.new_ones(len(features), 1)], dim=1)

    def increments(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a batch adds to ``(gram, cross)``."""
        design = self.design(features)
        return design.T @ design, design.T @ targets.to(torch.float64)

    def accumulate(self, gram: torch.Tensor, cross: torch.Tensor) -> None:
        self.gram += gram
        self.cross += cross

    @torch.no_grad()
    def solve(self) -> None:
        """Write the ridge solution over everything accumulated into the head."""
        features = self.head.in_features
        shrink = torch.zeros(len(self.gram), dtype=torch.float64, device=self.gram.device)
        shrink[:features] = self.ridge * self.gram.diagonal()[:features].mean().clamp_min(1e-12)
        solution = torch.linalg.solve(self.gram + torch.diag(shrink), self.cross)
        self.head.weight.copy_(solution[:features].T)
        if self.head.bias is not None:
            self.head.bias.copy_(solution[features])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"gram": self.gram, "cross": self.cross}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.gram.copy_(state["gram"])
        self.cross.copy_(state["cross"])


@contextmanager
def headless(model: nn.Module, head: nn.Module) -> Iterator[None]:
    """Within the context, ``model``'s submodule ``head`` is an ``nn.Identity``: the model returns its features."""
    name = next(name for name, module in model.named_modules() if module is head)
    parent, _, attribute = name.rpartition(".")
    owner = model.get_submodule(parent)
    setattr(owner, attribute, nn.Identity())
    try:
        yield
    finally:
        setattr(owner, attribute, head)


def failed(accuracy: float, num_classes: int) -> bool:
    """Whether a student's accuracy is too close to chance to count as a result (< 1.5x chance)."""
    return accuracy < FAILURE_FACTOR / num_classes


def linear_probe_student(backbone: nn.Module, num_classes: int) -> nn.Module:
    """The paper's student: a backbone with a new classifier head; only the head trains."""
    import copy

    student = copy.deepcopy(backbone)
    student.reset_classifier(num_classes)
    return student


def as_pool(source: Any) -> InvertedBatch:
    """One ``InvertedBatch`` from an ``InvertedBatch``, a list of them, a calibration dataset or an export."""
    from .calibration import SparseInvertedCalibrationDataset

    if isinstance(source, InvertedBatch):
        return source
    if isinstance(source, (list, tuple)) and source and all(isinstance(b, InvertedBatch) for b in source):
        return InvertedBatch.concatenate([b.to("cpu") for b in source])
    if isinstance(source, SparseInvertedCalibrationDataset):
        return source.batch
    if source is None or (isinstance(source, (list, tuple)) and not source):
        raise ValueError("the KD pool is empty: invert some images first")
    from .export import load_inverted

    return load_inverted(source).to_batch()


# ------------------------------------------------------------------------------------ trainer
class KDTrainer:
    """Knowledge distillation from ``teacher`` to ``student`` on inverted data only.

    Args:
        teacher, student: any ``nn.Module`` classifiers over the same classes.
        config: a ``DistillConfig``.
        eval_split, mean, std: the real held-out split (and normalization) to evaluate on.
        out_dir: where checkpoints, ``history.json`` and ``learning_curve.png`` go (optional).
        inverter: a ``SparseInverter`` of the teacher, needed for ``source="alternating"``/``"online"``.
        accelerator: an ``accelerate.Accelerator``; by default one process on the best device (under
            a multi-process launch, pass ``Accelerator()`` built after ``distributed_state()``).

    Example:
        >>> trainer = KDTrainer(teacher, student, DistillConfig(steps=300), test, mean, std, out_dir="runs/kd")
        >>> history = trainer.fit(pool)     # or trainer.fit() with an inverter (alternating, online)
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, config: DistillConfig, eval_split: ImageSplit | None,
                 mean: Sequence[float], std: Sequence[float], out_dir: str | os.PathLike | None = None,
                 inverter: SparseInverter | None = None, progress: bool = True, accelerator: Any = None) -> None:
        if config.source != "pool" and inverter is None:
            raise ValueError(f"source={config.source!r} inverts as it trains: pass inverter=SparseInverter(teacher, ...)")
        if config.minutes is not None and accelerator is not None and accelerator.num_processes > 1:
            # each process has its own clock: they would stop after different step counts and hang
            raise ValueError("DistillConfig.minutes needs one process (each has its own clock); give steps "
                             "for a multi-process run")
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.accelerator, self.config, self.eval_split = accelerator, config, eval_split
        self.mean, self.std, self.inverter, self.progress = tuple(mean), tuple(std), inverter, progress
        self.out_dir = Path(out_dir) if out_dir else None
        self.teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
        student = student.to(accelerator.device)
        self.head_solver: LeastSquaresHead | None = None
        if config.mode == "linear-probe" and config.probe_head == "least-squares":
            self.head_solver = LeastSquaresHead(classifier_head(student))
            self.student, self.optimizer = accelerator.prepare(student.requires_grad_(False)), None
        else:
            self.student, self.optimizer = accelerator.prepare(student, build_optimizer(student, config))
        self.step, self.total_steps = 0, config.steps
        self.elapsed = 0.0  # seconds of training so far (over resumes), the clock of a minutes budget
        self.pool: InvertedBatch | None = None
        self.online = (OnlinePool(inverter, config.pool_size, config.seed, renew=config.renew,
                                  warm_start=config.warm_start)
                       if config.source == "online" else None)
        self.history: dict[str, list] = {"kd_loss": [], "eval": [], "pool_size": [], "minutes": []}

    @property
    def images_seen(self) -> int:
        """Distinct inverted samples the student has trained on (pool size; online: slots visited)."""
        if self.online is not None:
            return len(self.online)
        return 0 if self.pool is None else len(self.pool)

    def fit(self, pool: Any = None) -> dict[str, list]:
        """Train for ``total_steps`` (or ``config.minutes``), resuming from ``out_dir``'s checkpoint when there is one.

        Args:
            pool: for ``source="pool"``, the inverted data: an ``InvertedBatch``, a list of them,
                a ``SparseInvertedCalibrationDataset`` or an exported dataset.
        """
        cfg = self.config
        if cfg.source == "pool":
            self._set_pool(as_pool(pool))
        self._load_checkpoint()
        if cfg.source == "pool" and self.head_solver is not None and self.step == 0:
            self._absorb(self.pool)
        self.total_steps = cfg.total_steps(len(self.pool) if cfg.source == "pool" else 0)
        timed = cfg.minutes is not None
        bar = progress_bar(None if timed else self.total_steps, initial=self.step, enabled=self.progress,
                           desc=f"distilling ({cfg.mode}, {cfg.source}"
                                + (f", {cfg.minutes:g} min)" if timed else ")"), unit="step")
        self.student.train(cfg.mode == "full")  # a frozen backbone keeps its dropout/norm behaviour fixed
        clock = monotonic() - self.elapsed
        position, total = self.progress_position()
        while position < total:
            x, m = self.next_batch()
            loss = self.train_step(x, m)
            self.elapsed = monotonic() - clock
            self.history["kd_loss"].append((self.step, loss))
            bar.update(1)
            bar.set_postfix(kd_loss=f"{loss:.3f}", pool=self.images_seen)
            position, total = self.progress_position()
            last = position >= total
            if self.eval_split is not None and (self.step % cfg.eval_every == 0 or last):
                self.history["eval"].append((self.step, self.evaluate()))
                self.history["pool_size"].append((self.step, self.images_seen))
                self.history["minutes"].append((self.step, self.elapsed / 60))
            if self.step % cfg.checkpoint_every == 0 or last:
                self._save_checkpoint()
        bar.close()
        self._write_outputs()
        return self.history

    def progress_position(self) -> tuple[float, float]:
        """Where training is, and where it ends: (steps taken, total steps), or (seconds elapsed,
        budget seconds) under ``config.minutes``; the loop, its end and the schedule all read this."""
        if self.config.minutes is None:
            return self.step, self.total_steps
        return self.elapsed, self.config.minutes * 60

    def train_step(self, x: torch.Tensor, m: torch.Tensor) -> float:
        """One KD step on normalized inputs ``x`` with patch masks ``m``; the teacher labels the same view."""
        device = self.accelerator.device
        x, m = x.to(device), m.to(device)
        with torch.no_grad():
            teacher_logits = forward_sparse(self.teacher, x, m)
        student = self.accelerator.unwrap_model(self.student)
        if self.head_solver is not None:  # solved as samples arrive (_absorb): the loss of the head they gave
            with torch.no_grad():
                loss = kd_loss(forward_sparse(student, x, m), teacher_logits, self.config.temperature)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.config, *self.progress_position())
            loss = kd_loss(forward_sparse(student, x, m), teacher_logits, self.config.temperature)
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            self.optimizer.step()
        self.step += 1
        return loss.item()

    def _absorb(self, samples: InvertedBatch) -> None:
        """Least-squares head: add each new sample's kept view (and its mirror, with ``flip``) to the head's
        sums, of every process, and solve the head again."""
        student, head = self.accelerator.unwrap_model(self.student), self.head_solver.head
        x, m = samples.normalized().to(self.accelerator.device), samples.patch_mask.to(self.accelerator.device)
        views = [(x, m), (x.flip(-1), m.flip(-1))] if self.config.flip else [(x, m)]
        for view, mask in views:
            with torch.no_grad(), headless(student, head):  # the features, in input order
                features = forward_sparse(student, view, mask)
            with torch.no_grad():
                teacher_logits = forward_sparse(self.teacher, view, mask)
            gram, cross = self.head_solver.increments(features, teacher_logits)
            if self.accelerator.num_processes > 1:  # every process solves the same head from everyone's samples
                gram, cross = self.accelerator.reduce(gram, "sum"), self.accelerator.reduce(cross, "sum")
            self.head_solver.accumulate(gram, cross)
        self.head_solver.solve()

    # -- data sources
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs of the next step from the configured source (growing/advancing the pool first)."""
        cfg = self.config
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, self.step))
        if cfg.source == "alternating" and self.step % cfg.kd_steps_per_round == 0:
            self._grow_pool(self.step // cfg.kd_steps_per_round)
        if cfg.source == "online":
            return self._online_batch(generator)
        return sample_batch(self._pixels, self._masks, min(cfg.batch_size, len(self._pixels)), generator,
                            flip=cfg.flip, mixup=cfg.mixup)

    def _online_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance one slot of the online pool; its images plus ``batch_size`` replayed pool samples (none
        when 0)."""
        cfg = self.config
        self.online.inverter.competitor = self._competitor()
        finished = self.online.finished
        fresh = self.online.advance(self.step % self.online.num_slots, cfg.inversion_steps)
        if self.head_solver is not None and self.online.finished > finished:  # they are the memory's last rows
            memory = self.online.memory
            self._absorb(memory.select(range(len(memory) - (self.online.finished - finished), len(memory))))
        # The fresh batch is always seen; the replayed rows are drawn from the memory and every visited slot.
        parts = [fresh]
        if cfg.batch_size:  # 0: no replay, the fresh batch alone
            parts.append(self.online.sample(cfg.batch_size, generator))
        x = torch.cat([part.normalized() for part in parts])
        m = torch.cat([part.patch_mask for part in parts])
        return augment_batch(x, m, generator, flip=cfg.flip, mixup=cfg.mixup)

    def _competitor(self) -> nn.Module | None:
        """The student, once ``competition_start`` of the budget has passed, when the inversion competes."""
        weight = self.inverter.config.competition_weight if self.inverter is not None else 0
        position, total = self.progress_position()
        if weight <= 0 or position < self.config.competition_start * total:
            return None
        return self.accelerator.unwrap_model(self.student)

    def _set_pool(self, pool: InvertedBatch) -> None:
        if len(pool) == 0:
            raise ValueError("the KD pool is empty: invert some images first")
        self.pool = pool
        self._pixels, self._masks = pool.normalized().cpu(), pool.patch_mask.cpu()

    def _grow_pool(self, round_index: int) -> None:
        cfg = self.config
        if self.pool is not None and len(self.pool) >= (round_index + 1) * cfg.images_per_round:
            return  # restored from a checkpoint
        labels = balanced_labels(cfg.images_per_round, self.inverter.num_classes)
        labels = labels[round_index % len(labels):] + labels[:round_index % len(labels)]
        self.inverter.competitor = self._competitor()  # ADI: compete with the current student if asked
        batch = self.inverter.invert(labels, seed=derive_seed(cfg.seed, round_index)).to("cpu")
        if self.head_solver is not None:
            self._absorb(batch)
        self._set_pool(batch if self.pool is None else InvertedBatch.concatenate([self.pool, batch]))

    def evaluate(self) -> float:
        """Top-1 of the student on the real held-out split (dense, full images)."""
        was_training = self.student.training
        self.student.eval()
        accuracy = evaluate_accuracy(self.student, self.eval_split, self.mean, self.std,
                                     device=self.accelerator.device)
        self.student.train(was_training)
        return accuracy

    # -- checkpoints and outputs
    def _checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir else None

    def _save_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if path is None or not self.accelerator.is_main_process:
            return
        state = {"step": self.step, "elapsed": self.elapsed, "student": self.accelerator.unwrap_model(self.student).state_dict(),
                 "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                 "probe_head": self.head_solver.state_dict() if self.head_solver is not None else None,
                 "history": self.history, "config": self.config.to_dict(),
                 "pool": self.pool if self.config.source == "alternating" else None,
                 "online": self.online.state_dict() if self.online is not None else None,
                 "inversion": self._inversion_settings()}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def _inversion_settings(self) -> dict | None:
        """The inverter's config where it makes the data (a resumed run must invert alike)."""
        if self.inverter is None or self.config.source == "pool":
            return None
        return {k: v for k, v in self.inverter.config.to_dict().items() if k != "log_every"}

    def check_resumable(self) -> None:
        """Raise ``CheckpointMismatchError`` if ``out_dir`` holds a checkpoint of a run with other settings
        (``fit`` would refuse it): callers check before spending time on inversion."""
        path = self._checkpoint_path()
        if path is not None and path.is_file():
            self._check_settings(path, torch.load(path, map_location="cpu", weights_only=False))

    def _check_settings(self, path: Path, state: dict) -> None:
        differences = []
        for name, saved, now in (("DistillConfig", state["config"], self.config.to_dict()),
                                 ("InversionConfig", state.get("inversion") or {}, self._inversion_settings() or {})):
            differences += [f"{name}.{field} {saved.get(field)!r} -> {now.get(field)!r}"
                            for field in sorted(saved.keys() | now.keys()) if saved.get(field) != now.get(field)]
        if differences:
            raise CheckpointMismatchError(
                f"{path} holds a run with other settings ({'; '.join(differences)}): give the settings it was "
                "written with to resume it, or another output directory")

    def _load_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if path is None or not path.is_file():
            return
        state = torch.load(path, map_location=self.accelerator.device, weights_only=False)
        self._check_settings(path, state)
        self.accelerator.unwrap_model(self.student).load_state_dict(state["student"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.head_solver is not None:
            self.head_solver.load_state_dict(state["probe_head"])
        self.step, self.history, self.elapsed = state["step"], state["history"], state.get("elapsed", 0.0)
        if state.get("pool") is not None:
            self._set_pool(state["pool"])
        if state.get("online") is not None:
            self.online.load_state_dict(state["online"])
        logger.info("resumed %s at step %d", path, self.step)

    def _write_outputs(self) -> None:
        if self.out_dir is None or not self.accelerator.is_main_process:
            return
        from .visualize import save_curves

        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "history.json", json.dumps(self.history) + "\n")
        if self.history["eval"]:
            save_curves({"student (real held-out)": self.history["eval"]}, self.out_dir / "learning_curve.png",
                        xlabel="KD step", ylabel="top-1", title="Data-free KD: held-out accuracy")


# ------------------------------------------------------------------------------------ students


def save_student(student: nn.Module, directory: str | os.PathLike, card: Mapping[str, Any]) -> Path:
    """Write ``student.safetensors`` and ``student.json`` (``card`` plus the weights' file name).

    ``card`` must hold ``architecture`` (a timm name), ``model_kwargs`` (``timm.create_model``
    keywords, JSON values), ``num_classes``, ``mean`` and ``std``; anything else (accuracy, teacher,
    dataset, mode) is kept as is. ``smi_plugin.load_teacher(directory)`` reads it back.
    """
    from safetensors.torch import save_file

    missing = [k for k in ("architecture", "model_kwargs", "num_classes", "mean", "std") if k not in card]
    if missing:
        raise ValueError(f"the student card lacks {missing}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    with atomic_path(out / SAVED_WEIGHTS) as tmp:
        save_file(weights, str(tmp))
    body = {"format": SAVED_FORMAT, **card, "weights": SAVED_WEIGHTS, "mean": list(card["mean"]),
            "std": list(card["std"])}
    atomic_write_text(out / SAVED_CARD, json.dumps(body, indent=2, default=list) + "\n")
    return out
