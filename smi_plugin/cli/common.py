"""Options every command shares: the teacher, the inversion config, labels and held-out data."""

from __future__ import annotations

import argparse
from typing import Any

from ..batch import balanced_labels
from ..config import PRESETS, InversionConfig
from ..data import (
    DATASETS,
    DatasetNotFoundError,
    EvalDataError,
    ImageSplit,
    load_eval_data,
    load_split,
)
from ..recipes import teacher_dataset as recipe_teacher_dataset
from ..recipes import teacher_inversion_settings
from ..tokens import UnsupportedModelError, check_vit
from ..zoo import TeacherError, load_teacher, zoo_names
from .options import (
    CLIError,
    KeyValueAction,
    accept_negative_lists,
    add_config_arguments,
    config_from_args,
    positive_int,
    read_config_file,
)


def add_teacher_arguments(parser: argparse.ArgumentParser, default: str | None = "fashion-mnist-vit") -> None:
    """``--teacher``, ``--checkpoint``, ``--num-classes``, ``--model-kwargs``, ``--mean``/``--std``, ``--eval-data``."""
    accept_negative_lists(parser)  # every command with a teacher may take label or number lists
    group = parser.add_argument_group("teacher")
    group.add_argument("--teacher", default=default,
                       help=f"zoo name ({', '.join(zoo_names())}) or any timm ViT name (default: %(default)s)")
    group.add_argument("--pretrained", action="store_true",
                       help="timm names: load timm's pretrained weights (hub) (default: off)")
    group.add_argument("--checkpoint", default=None, metavar="PATH",
                       help="timm names: a local checkpoint, .safetensors or a .pth state dict (default: none)")
    group.add_argument("--num-classes", type=int, default=None,
                       help="timm names: classifier size (default: the checkpoint's, else the model's)")
    group.add_argument("--model-kwargs", nargs="+", action=KeyValueAction, default=None, metavar="KEY=VALUE",
                       help="timm names: timm.create_model keyword arguments, values read as Python literals, as "
                            "in timm's train.py (e.g. img_size=32 patch_size=4 embed_dim=96 depth=4 num_heads=3) "
                            "(default: none)")
    group.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                       help="per-channel mean the weights were trained with, in [0, 1] pixel units "
                            "(default: the model's pretrained_cfg)")
    group.add_argument("--std", type=float, nargs="+", default=None, metavar="S",
                       help="per-channel std the weights were trained with (default: the model's pretrained_cfg)")
    group.add_argument("--eval-data", default=None, metavar="PATH",
                       help="real held-out images to judge on: an image folder (one sub-folder per class, sorted "
                            "as torchvision's ImageFolder) or a datasets.save_to_disk directory with image and "
                            "label columns (default: --dataset, else the zoo teacher's dataset)")


def load_teacher_from_args(args: argparse.Namespace):
    """The teacher the flags describe, checked to be a ViT this library can sparsify (else ``CLIError``)."""
    try:
        teacher = load_teacher(args.teacher, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                               num_classes=args.num_classes, mean=getattr(args, "mean", None),
                               std=getattr(args, "std", None), **(getattr(args, "model_kwargs", None) or {}))
    except TeacherError as err:
        raise CLIError(str(err)) from err
    try:
        check_vit(teacher)
    except UnsupportedModelError as err:
        raise CLIError(f"--teacher {args.teacher}: {err}. Pick a ViT (e.g. vit_tiny_patch16_224, "
                       f"deit_small_patch16_224) or a zoo teacher ({', '.join(zoo_names())})") from err
    return teacher


def add_inversion_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
                            title: str = "inversion (InversionConfig)") -> None:
    """``--preset``, ``--config FILE`` and one flag per ``InversionConfig`` field under ``title``;
    ``defaults`` are the command's own (what ``inversion_config`` is given), shown in ``--help`` in
    place of the library's."""
    group = parser.add_argument_group("inversion presets")
    group.add_argument("--preset", default="default", choices=sorted(PRESETS),
                       help="named recipe the flags below override: default (the paper's method, stages scaled "
                            "to --iterations), paper (4000 iterations), data-like (grayscale teachers' recipe) "
                            "(default: %(default)s)")
    group.add_argument("--config", default=None,
                       help="YAML or JSON file whose keys are InversionConfig fields (default: none)")
    # --mean/--std belong to the teacher (add_teacher_arguments): stored in its pretrained_cfg they
    # reach inversion, calibration and evaluation alike; config_from_args still copies them over.
    add_config_arguments(parser, InversionConfig, title, defaults=defaults,
                         skip=("mean", "std"))


def inversion_config(args: argparse.Namespace, teacher=None, **defaults: Any) -> InversionConfig:
    """``InversionConfig`` from: library defaults < ``defaults`` < preset < ``--config`` file < explicit flags.

    ``defaults`` are the command's own: a preset's fields win over them. With ``teacher``, a teacher of
    a packaged dataset (all grayscale) gets ``tie_channels=True`` unless something above says otherwise:
    one gray channel is optimised, as the data it learned from was gray. A schedule whose stages never
    apply is an error here (the library only warns).
    """
    if teacher is not None:
        defaults = {**teacher_inversion_settings(teacher, getattr(args, "dataset", None)), **defaults}
    preset = PRESETS[getattr(args, "preset", "default")]
    file_values = read_config_file(getattr(args, "config", None), InversionConfig)
    config = config_from_args(InversionConfig, args, {**defaults, **preset}, file_values)
    late = config.late_stages()
    if late:
        raise CLIError(f"stopping stages at iterations {late} come at or after the last of {config.iterations} "
                       "iterations and would never apply; raise --iterations or use --schedule paper-scaled")
    return config


def parse_labels(text: str | None, num_images: int | None, num_classes: int) -> list[int]:
    """Labels from ``--labels 0,3,9`` (checked against ``num_classes``) or balanced over ``--num-images``."""
    if text:
        try:
            labels = [int(x) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise CLIError(f"--labels must be comma-separated class indices, got {text!r}") from err
        bad = [label for label in labels if not 0 <= label < num_classes]
        if bad:
            raise CLIError(f"--labels {bad} outside the valid range 0..{num_classes - 1} (the teacher has "
                           f"{num_classes} classes)")
        if not labels:
            raise CLIError("--labels is empty; give class indices such as --labels 0,3,9")
        return labels
    if num_images is None or num_images < 1:
        raise CLIError("give --num-images N (labels balanced over classes) or --labels 0,1,2,...")
    return balanced_labels(num_images, num_classes)


def teacher_dataset(args: argparse.Namespace, teacher) -> str | None:
    """The packaged dataset named by ``--dataset``, the teacher's ``pretrained_cfg`` or its zoo card."""
    return getattr(args, "dataset", None) or recipe_teacher_dataset(teacher)


def teacher_splits(args: argparse.Namespace, teacher):
    """The real (train, held-out) splits of the teacher's dataset (zoo card, or --dataset)."""
    name = teacher_dataset(args, teacher)
    if name is None:
        raise CLIError(f"no real held-out data known for this teacher; pass --dataset {'|'.join(DATASETS)}")
    try:
        return load_split(name, "train"), load_split(name, "test")
    except (DatasetNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err


def add_evaluation_arguments(group: argparse._ArgumentGroup) -> None:
    """``--dataset`` and ``--eval-images``: which real held-out images judge the commands' results."""
    group.add_argument("--dataset", default=None, choices=list(DATASETS),
                       help="real data to evaluate on (default: the zoo teacher's)")
    group.add_argument("--eval-images", type=positive_int, default=None, metavar="N",
                       help="evaluate on the first N held-out images only (default: all of them)")


def evaluation_split(args: argparse.Namespace, teacher) -> ImageSplit | None:
    """Real held-out images to judge ``teacher`` on, or None when there are none ("nothing evaluated").

    Order: ``--eval-data PATH`` (read at the teacher's input size and channels), else ``--dataset``
    where the command has it, else the zoo card's dataset; the first ``--eval-images`` of them where given.
    """
    path, first = getattr(args, "eval_data", None), getattr(args, "eval_images", None)
    if path:
        channels, height, width = _input_size(teacher)
        try:
            split = load_eval_data(path, (height, width), channels, num_classes=int(teacher.num_classes))
        except EvalDataError as err:
            raise CLIError(f"--eval-data: {err}") from err
    else:
        name = teacher_dataset(args, teacher)
        if name is None:
            return None
        try:
            split = load_split(name, "test")
        except (DatasetNotFoundError, ValueError) as err:
            raise CLIError(str(err)) from err
    return split.first(first)


def _input_size(teacher) -> tuple[int, int, int]:
    """``(channels, height, width)`` the teacher takes, from its patch embedding (else ``pretrained_cfg``)."""
    embed = getattr(teacher, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None) is not None:
        height, width = embed.img_size
        return int(embed.proj.in_channels), int(height), int(width)
    return tuple(int(v) for v in teacher.pretrained_cfg.get("input_size", (3, 224, 224)))  # type: ignore[return-value]


def csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
