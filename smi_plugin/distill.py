"""Data-free knowledge distillation: an inverted-data stream and a generic KD trainer.

* ``kd_loss``: ``KL(softmax(t/T) || softmax(s/T)) * T^2`` (T = 20 by default, as the paper).
* ``distillation_stream``: a ``datasets.IterableDataset`` of inverted samples, produced on the fly
  by the inverter (one shard per list of work items, so ``split_dataset_by_node`` and DataLoader
  workers get distinct shards) or read from an exported dataset.
* ``KDTrainer``: any teacher and student ``nn.Module`` on accelerate (CPU, one GPU or many). ViT
  students see only retained tokens (``forward_kept_tokens``), others see images with stopped
  patches set to 0 (the dataset mean). Modes: ``linear-probe`` (frozen backbone, new head, the
  paper's setting) and ``full``. Sources: a fixed pool of inverted images, or the paper's
  alternating schedule (invert a batch, take KD steps, repeat). Periodic evaluation on real
  held-out images, checkpoints, exact resume, a progress bar and learning-curve PNGs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import InversionConfig
from .data import ImageSplit
from .evaluation import evaluate_accuracy
from .inverter import SparseInverter, derive_seed
from .io import atomic_path, atomic_write_text
from .tokens import UnsupportedModelError, check_vit, forward_kept_tokens

MODES = ("linear-probe", "full")
SOURCES = ("pool", "alternating")


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


# ------------------------------------------------------------------------------------- stream
def _invert_shard(items: list[dict], teacher: nn.Module, config: dict, with_logits: bool) -> Iterator[dict]:
    inverter = SparseInverter(teacher, InversionConfig.from_dict(config), progress=False)
    for item in items:
        batch = inverter.invert(item["labels"], seed=item["seed"])
        pixels = batch.normalized()
        logits = forward_kept_tokens(teacher, pixels, batch.patch_mask).detach() if with_logits else None
        for row in range(len(batch)):
            sample = {"pixel_values": pixels[row].cpu().numpy(), "patch_mask": batch.patch_mask[row].cpu().numpy(),
                      "label": int(batch.labels[row]), "seed": int(item["seed"]), "item": int(item["index"])}
            if with_logits:
                sample["teacher_logits"] = logits[row].cpu().numpy()
            yield sample


def distillation_stream(teacher: nn.Module, config: InversionConfig, labels: Sequence[int], seed: int = 0,
                        num_shards: int = 2, with_logits: bool = False):
    """A ``datasets.IterableDataset`` inverting ``labels`` on the fly, in ``num_shards`` shards.

    Work items are the same as ``smi invert``'s (batches of ``config.batch_size`` seeded from
    ``seed`` and their index) and spread round-robin over shards; choose ``num_shards`` as a
    multiple of the number of processes so ``split_dataset_by_node`` gives each a whole share.

    Example:
        >>> stream = distillation_stream(teacher, config, labels=range(256), num_shards=4)
        >>> loader = DataLoader(stream.with_format("torch"), batch_size=32)
    """
    import datasets

    from .distributed import plan_work

    items = [{"index": w.index, "labels": list(w.labels), "seed": w.seed}
             for w in plan_work(list(labels), config.batch_size, seed)]
    num_shards = max(1, min(num_shards, len(items)))
    shards = [items[s::num_shards] for s in range(num_shards)]
    return datasets.IterableDataset.from_generator(
        _stream_generator, gen_kwargs={"shards": shards, "teacher": teacher, "config": config.to_dict(),
                                       "with_logits": with_logits})


def _stream_generator(shards: list[list[dict]], teacher: nn.Module, config: dict, with_logits: bool):
    for items in shards:
        yield from _invert_shard(items, teacher, config, with_logits)


def stream_from_inverted(inverted: Any, num_shards: int = 2):
    """A ``datasets.IterableDataset`` of normalized samples read from an exported dataset."""
    from .export import load_inverted

    inverted = load_inverted(inverted)
    mean = torch.tensor(inverted.mean).view(-1, 1, 1)
    std = torch.tensor(inverted.std).view(-1, 1, 1)

    def normalize(row: dict) -> dict:
        pixels = torch.as_tensor(row["pixel_values"])
        return {"pixel_values": ((pixels - mean) / std).numpy()}

    stream = inverted.dataset.select_columns(["pixel_values", "patch_mask", "label", "seed", "item"])
    return stream.to_iterable_dataset(num_shards=num_shards).map(normalize)


# ------------------------------------------------------------------------------------ trainer
@dataclass
class DistillConfig:
    """How to distil.

    Args:
        mode: ``linear-probe`` (only the student's classifier head trains) or ``full``.
        temperature: KD temperature (paper: 20).
        optimizer: ``sgd`` (paper: lr 0.1, momentum 0.9, weight decay 1e-4) or ``adamw``.
        lr, momentum, weight_decay: optimizer settings; lr_schedule: ``constant`` or ``cosine``.
        steps: KD optimisation steps; batch_size: KD batch (paper: 32).
        epochs: for ``source="pool"``, train for this many passes over the pool instead
            (``ceil(epochs * len(pool) / batch_size)`` steps), so a bigger pool gets proportionally
            more steps; ``None`` uses ``steps``.
        source: ``pool`` (train on a fixed pool) or ``alternating`` (invert ``images_per_round``
            images, take ``kd_steps_per_round`` steps on the growing pool, repeat).
        images_per_round, kd_steps_per_round: the alternating schedule.
        flip: random horizontal flips of the inverted images (and masks) during KD.
        mixup: replace each KD input with a random convex mix of two inverted images (weight
            ~ U(0, 1); the union of their masks is kept). The teacher labels every mix on the fly
            ("function matching"), so a small pool yields many distinct input/target pairs.
        eval_every: steps between evaluations on the real held-out set; checkpoint_every likewise.
        seed: seed of batch sampling and flips (resume continues the same sequence).
    """

    mode: str = "linear-probe"
    temperature: float = 20.0
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "constant"
    steps: int = 500
    batch_size: int = 32
    epochs: float | None = None
    source: str = "pool"
    images_per_round: int = 32
    kd_steps_per_round: int = 4
    flip: bool = True
    mixup: bool = False
    eval_every: int = 50
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DistillConfig.mode {self.mode!r} is unknown; use one of {MODES}")
        if self.source not in SOURCES:
            raise ValueError(f"DistillConfig.source {self.source!r} is unknown; use one of {SOURCES}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"DistillConfig.optimizer {self.optimizer!r} is unknown; use 'sgd' or 'adamw'")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"DistillConfig.lr_schedule {self.lr_schedule!r} is unknown; use 'constant' or 'cosine'")
        for name in ("steps", "batch_size", "images_per_round", "kd_steps_per_round", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"DistillConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError("DistillConfig.temperature and .lr must be > 0")
        if self.epochs is not None:
            if self.epochs <= 0:
                raise ValueError(f"DistillConfig.epochs must be > 0 (or None to use steps), got {self.epochs}")
            if self.source != "pool":
                raise ValueError("DistillConfig.epochs counts passes over a fixed pool; with source='alternating' "
                                 "the pool grows as it trains: set steps instead")

    def total_steps(self, pool_size: int) -> int:
        """KD steps for a pool of ``pool_size`` images: ``steps``, or ``epochs`` passes over the pool."""
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * pool_size / self.batch_size))


def linear_probe_student(backbone: nn.Module, num_classes: int) -> nn.Module:
    """The paper's student: a backbone with a new classifier head; only the head trains."""
    import copy

    student = copy.deepcopy(backbone)
    student.reset_classifier(num_classes)
    return student


@dataclass
class Pool:
    """Inverted samples held for KD: normalized pixels, masks, labels (grows in alternating mode)."""

    pixel_values: list[torch.Tensor] = field(default_factory=list)
    patch_mask: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(x.shape[0] for x in self.labels)

    def add(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixel_values.append(pixel_values.detach().cpu())
        self.patch_mask.append(patch_mask.detach().cpu())
        self.labels.append(labels.detach().cpu())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.cat(self.pixel_values), torch.cat(self.patch_mask), torch.cat(self.labels)


class KDTrainer:
    """Knowledge distillation from ``teacher`` to ``student`` on inverted data only.

    Args:
        teacher, student: any ``nn.Module`` classifiers over the same classes.
        config: a ``DistillConfig``.
        eval_split, mean, std: the real held-out split (and normalization) to evaluate on.
        out_dir: where checkpoints, ``history.json`` and ``learning_curve.png`` go (optional).
        inverter: a ``SparseInverter`` of the teacher, needed for ``source="alternating"``.

    Example:
        >>> trainer = KDTrainer(teacher, student, DistillConfig(steps=300), test, mean, std, out_dir="runs/kd")
        >>> history = trainer.fit(pool)     # or trainer.fit() with an inverter for alternating mode
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, config: DistillConfig, eval_split: ImageSplit | None,
                 mean: Sequence[float], std: Sequence[float], out_dir: str | os.PathLike | None = None,
                 inverter: SparseInverter | None = None, progress: bool = True) -> None:
        from accelerate import Accelerator

        from .distributed import distributed_state

        distributed_state()  # gloo on accelerator-less machines, before Accelerator reads the state
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.config, self.eval_split, self.mean, self.std = config, eval_split, tuple(mean), tuple(std)
        self.out_dir = Path(out_dir) if out_dir else None
        self.inverter, self.progress = inverter, progress
        if config.source == "alternating" and inverter is None:
            raise ValueError("source='alternating' inverts as it trains: pass inverter=SparseInverter(teacher, ...)")
        self.teacher = teacher.to(self.accelerator.device).eval().requires_grad_(False)
        student = student.to(self.accelerator.device)
        if config.mode == "linear-probe":
            head = student.get_classifier() if hasattr(student, "get_classifier") else None
            if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
                raise ValueError("linear-probe mode needs a student with get_classifier() returning a head with "
                                 "parameters (timm models have one); use mode='full' otherwise")
            student.requires_grad_(False)
            head.requires_grad_(True)
        params = [p for p in student.parameters() if p.requires_grad]
        if config.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.student, self.optimizer = self.accelerator.prepare(student, optimizer)
        self.step, self.total_steps = 0, config.steps
        self.pool = Pool()
        self.history: dict[str, list] = {"kd_loss": [], "eval": [], "pool_size": []}

    # -- data
    def _sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, masks, _ = self._pool_tensors
        index = torch.randint(len(pixels), (min(self.config.batch_size, len(pixels)),), generator=generator)
        x, m = pixels[index], masks[index]
        if self.config.flip:
            flip = torch.rand(len(index), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            m = torch.where(flip.view(-1, 1, 1), m.flip(-1), m)
        if self.config.mixup:
            partner = torch.randperm(len(index), generator=generator)
            weight = torch.rand(len(index), 1, 1, 1, generator=generator)
            x = weight * x + (1 - weight) * x[partner]
            m = m | m[partner]
        device = self.accelerator.device
        return x.to(device), m.to(device)

    def _grow_pool(self, round_index: int) -> None:
        from .batch import balanced_labels

        cfg = self.config
        labels = balanced_labels(cfg.images_per_round, self.inverter.num_classes)
        labels = labels[round_index % len(labels):] + labels[:round_index % len(labels)]
        # The inverter competes against the current student when its config asks for it (ADI).
        self.inverter.competitor = self.accelerator.unwrap_model(self.student)
        batch = self.inverter.invert(labels, seed=derive_seed(cfg.seed, round_index))
        self.pool.add(batch.normalized(), batch.patch_mask, batch.labels)
        self._pool_tensors = self.pool.tensors()

    # -- training
    def _lr(self) -> float:
        cfg = self.config
        if cfg.lr_schedule == "constant":
            return cfg.lr
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * self.step / self.total_steps))

    def evaluate(self) -> float:
        """Top-1 of the student on the real held-out split (dense, full images)."""
        was_training = self.student.training
        self.student.eval()
        accuracy = evaluate_accuracy(self.student, self.eval_split, self.mean, self.std,
                                     device=self.accelerator.device)
        self.student.train(was_training)
        return accuracy

    def fit(self, pool: Any = None) -> dict[str, list]:
        """Train for ``config.steps`` (or ``config.epochs`` passes over the pool), resuming from
        ``out_dir``'s checkpoint when there is one.

        Args:
            pool: for ``source="pool"``, the inverted data: a ``Pool``, a list of
                ``InvertedBatch``, a ``SparseInvertedCalibrationDataset`` or an exported dataset.
        """
        cfg = self.config
        if cfg.source == "pool":
            self.pool = _as_pool(pool)
            if len(self.pool) == 0:
                raise ValueError("the KD pool is empty: invert some images first")
        self._pool_tensors = self.pool.tensors() if len(self.pool) else None
        self._load_checkpoint()
        self.total_steps = total = cfg.total_steps(len(self.pool))
        bar = None
        if self.progress and self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc=f"distilling ({cfg.mode}, {cfg.source})", unit="step")
        self.student.train()
        if cfg.mode == "linear-probe":
            self.student.eval()  # frozen backbone: keep its dropout/norm statistics fixed
        while self.step < total:
            if cfg.source == "alternating" and self.step % cfg.kd_steps_per_round == 0:
                round_index = self.step // cfg.kd_steps_per_round
                if len(self.pool) < (round_index + 1) * cfg.images_per_round:
                    self._grow_pool(round_index)
            generator = torch.Generator().manual_seed(derive_seed(cfg.seed, self.step))
            x, m = self._sample(generator)
            with torch.no_grad():
                teacher_logits = forward_sparse(self.teacher, x, m)
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr()
            loss = kd_loss(forward_sparse(self.accelerator.unwrap_model(self.student), x, m), teacher_logits,
                           cfg.temperature)
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.step += 1
            self.history["kd_loss"].append((self.step, loss.item()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kd_loss=f"{loss.item():.3f}", pool=len(self.pool))
            if self.eval_split is not None and (self.step % cfg.eval_every == 0 or self.step == total):
                accuracy = self.evaluate()
                self.history["eval"].append((self.step, accuracy))
                self.history["pool_size"].append((self.step, len(self.pool)))
                if bar is not None:
                    bar.set_postfix(kd_loss=f"{loss.item():.3f}", heldout=f"{accuracy:.3f}", pool=len(self.pool))
            if self.step % cfg.checkpoint_every == 0 or self.step == total:
                self._save_checkpoint()
        if bar is not None:
            bar.close()
        self._write_outputs()
        return self.history

    # -- checkpoints
    def _checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir else None

    def _save_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if path is None or not self.accelerator.is_main_process:
            return
        state = {"step": self.step, "student": self.accelerator.unwrap_model(self.student).state_dict(),
                 "optimizer": self.optimizer.state_dict(), "history": self.history, "config": asdict(self.config),
                 "pool": self.pool if self.config.source == "alternating" else None}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    def _load_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if path is None or not path.is_file():
            return
        state = torch.load(path, map_location=self.accelerator.device, weights_only=False)
        if state["config"] != asdict(self.config):
            raise ValueError(f"{path} was written with another DistillConfig; use another out_dir or delete it")
        self.accelerator.unwrap_model(self.student).load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]
        if state["pool"] is not None:
            self.pool = state["pool"]
            self._pool_tensors = self.pool.tensors() if len(self.pool) else None

    def _write_outputs(self) -> None:
        if self.out_dir is None or not self.accelerator.is_main_process:
            return
        from .visualize import save_curves

        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "history.json", json.dumps(self.history) + "\n")
        if self.history["eval"]:
            save_curves({"student (real held-out)": self.history["eval"]}, self.out_dir / "learning_curve.png",
                        xlabel="KD step", ylabel="top-1", title="Data-free KD: held-out accuracy")


def _as_pool(source: Any) -> Pool:
    from .calibration import SparseInvertedCalibrationDataset
    from .batch import InvertedBatch

    if isinstance(source, Pool):
        return source
    pool = Pool()
    if isinstance(source, SparseInvertedCalibrationDataset):
        pool.add(source.pixel_values, source.patch_mask, source.labels)
    elif isinstance(source, (list, tuple)) and source and isinstance(source[0], InvertedBatch):
        for batch in source:
            pool.add(batch.normalized(), batch.patch_mask, batch.labels)
    elif source is not None:
        from .export import load_inverted

        batch = load_inverted(source).to_batch()
        pool.add(batch.normalized(), batch.patch_mask, batch.labels)
    return pool
