"""Named recipes: the settings each workflow runs with by default, as library data.

A recipe is frozen data: the ``InversionConfig`` fields it sets, the ``DistillConfig`` fields it sets (none for
calibration), how its default student is derived from the teacher, and the measurement that chose it. Every
entry point reads the same object: ``smi distill --mode M`` and ``KDTrainer.from_recipe(teacher, M)`` run the
recipe ``M``; ``smi quantize`` and ``SparseInvertedCalibrationDataset.from_inverter`` invert with
``"calibration"``. Settings resolve in one order: field defaults < the teacher's (``teacher_inversion_settings``)
< the recipe < what the caller gives (in the CLI: ``--preset``, ``--config FILE``, flags).

The figures quoted in ``chosen_by`` are in ``benchmarks/README.md`` under the named section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from torch import nn

from .config import InversionConfig
from .data import DATASETS
from .zoo import load_card

STUDENT_RULES = ("smaller-vit", "teacher-backbone", "none")


@dataclass(frozen=True)
class Recipe:
    """One named recipe (see the module docstring).

    Args:
        name: what callers pass (``--mode`` for distillation, ``"calibration"``).
        summary: one line on what it does.
        inversion: ``InversionConfig`` fields it sets.
        distillation: ``DistillConfig`` fields it sets (empty for calibration).
        student: how the default student is made: ``smaller-vit`` (a narrower, shallower ViT on the
            teacher's patch grid, trained from scratch), ``teacher-backbone`` (the pretrained backbone the
            teacher's card names, with a new head: the paper's linear probe) or ``none``.
        chosen_by: the measurements that chose these settings, with where they are written down.
    """

    name: str
    summary: str
    inversion: Mapping[str, Any] = field(default_factory=dict)
    distillation: Mapping[str, Any] = field(default_factory=dict)
    student: str = "none"
    chosen_by: str = ""

    def __post_init__(self) -> None:
        if self.student not in STUDENT_RULES:
            raise ValueError(f"Recipe.student {self.student!r} is unknown; use one of {list(STUDENT_RULES)}")
        unknown = set(self.inversion) - set(InversionConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"recipe {self.name!r} sets {sorted(unknown)}, which are not InversionConfig fields")
        object.__setattr__(self, "inversion", MappingProxyType(dict(self.inversion)))
        object.__setattr__(self, "distillation", MappingProxyType(dict(self.distillation)))

    def inversion_config(self, teacher: nn.Module | None = None, **overrides: Any) -> InversionConfig:
        """``InversionConfig`` of the teacher's settings, then this recipe's, then ``overrides``."""
        derived = teacher_inversion_settings(teacher) if teacher is not None else {}
        return InversionConfig(**{**derived, **self.inversion, **overrides})


# How every distillation source inverts. SMI stopping (InversionConfig's default): at equal KD steps with seeded
# students it trained better students than random stopping in 5 of 5 runs. Dirichlet soft targets (ZSKD) at
# scale 0.3: digits 86.4% vs 77.2% one-hot at equal steps.
_KD_INVERSION = {"soft_targets": 0.3}
# Inversion while the student learns: big batches, few small steps at a time, noise drawn per patch and smoothed,
# Adam steps in each patch's cosine basis with high frequencies scaled down.
_STREAM_INVERSION = {**_KD_INVERSION, "batch_size": 128, "lr": 0.1, "iterations": 100, "initial_noise": "patch",
                     "frequency_decay": 3.0}

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (
    Recipe(
        name="full",
        summary="train every weight of a smaller ViT from scratch on a pool kept under sparse inversion",
        inversion=_STREAM_INVERSION,
        distillation={"mode": "full", "source": "online", "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05,
                      "lr_schedule": "cosine", "batch_size": 128, "mixup": 0.5, "temperature": 4.0,
                      "eval_every": 250, "minutes": 10.0},
        student="smaller-vit",
        chosen_by="benchmarks/README.md: 'SMI stopping' (SMI over random stopping, 5 of 5 seeded pairs), 'The "
                  "data-like priors' (soft targets 0.3), 'Patch noise' (per-patch noise: digits 95.3% vs 88.3%), "
                  "'Smooth steps' (frequency decay 3: Fashion-MNIST 51.0% vs 40.5%), 'Data-free distillation with "
                  "the defaults' (the online source, 10 minutes: digits 95.6%); all on the zoo teachers",
    ),
    Recipe(
        name="linear-probe",
        summary="the paper's setting: a pretrained backbone with a new head, solved by least squares over rounds "
                "of finished inversions",
        inversion={**_STREAM_INVERSION, "iterations": 200, "schedule": "paper-scaled:1"},
        distillation={"mode": "linear-probe", "probe_head": "least-squares", "source": "alternating",
                      "images_per_round": 128, "kd_steps_per_round": 1, "eval_every": 5, "checkpoint_every": 5,
                      "minutes": 10.0},
        student="teacher-backbone",
        chosen_by="benchmarks/README.md: 'The probe's head, solved' (least squares over rounds of 128: 69.3% vs "
                  "67.4% online and 66.5% with KD steps in 15 minutes; the paper's first stage alone, 44 of 64 "
                  "patches kept: 71.0% vs 69.3% at 30); validation images, never the test set",
    ),
    Recipe(
        name="calibration",
        summary="post-training quantization: inversions that stop random patches",
        inversion={"selection": "random"},
        chosen_by="benchmarks/README.md: 'Patch-selection policies, head to head' (W4A4 on the scattered-items "
                  "teacher: 71.60% random vs 65.10% SMI; within the spread elsewhere)",
    ),
)}
DISTILLATION_RECIPES = tuple(name for name, recipe in RECIPES.items() if recipe.distillation)


def get_recipe(recipe: str | Recipe) -> Recipe:
    """The recipe named ``recipe`` (or ``recipe`` itself)."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; use one of {sorted(RECIPES)}")
    return RECIPES[recipe]


def teacher_dataset(teacher: nn.Module) -> str | None:
    """The packaged dataset a teacher learned from: its ``pretrained_cfg``'s, else its zoo card's."""
    cfg = getattr(teacher, "pretrained_cfg", None) or {}
    if cfg.get("dataset") is None and cfg.get("zoo_name"):
        return load_card(cfg["zoo_name"])["dataset"]
    return cfg.get("dataset")


def teacher_inversion_settings(teacher: nn.Module, dataset: str | None = None) -> dict[str, Any]:
    """Inversion settings read from the teacher: one gray channel (``tie_channels``) for a teacher of a
    packaged dataset (all grayscale), as the data it learned from was gray. ``dataset`` overrides the
    teacher's own."""
    return {"tie_channels": True} if (dataset or teacher_dataset(teacher)) in DATASETS else {}
