"""Creating a teacher from any name: a zoo teacher, a timm model (with a user's checkpoint), or a folder.

Zoo teachers and saved students load through timm's own machinery
(``timm.create_model("local-dir:DIR", pretrained=True)``), the same path a timm user takes with a Hub
folder, so nothing here is special-cased. Every loader leaves the normalization the weights were
trained with in ``model.pretrained_cfg``, where inversion, calibration and evaluation read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .checkpoints import load_matching, match_classifier, read_checkpoint
from .errors import TeacherError
from .registry import RECIPES, load_card, teacher_dir, zoo_names
from .saved import load_saved, saved_form
from .transformers_vit import load_transformers_vit


def load_teacher(name: str, *, pretrained: bool = False, checkpoint_path: str | None = None,
                 num_classes: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, **model_kwargs: Any) -> nn.Module:
    """Create a teacher by zoo name or any timm model name, in eval mode.

    Args:
        name: a zoo name (``fashion-mnist-vit``, ``digits-vit``), a timm model name, or a directory:
            one a distilled student was saved to (``smi distill --out DIR``, or any timm Hub folder:
            ``config.json`` + ``model.safetensors``), or a Hugging Face transformers ``save_pretrained``
            folder of a ``ViTForImageClassification``, ``DeiTForImageClassification``,
            ``DeiTForImageClassificationWithTeacher`` or ``CLIPForImageClassification`` (converted to
            the equivalent timm ViT, normalization from its ``preprocessor_config.json``; see
            ``smi_plugin.zoo.transformers_vit``). The sparse inverter ranks patches by class-token
            attention for every family, CLIP's average-pooled head included.
        pretrained: for timm names, load timm's pretrained weights (downloads from the hub).
        checkpoint_path: for timm names, a local checkpoint (``.safetensors``, or a ``.pth``/``.pt``
            state dict, optionally under a ``state_dict``/``model``/``state_dict_ema`` key) to load.
        num_classes: classifier size for timm names (defaults to the checkpoint's, else the model's).
        mean, std: the normalization the weights were trained with, per channel in ``[0, 1]`` pixel
            units; stored in ``model.pretrained_cfg`` so inversion, calibration and evaluation all use it.
        **model_kwargs: forwarded to ``timm.create_model`` (``img_size``, ``patch_size``, ``embed_dim``...).

    Raises:
        TeacherError: unknown name, missing/corrupt/mismatched checkpoint, bad normalization; the
            message says what to change.
    """
    import timm

    form = saved_form(Path(name)) if Path(name).is_dir() else None
    if form or name in RECIPES:
        what = f"a saved {'transformers ' if form == 'transformers' else ''}model" if form else "a zoo teacher"
        if pretrained or checkpoint_path:
            raise TeacherError(f"{name!r} is {what} and carries its own weights; drop --pretrained/--checkpoint")
        if num_classes is not None or model_kwargs:
            raise TeacherError(f"{name!r} is {what} with a fixed architecture; drop --num-classes/"
                               "--model-kwargs, or pass its timm architecture name with --checkpoint")
    if form == "transformers":
        return set_normalization(load_transformers_vit(name), mean, std)
    if form:
        return set_normalization(load_saved(name), mean, std)
    if name in RECIPES:
        load_card(name)  # says how to train a teacher whose files are missing
        model = load_saved(teacher_dir(name))
        model.pretrained_cfg["zoo_name"] = name
        return set_normalization(model, mean, std)

    if Path(name).is_dir() and not timm.is_model(name):
        raise TeacherError(f"{name!r} is a directory without a model in it: it needs config.json and "
                           "model.safetensors (written by smi distill --out, timm's save_for_hf, or transformers' "
                           "save_pretrained)")
    if not timm.is_model(name):
        raise TeacherError(f"unknown teacher {name!r}: not a zoo teacher ({zoo_names()}) and not a timm "
                           "model name (see `timm.list_models()`)")
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    state_dict = read_checkpoint(checkpoint_path) if checkpoint_path else None  # before any model is built
    try:
        model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    except TypeError as err:  # an unknown keyword reaches a model constructor
        raise TeacherError(f"{name} does not accept --model-kwargs {model_kwargs}: {err}") from err
    if state_dict is not None:
        if num_classes is None:
            match_classifier(model, state_dict)
        load_matching(model, state_dict, name, checkpoint_path)
    return set_normalization(model, mean, std).eval()


def set_normalization(model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """Record ``mean``/``std`` in ``pretrained_cfg``: every later step reads normalization from there."""
    if mean is None and std is None:
        return model
    if mean is None or std is None:
        raise TeacherError("give both --mean and --std (the normalization the weights were trained with)")
    channels = int(getattr(getattr(model, "patch_embed", None), "proj", nn.Conv2d(3, 1, 1)).in_channels)
    for label, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise TeacherError(f"--{label} needs one value per input channel ({channels}), got {list(values)}")
    if any(float(s) <= 0 for s in std):
        raise TeacherError(f"--std values must be positive, got {list(std)}")
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    model.pretrained_cfg = cfg
    return model
