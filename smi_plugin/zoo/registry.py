"""The zoo's registry: the shipped teachers' recipes, names, cards and weight files.

Each shipped teacher is a folder beside this module in the format ``save_student`` writes (a timm Hub
folder: ``config.json`` + ``model.safetensors`` + ``README.md``), its card (recipe, seed, measured
held-out top-1) under ``config.json``'s ``smi_plugin`` key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigBase, check_choice, check_positive_ints
from ..data import DATASETS
from .errors import TeacherError
from .saved import CONFIG, WEIGHTS, read_card

ZOO_DIR = Path(__file__).resolve().parent
BASE_ARCHITECTURE = "vit_tiny_patch16_224"


@dataclass(frozen=True)
class TeacherRecipe(ConfigBase):
    """How a zoo teacher is built and trained (all on the CPU, reproducibly).

    Args:
        dataset: real dataset the teacher is trained on (one of ``smi_plugin.data.DATASETS``).
        embed_dim, depth, num_heads, patch_size: ViT shape at 32x32 input.
        epochs, batch_size, lr, weight_decay, warmup_epochs, label_smoothing: AdamW + cosine recipe.
        max_rotation_deg, max_translate, scale_range, hflip: light per-sample affine augmentation.
        seed: seed of weights init, shuffling and augmentation.
        classes: train on these classes only (None: all); the head still has one output per class.
        init_from: start from this zoo teacher's weights (its head is kept: same classes).
        restart_epochs, restart_lr: a second cosine phase (warm restart) at a lower learning rate
            without rotation/scale augmentation, with its own generator (seed + 1).
    """

    dataset: str
    epochs: int
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    patch_size: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    max_rotation_deg: float = 10.0
    max_translate: float = 0.08
    scale_range: tuple[float, float] = (0.9, 1.1)
    hflip: bool = False
    seed: int = 0
    classes: tuple[int, ...] | None = None
    init_from: str | None = None
    restart_epochs: int = 0
    restart_lr: float = 5e-4

    def __post_init__(self) -> None:
        check_choice(self, "dataset", DATASETS)
        check_positive_ints(self, "epochs", "embed_dim", "depth", "num_heads", "patch_size", "batch_size")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"TeacherRecipe.embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    def model_kwargs(self, num_classes: int) -> dict[str, Any]:
        return dict(img_size=32, patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
                    num_heads=self.num_heads, num_classes=num_classes)


RECIPES: dict[str, TeacherRecipe] = {
    "fashion-mnist-vit": TeacherRecipe(dataset="fashion-mnist", epochs=12, hflip=True, max_rotation_deg=5.0,
                                       restart_epochs=10),
    "digits-vit": TeacherRecipe(dataset="digits", epochs=60, batch_size=64, lr=1e-3),
    # Small items anywhere on a dark canvas: the teacher must locate the object, so its last-block
    # CLS attention marks the foreground (benchmarks/attention_foreground.py), as SMI assumes.
    "fashion-mnist-scattered-vit": TeacherRecipe(dataset="fashion-mnist-scattered", epochs=6, hflip=True,
                                                 max_rotation_deg=5.0),
    # The paper's knowledge-transfer setting, scaled down: a backbone pretrained on real images of
    # half the classes (as ImageNet pretraining), a teacher fine-tuned from it on all classes; a
    # student = backbone + new head then learns the other classes from inverted images only.
    "fashion-mnist-backbone": TeacherRecipe(dataset="fashion-mnist", epochs=6, hflip=True, max_rotation_deg=5.0,
                                            classes=(0, 1, 2, 3, 4)),
    "fashion-mnist-vit-ft": TeacherRecipe(dataset="fashion-mnist", epochs=3, hflip=True, max_rotation_deg=5.0,
                                          lr=5e-4, warmup_epochs=0, init_from="fashion-mnist-backbone"),
}


def zoo_names() -> list[str]:
    return sorted(RECIPES)


def teacher_dir(name: str) -> Path:
    return ZOO_DIR / name


def card_path(name: str) -> Path:
    return teacher_dir(name) / CONFIG


def weights_path(name: str) -> Path:
    return teacher_dir(name) / WEIGHTS


def load_card(name: str) -> dict[str, Any]:
    """The card of a shipped zoo teacher: architecture, model_kwargs, num_classes, mean, std, class_names,
    dataset, recipe, heldout_top1..."""
    if name not in RECIPES:
        raise TeacherError(f"unknown zoo teacher {name!r}; zoo teachers are {zoo_names()}")
    path = card_path(name)
    if not path.is_file() or not weights_path(name).is_file():
        raise TeacherError(f"zoo teacher {name!r} has no trained weights at {weights_path(name)}; "
                           f"train it with `smi train-teacher {name}`")
    return read_card(teacher_dir(name))
