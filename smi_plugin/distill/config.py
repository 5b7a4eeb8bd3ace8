"""``DistillConfig``: every distillation setting, validated; ``smi distill``'s flags are generated from it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import ConfigBase, check_choice, check_positive_ints, option
from ..recipes import DISTILLATION_RECIPES, Recipe, get_recipe

MODES = ("linear-probe", "full")
SOURCES = ("pool", "alternating", "online")
OPTIMIZERS = ("sgd", "adamw")
PROBE_HEADS = ("least-squares", "gradient")


@dataclass
class DistillConfig(ConfigBase):
    """How to distil: field defaults are the paper's linear probe with KD steps; ``from_recipe(name)`` gives a
    named recipe's settings (``smi distill``'s defaults)."""

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
    def from_recipe(cls, recipe: str | Recipe, **overrides: Any) -> DistillConfig:
        """The distillation settings of ``recipe`` (a name in ``smi_plugin.recipes.RECIPES``), with some
        fields overridden; ``steps`` or ``epochs`` without ``minutes`` replace the recipe's time budget."""
        recipe = get_recipe(recipe)
        if not recipe.distillation:
            raise ValueError(f"recipe {recipe.name!r} does not distil; use one of {list(DISTILLATION_RECIPES)}")
        settings = dict(recipe.distillation)
        if "minutes" not in overrides and ("steps" in overrides or "epochs" in overrides):
            settings["minutes"] = None  # a length given replaces the recipe's time budget
        return cls(**{**settings, **overrides})

    def total_steps(self, pool_size: int) -> int:
        """KD steps for a pool of ``pool_size`` images: ``steps``, or ``epochs`` passes over the pool."""
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * pool_size / self.batch_size))
