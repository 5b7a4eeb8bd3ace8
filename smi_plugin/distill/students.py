"""Students: the default one a recipe derives from the teacher, a named one, and the check that a student takes
the teacher's images. ``save_student`` (the zoo's, re-exported) writes the timm Hub folder that
``load_teacher(DIR)`` and ``timm.create_model("local-dir:DIR")`` read back."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from ..recipes import Recipe
from ..zoo import RECIPES as ZOO_RECIPES
from ..zoo import load_card, load_teacher, save_student  # noqa: F401  (public here too)
from .heads import linear_probe_student
from .kd import forward_sparse

logger = logging.getLogger(__name__)

SMALLER_VIT = "vit_tiny_patch16_224"  # the timm architecture a smaller-vit student is made of


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within the context torch's global generator starts from ``seed`` and is restored after: a student's
    random initial weights follow the run's seed, not what the process drew before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Student(NamedTuple):
    """A student and what rebuilds it: its timm ``architecture`` and ``create_model`` keyword arguments."""

    module: nn.Module
    architecture: str
    model_kwargs: dict[str, Any]


def default_student(teacher: nn.Module, recipe: Recipe) -> Student:
    """The student ``recipe.student`` derives from ``teacher`` (call it under a seed: the weights are random).

    ``smaller-vit``: a ViT on the teacher's patch grid and channels with two thirds of its width, one head and
    one block fewer (at least 32 wide, one head, one block). ``teacher-backbone``: the pretrained backbone the
    teacher's zoo card names, with a new head of the teacher's classes.
    """
    classes = int(teacher.num_classes)
    if recipe.student == "teacher-backbone":
        zoo_name = (getattr(teacher, "pretrained_cfg", None) or {}).get("zoo_name")
        backbone_name = ZOO_RECIPES[zoo_name].init_from if zoo_name in ZOO_RECIPES else None
        if backbone_name is None:
            raise ValueError(f"recipe {recipe.name!r} trains a head on the teacher's pretrained backbone, and this "
                             "teacher names none (only zoo teachers fine-tuned from one do): pass student=, a "
                             "backbone with a head of the teacher's classes")
        card = load_card(backbone_name)
        kwargs = {**card["model_kwargs"], "num_classes": classes}
        return Student(linear_probe_student(load_teacher(backbone_name), classes), card["architecture"], kwargs)
    if recipe.student != "smaller-vit":
        raise ValueError(f"recipe {recipe.name!r} derives no student: pass student=")
    import timm

    grid = teacher.patch_embed
    heads = max(1, teacher.blocks[0].attn.num_heads - 1)
    kwargs = {"img_size": list(grid.img_size), "patch_size": list(grid.patch_size), "num_classes": classes,
              "embed_dim": max(32, (2 * teacher.embed_dim // 3) // heads * heads),
              "depth": max(1, len(teacher.blocks) - 1), "num_heads": heads, "in_chans": grid.proj.in_channels}
    return Student(timm.create_model(SMALLER_VIT, **kwargs), SMALLER_VIT, kwargs)


def load_student(name: str, teacher: nn.Module, mode: str, *, pretrained: bool = False,
                 checkpoint_path: str | None = None, model_kwargs: Mapping[str, Any] | None = None) -> Student:
    """A named student for ``teacher``: a zoo name, a folder a distillation saved, or a timm name (with timm's
    ``pretrained`` weights, a local ``checkpoint_path`` and ``model_kwargs``, as ``load_teacher`` takes them).
    In ``linear-probe`` mode it is the backbone with a new head; in ``full`` mode a head of another class count is
    replaced, and a student that cannot take the teacher's images is refused (``check_student_fits``)."""
    classes = int(teacher.num_classes)
    backbone = load_teacher(name, pretrained=pretrained, checkpoint_path=checkpoint_path, **(model_kwargs or {}))
    if name in ZOO_RECIPES or "saved_dir" in backbone.pretrained_cfg:  # the architecture its card names
        card = load_card(name) if name in ZOO_RECIPES else backbone.pretrained_cfg  # load_saved copied it there
        architecture, kwargs = card["architecture"], dict(card["model_kwargs"])
    else:
        architecture, kwargs = name, dict(model_kwargs or {})
    kwargs["num_classes"] = classes
    if mode == "linear-probe":
        return Student(linear_probe_student(backbone, classes), architecture, kwargs)
    if backbone.num_classes != classes:  # an ImageNet-headed timm model or checkpoint: its body, a new head
        logger.info("student %s: a new %d-class head in place of its %d-class one", name, classes,
                    backbone.num_classes)
        backbone.reset_classifier(classes)
    check_student_fits(backbone, teacher, name)
    return Student(backbone, architecture, kwargs)


def check_student_fits(student: nn.Module, teacher: nn.Module, name: str) -> None:
    """One forward of a blank teacher-shaped image through the student, as KD will call it (kept tokens on the
    teacher's patch grid for a ViT), so that a student built for other images fails here, in one line, rather
    than at its first KD step. Raises ``ValueError``."""
    grid = teacher.patch_embed
    images = torch.zeros(1, grid.proj.in_channels, *grid.img_size)
    try:
        with torch.no_grad():
            forward_sparse(student.eval(), images, torch.ones(1, *grid.grid_size, dtype=torch.bool))
    except (RuntimeError, ValueError, AssertionError) as err:
        raise ValueError(f"student {name!r} cannot take the teacher's {tuple(images.shape[1:])} images on its "
                         f"{tuple(grid.grid_size)} patch grid ({str(err).splitlines()[0]}); pick a student built "
                         "for that input size, channels and patch size") from err
