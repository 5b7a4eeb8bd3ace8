"""``KDTrainer``: knowledge distillation from a teacher to a student on inverted data only, on accelerate.

The trainer is a short loop over a data source (``sources``): each step takes the source's next batch, lets a
least-squares head absorb the samples that batch finished, and takes one KD step. One process, one GPU or
many: under ``accelerate launch`` every process inverts and trains on its own samples (seeds derived from the
run's seed, the process's rank and the step, so a run depends only on its seed and its number of processes),
the student's forward and backward go through the prepared (DDP) module so gradients are averaged, a time
budget is kept on one clock (the slowest process's), and evaluation and saving happen once, on the main
process. Checkpoints are plain tensors and JSON (``checkpoint``); a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from time import monotonic
from typing import Any

import torch
from torch import nn

from ..config import InversionConfig
from ..data import ImageSplit
from ..distributed import distributed_state
from ..evaluation import evaluate_accuracy
from ..images import model_normalization
from ..inverter import SparseInverter, derive_seed
from ..io import atomic_write_text
from ..progress import progress_bar
from ..recipes import Recipe, get_recipe
from .checkpoint import Checkpoint, mismatch_error, settings_differences
from .config import DistillConfig
from .heads import LeastSquaresHead
from .kd import SparseForward, build_optimizer, classifier_head, forward_sparse, kd_loss, learning_rate
from .sources import Source, build_source, check_inverter
from .students import default_student, seeded

logger = logging.getLogger(__name__)

RANK_SEED_INDEX = 1 << 41  # derive_seed(seed, RANK_SEED_INDEX + rank) seeds a process of a multi-process run


def default_accelerator() -> Any:
    """An ``accelerate.Accelerator`` for this launch: one process on the best device, or this process of an
    ``accelerate launch`` (on gloo where the machine has no GPU)."""
    from accelerate import Accelerator

    distributed_state()  # builds the multi-CPU state a launch on a CPU machine needs
    return Accelerator(cpu=not torch.cuda.is_available())


class KDTrainer:
    """Knowledge distillation from ``teacher`` to ``student`` on inverted data only.

    Args:
        teacher, student: any ``nn.Module`` classifiers over the same classes. ViT students see only retained
            tokens (``forward_kept_tokens``), others see images with stopped patches set to 0 (the dataset mean).
        config: a ``DistillConfig`` (``DistillConfig.from_recipe(name)`` for a named recipe).
        eval_split, mean, std: the real held-out split (and normalization) to evaluate on.
        out_dir: where checkpoints, ``history.json`` and ``learning_curve.png`` go (optional).
        inverter: a ``SparseInverter`` of the teacher, needed for ``source="alternating"``/``"online"``.
        accelerator: an ``accelerate.Accelerator``; by default one for this launch (one process on the best
            device, or this process of an ``accelerate launch``).

    Example:
        >>> trainer = KDTrainer.from_recipe(teacher, "full", eval_split=test, steps=300)   # smi distill's recipe
        >>> history = trainer.fit()
        >>> trainer = KDTrainer(teacher, student, DistillConfig(steps=300), test, mean, std, out_dir="runs/kd")
        >>> history = trainer.fit(pool)     # a fixed pool (source="pool"), or fit() with an inverter
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, config: DistillConfig, eval_split: ImageSplit | None,
                 mean: Sequence[float], std: Sequence[float], out_dir: str | os.PathLike | None = None,
                 inverter: SparseInverter | None = None, progress: bool = True, accelerator: Any = None) -> None:
        check_inverter(config, inverter)
        accelerator = accelerator or default_accelerator()
        self.accelerator, self.config, self.eval_split, self.inverter = accelerator, config, eval_split, inverter
        self.mean, self.std, self.out_dir = tuple(mean), tuple(std), Path(out_dir) if out_dir else None
        self.progress = progress and accelerator.is_main_process
        ranks = accelerator.num_processes
        self.seed = config.seed if ranks == 1 else derive_seed(config.seed, RANK_SEED_INDEX + accelerator.process_index)
        self.teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
        self.student = student.to(accelerator.device)  # the bare module: evaluated, saved, its features solved
        self.head_solver: LeastSquaresHead | None = None
        self.model: nn.Module = SparseForward(self.student)
        self.optimizer = None
        if config.mode == "linear-probe" and config.probe_head == "least-squares":
            self.head_solver = LeastSquaresHead(classifier_head(self.student))
            self.student.requires_grad_(False)
        else:  # the prepared module averages gradients over processes
            self.model, self.optimizer = accelerator.prepare(self.model, build_optimizer(self.student, config))
        self.step, self.total_steps, self.elapsed = 0, config.steps, 0.0  # elapsed: seconds trained (over resumes)
        self.source: Source | None = None
        self.history: dict[str, list] = {"kd_loss": [], "eval": [], "pool_size": [], "minutes": []}
        self.checkpoint = Checkpoint(self.out_dir, accelerator.process_index) if self.out_dir else None

    @classmethod
    def from_recipe(cls, teacher: nn.Module, recipe: str | Recipe = "full", *, student: nn.Module | None = None,
                    eval_split: ImageSplit | None = None, out_dir: str | os.PathLike | None = None,
                    inversion: InversionConfig | Mapping[str, Any] | None = None,
                    config: DistillConfig | None = None, seed: int = 0, progress: bool = True,
                    accelerator: Any = None, **overrides: Any) -> KDTrainer:
        """A trainer running ``recipe`` (``smi_plugin.recipes.RECIPES``) on ``teacher``: what ``smi distill``
        runs. ``overrides`` are ``DistillConfig`` fields (or ``config`` the whole of it); ``inversion`` is the
        ``InversionConfig`` (or fields overriding the recipe's); ``seed`` seeds the inversion, the KD batches and
        the default student's weights (``recipe.student``'s rule, unless ``student`` is given)."""
        recipe = get_recipe(recipe)
        if config is not None and overrides:
            raise ValueError(f"give config= or DistillConfig fields ({sorted(overrides)}), not both")
        config = config or DistillConfig.from_recipe(recipe, **{"seed": seed, **overrides})
        if not isinstance(inversion, InversionConfig):
            inversion = recipe.inversion_config(teacher, **{"seed": seed, **(inversion or {})})
        if student is None:
            with seeded(seed):
                student = default_student(teacher, recipe).module
        accelerator = accelerator or default_accelerator()
        teacher = teacher.to(accelerator.device)  # before the inverter, which builds its tensors on its device
        inverter = SparseInverter(teacher, inversion, progress=False)
        return cls(teacher, student, config, eval_split, *model_normalization(teacher), out_dir=out_dir,
                   inverter=inverter, progress=progress, accelerator=accelerator)

    @property
    def images_seen(self) -> int:
        """Distinct inverted samples this process's student has trained on (``inverted_images`` sums them)."""
        return 0 if self.source is None else self.source.images_seen

    def inverted_images(self) -> int:
        """Distinct inverted samples trained on, counted over every process (call it on every process)."""
        return int(self._sum(torch.tensor(float(self.images_seen), device=self.accelerator.device)).item())

    def fit(self, pool: Any = None) -> dict[str, list]:
        """Train for ``total_steps`` (or ``config.minutes``), resuming from ``out_dir``'s checkpoint when there is one.

        Args:
            pool: for ``source="pool"``, the inverted data: an ``InvertedBatch``, a list of them,
                a ``SparseInvertedCalibrationDataset`` or an exported dataset.
        """
        cfg = self.config
        self.source = build_source(cfg, self.inverter, pool, self.seed)
        self.total_steps = cfg.total_steps(self.source.images_seen)
        self._resume()
        timed = cfg.minutes is not None
        bar = progress_bar(None if timed else self.total_steps, initial=self.step, enabled=self.progress,
                           desc=f"distilling ({cfg.mode}, {cfg.source}" + (f", {cfg.minutes:g} min)" if timed else ")"),
                           unit="step")
        self.student.train(cfg.mode == "full")  # a frozen backbone keeps its dropout/norm behaviour fixed
        clock = monotonic() - self.elapsed
        while not self.done():
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.step))
            batch = self.source.next_batch(self.step, generator, self.competitor())
            if self.head_solver is not None and batch.finished is not None:
                self.head_solver.absorb(self.student, self.teacher, batch.finished, flip=cfg.flip, reduce=self._sum)
            loss = self.train_step(batch.pixel_values, batch.patch_mask)
            self.elapsed = self._slowest(monotonic() - clock)
            self.history["kd_loss"].append([self.step, loss])
            bar.update(1)
            bar.set_postfix(kd_loss=f"{loss:.3f}", pool=self.images_seen)
            if self.eval_split is not None and (self.step % cfg.eval_every == 0 or self.done()):
                self._evaluate_into_history()
            if self.step % cfg.checkpoint_every == 0 or self.done():
                self._save_checkpoint()
        bar.close()
        self._write_outputs()
        return self.history

    def done(self) -> bool:
        position, total = self.progress_position()
        return position >= total

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
        if self.optimizer is None:  # a solved head (absorb): the loss of the head the samples gave
            with torch.no_grad():
                loss = kd_loss(forward_sparse(self.student, x, m), teacher_logits, self.config.temperature)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.config, *self.progress_position())
            loss = kd_loss(self.model(x, m), teacher_logits, self.config.temperature)
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            self.optimizer.step()
        self.step += 1
        return loss.item()

    def competitor(self) -> nn.Module | None:
        """The student, once ``competition_start`` of the budget has passed, when the inversion competes."""
        weight = self.inverter.config.competition_weight if self.inverter is not None else 0
        position, total = self.progress_position()
        if weight <= 0 or position < self.config.competition_start * total:
            return None
        return self.student

    def evaluate(self) -> float:
        """Top-1 of the student on the real held-out split (dense, full images)."""
        was_training = self.student.training
        self.student.eval()
        accuracy = evaluate_accuracy(self.student, self.eval_split, self.mean, self.std,
                                     device=self.accelerator.device)
        self.student.train(was_training)
        return accuracy

    # -- across processes
    def _sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(value, "sum") if self.accelerator.num_processes > 1 else value

    def _slowest(self, seconds: float) -> float:
        """The slowest process's elapsed time, so that a time budget ends every process at the same step."""
        if self.accelerator.num_processes == 1:
            return seconds
        value = torch.tensor(seconds, dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return float(value)

    def _evaluate_into_history(self) -> None:
        seen = self.inverted_images()
        if self.accelerator.is_main_process:
            self.history["eval"].append([self.step, self.evaluate()])
            self.history["pool_size"].append([self.step, seen])
            self.history["minutes"].append([self.step, self.elapsed / 60])

    # -- checkpoints and outputs
    def _settings(self) -> dict[str, Any]:
        """What a resumed run must share: the KD settings, the inverter's where it makes the data, the processes."""
        inversion = None
        if self.inverter is not None and self.config.source != "pool":
            inversion = {k: v for k, v in self.inverter.config.to_dict().items() if k != "log_every"}
        return {"DistillConfig": self.config.to_dict(), "InversionConfig": inversion,
                "processes": self.accelerator.num_processes}

    def check_resumable(self) -> None:
        """Raise ``CheckpointMismatchError`` if ``out_dir`` holds a checkpoint of a run with other settings (or
        an earlier version's pickle), which ``fit`` would refuse: callers check before spending time on work."""
        meta = self.checkpoint.read_meta() if self.checkpoint else None
        if meta is not None:
            differences = settings_differences(meta["settings"], json.loads(json.dumps(self._settings())))
            if differences:
                raise mismatch_error(self.checkpoint.folder, differences)

    def _save_checkpoint(self) -> None:
        if self.checkpoint is None:
            return
        self.checkpoint.write_source(self.step, self.source.state_dict())
        self.accelerator.wait_for_everyone()  # every process's source of this step is written
        if self.accelerator.is_main_process:
            tensors = {"student": self.student.state_dict(),
                       "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                       "head": self.head_solver.state_dict() if self.head_solver is not None else None}
            self.checkpoint.write_trainer({"step": self.step, "elapsed": self.elapsed, "history": self.history,
                                           "settings": self._settings()}, tensors)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> None:
        self.check_resumable()
        meta = self.checkpoint.read_meta() if self.checkpoint else None
        if meta is None:
            return
        device = self.accelerator.device
        device = "cpu" if device.type == "cpu" else device  # a multi-process CPU run's device is "cpu:0"
        tensors = self.checkpoint.read_trainer(meta["step"], device)
        self.student.load_state_dict(tensors["student"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(tensors["optimizer"])
        if self.head_solver is not None:
            self.head_solver.load_state_dict(tensors["head"])
        self.source.load_state_dict(self.checkpoint.read_source(meta["step"], device))
        self.step, self.elapsed, self.history = meta["step"], meta["elapsed"], meta["history"]
        logger.info("resumed %s at step %d", self.checkpoint.folder, self.step)

    def _write_outputs(self) -> None:
        if self.out_dir is None or not self.accelerator.is_main_process:
            return
        from ..visualize import save_curves

        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "history.json", json.dumps(self.history) + "\n")
        if self.history["eval"]:
            save_curves({"student (real held-out)": self.history["eval"]}, self.out_dir / "learning_curve.png",
                        xlabel="KD step", ylabel="top-1", title="Data-free KD: held-out accuracy")
